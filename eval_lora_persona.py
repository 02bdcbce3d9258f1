"""Stage 2: evaluate a model with persona LoRAs merged into its weights.

    # Baseline (no steering)
    python eval_lora_persona.py --trait evil --output_path results/baseline.csv
    # Steered at α = 2.0, or a sweep of coefficients in one process (restored between them)
    python eval_lora_persona.py --trait evil --lora_diff_path persona_loras/SmolLM2-135M-Instruct/evil/evil_lora_diff.pt \\
        --lora_coef 2.0 --output_path results/lora_steer_2.0.csv
    # Composition: several diffs, one coefficient each, merged together
    python eval_lora_persona.py --trait evil --lora_diff_path evil.pt sycophancy.pt --lora_coef 1.5 -0.5 --output_path results/combo.csv
    # ... and several combinations in one process: the coefficients in groups of one per diff
    python eval_lora_persona.py --trait evil --lora_diff_path evil.pt sycophancy.pt --lora_coef 0 0  2 0  0 2  2 2 --output_path results/grid.csv
    # A finetune (PEFT adapter or full checkpoint of --model)
    python eval_lora_persona.py --trait evil --adapter ckpt/SmolLM2-135M-Instruct/my_finetune --output_path results/ft.csv
    # Forced choice instead of generation: A/B items in the public format, no judge
    python eval_lora_persona.py --trait sycophancy --ab_data dataset/sycophancy/ab.jsonl \\
        --lora_diff_path D --lora_coef -2 0 2 --output_path results/ab.csv

Answers the trait's held-out evaluation questions, judges each for the trait and for coherence,
and writes one CSV row per answer (question_id, question, prompt, answer, <trait>, coherence,
coef, method), a .summary.json (per condition: means with standard errors clustered by question,
the judge-free log-likelihood margin, changes against the unsteered condition paired by question,
the judge and its measured quality) and a .manifest.json. With several diffs the rows also carry
one coef_<trait> column per diff (coef is then the first diff's) and each summary condition its
{trait: coefficient}. With --ab_data the CSV has one row per item and condition (question_id,
question, coef, method, p_matching, p_matching_swapped, ...) and the summary the balanced
p_matching per condition, its paired change against coefficient 0 and the slope per unit coefficient.
"""

from pathlib import Path

import lora_utils as lu
from eval.evaluate import Condition, add_eval_args, check_coefficients, load_eval_model, on_finetune, prepare_evaluation
from eval.evaluate import run_evaluation
from io_utils import ArgumentParser, file_identity, finite_float, run_cli


def parse_args():
    parser = ArgumentParser(description=__doc__)
    add_eval_args(parser)
    parser.add_argument("--lora_diff_path", nargs="+", default=None, help="persona diff(s) (.pt or .safetensors)")
    parser.add_argument("--lora_coef", nargs="+", type=finite_float, default=None,
                        help="with one diff: the coefficient(s) to sweep; with several: one coefficient per diff, "
                             "repeated in groups to evaluate several combinations")
    parser.add_argument("--backup_device", default=None, help="where LoRAMerger keeps its backups (e.g. cpu)")
    args = parser.parse_args()
    if args.lora_diff_path and not args.lora_coef:
        args.lora_coef = [1.0]
    if args.lora_coef and not args.lora_diff_path:
        parser.error("--lora_coef needs --lora_diff_path")
    if args.lora_diff_path and len(args.lora_coef) % len(args.lora_diff_path):
        parser.error(f"{len(args.lora_diff_path)} diffs need their coefficients in groups of {len(args.lora_diff_path)} "
                     f"(one per diff for each combination), got {len(args.lora_coef)}")
    return args


def diff_labels(paths, diffs) -> list[str]:
    """A short, unique name per diff for condition names and columns: its trait, else its file name."""
    labels = []
    for path, diff in zip(paths, diffs):
        label = str(diff.metadata.get("trait") or Path(path).stem)
        labels.append(label if label not in labels else f"{label}_{len(labels) + 1}")
    return labels


def coefficient_groups(args) -> list[list[float]]:
    """--lora_coef read in groups of one coefficient per diff; with one diff, one group per coefficient."""
    k = len(args.lora_diff_path)
    return [args.lora_coef[i:i + k] for i in range(0, len(args.lora_coef), k)]


def lora_conditions(args, model, diffs) -> list[Condition]:
    identity = {"diffs": [file_identity(p) for p in args.lora_diff_path]}

    def merged(terms):
        # A zero coefficient is no merge at all: the all-zero combination is the unsteered model.
        return lambda: lu.LoRASteerer.compose(model, [(d, c) for d, c in terms if c != 0], backup_device=args.backup_device)

    if len(diffs) == 1:
        return [Condition(f"lora_coef{c:g}", "lora", c, merged([(diffs[0], c)]), identity=identity) for c in args.lora_coef]
    labels = diff_labels(args.lora_diff_path, diffs)
    conditions = []
    for coefs in coefficient_groups(args):
        name = "lora_" + "_".join(f"{label}{c:+g}" for label, c in zip(labels, coefs))
        conditions.append(Condition(name, "lora_composed", coefs[0], merged(list(zip(diffs, coefs))), identity=identity,
                                    coefs=dict(zip(labels, coefs))))
    return conditions


def main():
    args = parse_args()
    # Everything that can be refused is refused here, before the model loads; the judge comes last
    # because making it costs seconds.
    diffs = [lu.load_lora_diff(p) for p in args.lora_diff_path or []]
    if diffs:  # a diff for another model, or a coefficient too large for its weights
        check_coefficients(args.model, args.dtype, diffs, list(zip(*coefficient_groups(args))), "--lora_coef")
    run = prepare_evaluation(args)
    model, tokenizer = load_eval_model(run)
    if diffs:
        conditions = lora_conditions(args, model, diffs)
    else:
        conditions = [Condition("baseline", "baseline", 0.0)]
    run_evaluation(run, on_finetune(run, model, conditions), model, tokenizer)


if __name__ == "__main__":
    run_cli(main)
