"""Two sources, one direction? (the command line of eval/experiments/cross_source.py)

    python scripts/cross_source.py similarity --trait sycophancy \\
        --prompt_diff persona_loras/SmolLM2-135M-Instruct/sycophancy/sycophancy_lora_diff.pt \\
        --ab_diff persona_loras/SmolLM2-135M-Instruct/sycophancy_caa/sycophancy_lora_diff.pt \\
        --comparators persona_loras/SmolLM2-135M-Instruct/evil/evil_lora_diff.pt \\
        --ab_items persona_loras/SmolLM2-135M-Instruct/sycophancy_caa/ab_evaluation.jsonl \\
        --answers results/cross_source/judged_sycophancy.csv --output results/cross_source/similarity_sycophancy.json
    python scripts/cross_source.py summarize --output_dir results/cross_source --traits sycophancy hallucination corrigibility

`similarity` compares the prompt-derived and the A/B-derived diff by what they do on held-out
inputs (the public held-out items with both answers, and the unsteered model's answers to the
evaluation questions from the judged run's CSV): their data-weighted cosine against random
matched low-rank draws and other traits' diffs, and the residual-stream change at the steered
layer. `summarize` reads the driver's runs (public_ab_T, own_ab_T, judged_T summaries: both diffs
at 0 0, 1 0, 0 1) and writes summary.json, the table with paired errors and Holm over all its
contrasts, and cross_source.png.
"""

import time

from io_utils import (ArgumentParser, PersonaLoRAError, check_writable, check_writable_dir, non_negative_int,
                      positive_int, run_cli, write_json, write_manifest)


def read_unsteered_answers(path, limit: int) -> list[dict]:
    """One unsteered answer per question (its first sample) from a two-diff judged run's CSV."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, keep_default_na=False)  # an empty answer stays an empty string
    except (OSError, ValueError) as error:
        raise PersonaLoRAError(f"--answers {path}: cannot read it as a CSV ({error.__class__.__name__}); pass the judged "
                               "run's CSV (eval_lora_persona.py --output_path)") from None
    coefs = [c for c in frame.columns if c.startswith("coef")]
    if not {"question_id", "question", "answer"} <= set(frame.columns) or not coefs:
        raise PersonaLoRAError(f"--answers {path} is not an evaluation CSV with question_id, question, answer and coef columns")
    unsteered = frame[(frame[coefs] == 0).all(axis=1)].drop_duplicates("question_id")
    if unsteered.empty:
        raise PersonaLoRAError(f"--answers {path} holds no unsteered answers (every coefficient 0)")
    return unsteered.head(limit)[["question", "answer"]].to_dict("records")


def check_pair(prompt_path, ab_path, diffs: dict, ab_items) -> None:
    """Refuse, in one line, a pair that is not a trait's prompt-derived and A/B-derived diffs from
    independent initialisations, or held-out items that are not the A/B diff's own held-out file."""
    from pathlib import Path

    from io_utils import file_identity

    if Path(prompt_path).resolve() == Path(ab_path).resolve():
        raise PersonaLoRAError("--prompt_diff and --ab_diff are the same file: pass the trait's two sources' diffs")
    kinds = {name: (diffs[name].metadata.get("source") or {}).get("kind", "prompts") for name in ("prompt", "ab")}
    if kinds["ab"] != "ab" or kinds["prompt"] == "ab":
        raise PersonaLoRAError(f"--prompt_diff is {kinds['prompt']}-derived and --ab_diff {kinds['ab']}-derived: pass the "
                               "prompt-derived diff and the one from extract_persona_lora.py --ab_source, in that order")
    seeds = [(diffs[name].metadata.get("init") or {}).get("seed") for name in ("prompt", "ab")]
    if seeds[0] is not None and seeds[0] == seeds[1]:
        raise PersonaLoRAError(f"--prompt_diff and --ab_diff start from the same initialisation (seed {seeds[0]}): their "
                               "agreement would be the shared start's; re-extract the A/B diff (it now has its own stream)")
    own = Path(ab_path).parent / "ab_evaluation.jsonl"
    if not own.is_file() or file_identity(ab_items)["sha256"] != file_identity(own)["sha256"]:
        raise PersonaLoRAError(f"--ab_items {ab_items} is not the A/B diff's held-out file {own}: only its items are held out "
                               "from the A/B diff's training")


def similarity(args) -> None:
    import lora_utils as lu
    from eval.ab_source import load_ab_source
    from eval.activations import check_steering_layer, default_layer
    from eval.evaluate import check_coefficients
    from eval.experiments.cross_source import functional_similarity, heldout_spans
    from model_loading import load_model_and_tokenizer, model_config, model_label

    started = time.time()
    output = check_writable(args.output, "--output")
    paths = {"prompt": args.prompt_diff, "ab": args.ab_diff}
    diffs = {name: lu.load_lora_diff(path) for name, path in paths.items()}
    for path in args.comparators:
        diff = lu.load_lora_diff(path)
        from_ab = (diff.metadata.get("source") or {}).get("kind") == "ab"  # a trait may come twice: from prompts and from A/B
        name = f"other:{diff.metadata.get('trait') or path}{' (A/B)' if from_ab else ''}"
        if name in diffs:
            raise PersonaLoRAError(f"--comparators: two diffs are both {name}; pass one per trait and source")
        paths[name], diffs[name] = path, diff
    items = load_ab_source(args.ab_items, "--ab_items")[:args.max_items]
    check_pair(args.prompt_diff, args.ab_diff, diffs, args.ab_items)
    check_coefficients(args.model, args.dtype, list(diffs.values()), [[1.0]] * len(diffs), "--prompt_diff/--ab_diff/--comparators")
    answers = read_unsteered_answers(args.answers, args.max_answers)
    num_layers = model_config(args.model).num_hidden_layers
    layer = default_layer(num_layers) if args.layer is None else args.layer
    check_steering_layer(layer, num_layers)

    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype)
    span_sets = heldout_spans(tokenizer, items, answers)
    report = functional_similarity(model, tokenizer, span_sets, diffs, layer, args.null_draws, args.seed, args.batch_size,
                                   label=args.trait)
    report.update(trait=args.trait, model=model_label(args.model), diffs={k: str(v) for k, v in paths.items()},
                  inputs={"ab_items": str(args.ab_items), "items": len(items), "answers": str(args.answers),
                          "unsteered_answers": len(answers)})
    write_json(output, report)
    write_manifest(output.parent, args, started, name=f"{output.stem}.manifest.json", outputs={"similarity": str(output)})
    per_input = ", ".join(f"{name} {entry['weighted_cosine']:+.4f}" for name, entry in report["by_input"].items())
    nulls = "; ".join(f"{name}: z {test['z']:+.1f}" for name, test in report["null_random"].items())
    print(f"{args.trait}: data-weighted cosine {report['weighted_cosine']:+.4f} over {report['tokens']} held-out answer tokens "
          f"({per_input}); {nulls}; wrote {output}")


def summarize(args) -> None:
    from eval.experiments.cross_source import plot_report, print_report, summarize as summarize_report

    started = time.time()
    output_dir = check_writable_dir(args.output_dir, "--output_dir")
    report = summarize_report(output_dir, args.traits)
    write_json(output_dir / "summary.json", report)
    plot_report(report, output_dir / "cross_source.png")
    write_manifest(output_dir, args, started, name="summary.manifest.json", outputs={"summary": str(output_dir / "summary.json")})
    print_report(report)
    print(f"wrote {output_dir / 'summary.json'}, {output_dir / 'cross_source.png'}")


def main():
    parser = ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser("similarity")
    sim.add_argument("--trait", required=True)
    sim.add_argument("--prompt_diff", required=True, help="the prompt-derived persona diff")
    sim.add_argument("--ab_diff", required=True, help="the A/B-derived persona diff (extract_persona_lora.py --ab_source)")
    sim.add_argument("--comparators", nargs="*", default=[], help="other traits' diffs, set beside the pair")
    sim.add_argument("--ab_items", required=True, help="the public held-out items (the A/B extraction's ab_evaluation.jsonl)")
    sim.add_argument("--answers", required=True, help="a judged run's CSV: its unsteered answers to the evaluation questions")
    sim.add_argument("--max_items", type=positive_int, default=16, help="held-out public items read (each with both answers)")
    sim.add_argument("--max_answers", type=positive_int, default=32, help="unsteered answers read (one per question)")
    sim.add_argument("--output", required=True, help="the report (.json); its manifest is written beside it")
    sim.add_argument("--null_draws", type=positive_int, default=1000,
                     help="random matched diffs per direction (the Monte Carlo p is at least 1/(N+1): enough to survive Holm)")
    sim.add_argument("--layer", type=int, default=None, help="the residual stream's layer (default: two thirds of the depth)")
    sim.add_argument("--model", default=None)
    sim.add_argument("--dtype", default="auto")
    sim.add_argument("--batch_size", type=positive_int, default=8)
    sim.add_argument("--seed", type=non_negative_int, default=0)
    summary = commands.add_parser("summarize")
    summary.add_argument("--output_dir", required=True)
    summary.add_argument("--traits", nargs="+", required=True)
    args = parser.parse_args()
    similarity(args) if args.command == "similarity" else summarize(args)


if __name__ == "__main__":
    run_cli(main)
