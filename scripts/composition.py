"""Multi-persona composition (research question 4), the command line of eval/experiments/composition.py.

    python scripts/composition.py grid --n_diffs 3 --levels 0 2
    python scripts/composition.py summarize --output_dir results/exp4_composition --traits evil sycophancy hallucination

`grid` prints every combination of --levels for --n_diffs diffs (a full factorial), flattened in
groups of one coefficient per diff: the form `eval_lora_persona.py --lora_coef` reads.

`summarize` reads eval_<trait>.summary.json for each trait (eval_lora_persona.py over the grid,
each trait on its own questions, with the judged score, coherence and the judge-free margin per
combination) and fits, per trait and metric, score = β₀ + Σⱼ βⱼ·cⱼ with slope errors paired by
question. Writes summary.json, composition.png (each trait against its own coefficient, one line
per setting of the others) and slopes.png (the β matrices beside the traits' similarity in weight
space and in activation space).
"""

import time


from eval.experiments.composition import factorial, print_summary, summarize
from io_utils import ArgumentParser, check_writable_dir, finite_float, positive_int, run_cli, write_json, write_manifest
from model_loading import model_label


def main():
    parser = ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    grid = commands.add_parser("grid")
    grid.add_argument("--n_diffs", type=positive_int, required=True)
    grid.add_argument("--levels", nargs="+", type=finite_float, default=[0.0, 2.0])
    summary = commands.add_parser("summarize")
    summary.add_argument("--output_dir", required=True)
    summary.add_argument("--traits", nargs="+", required=True, help="the composed traits, each evaluated on its own questions")
    summary.add_argument("--model", default=None, help="for the default diff and vector paths of the similarity panels")
    summary.add_argument("--layer", type=int, default=None, help="activation-space similarity layer (default: two thirds of the depth)")
    args = parser.parse_args()
    if args.command == "grid":
        if len(set(args.levels)) < 2:
            parser.error("grid needs at least two distinct --levels")
        print(" ".join(f"{c:g}" for combination in factorial(args.levels, args.n_diffs) for c in combination))
        return
    started = time.time()
    output_dir = check_writable_dir(args.output_dir, "--output_dir")
    report = summarize(output_dir, args.traits, args.model, args.layer)
    report["model"] = model_label(args.model)
    write_json(output_dir / "summary.json", report)
    write_manifest(output_dir, args, started, name="summary.manifest.json", outputs={"summary": str(output_dir / "summary.json")})
    print_summary(report)
    print(f"wrote {output_dir / 'summary.json'}, {output_dir / 'composition.png'}, {output_dir / 'slopes.png'}")


if __name__ == "__main__":
    run_cli(main)
