"""Experiment 3, preventative steering: the command line of eval/experiments/prevention.py.

    python scripts/prevention.py configs --training_file F/pos.jsonl --control_file F/neg.jsonl --lora_diff_path P \
        --vector_path V --coefs -1 0.25 0.5 1 2 --n 128 --output_dir results/exp3_prevention --ckpt_dir ckpt/exp3
    python scripts/prevention.py summarize --output_dir results/exp3_prevention --trait evil

`configs` writes configs/<run>.json and runs.txt: one run without prevention (and once more with the
next seed, none_reseeded: what a seed alone changes), a control finetune on
other data (--control_file: the trait's neg-prompted answers or another trait's data; the drift any
finetuning causes), then one per kind (lora, activation) and coefficient of --coefs (default -1
0.25 0.5 1 2); the activation runs steer at --layer (default: two thirds of the model's depth), checked
against the model with the vector. Every run holds out the answers to the same 8 questions
(--training '{"heldout_questions": N}' changes it). `summarize` reads each run's evaluation summary
(eval_<run>), A/B summary (ab_<run>, if any), MMLU JSON and finetune_report.json, and the base
model's, and writes summary.json, table.md and drift.png: each finetune's drift from the base model, its
update's norm ‖W_ft − W‖_F (one Frobenius norm over all modules) and held-out loss (plain model,
steering removed, and under its training steering), and each prevention setting against the
unprevented finetune, paired by question or item, with sign-flip p-values, the fraction of drift it
prevented and the trend over the coefficient; Holm over every p; prevention is assessed per measure
only where the unprevented drift survives Holm.
"""

import json
from pathlib import Path


from eval.activations import check_vector_fits
from eval.experiments.prevention import DEFAULT_COEFS, markdown_table, plot_drift, print_summary, summarize, training_configs
from io_utils import ArgumentParser, atomic_path, finite_float, positive_int, run_cli, write_json
from model_loading import model_config


def write_configs(args) -> None:
    _, layer = check_vector_fits(args.vector_path, model_config(args.model), args.layer)  # the default layer when none is given
    runs = training_configs(args.model, args.training_file, args.control_file, args.lora_diff_path, args.vector_path, layer,
                            args.coefs, args.n, json.loads(args.training), args.ckpt_dir)
    output_dir = Path(args.output_dir)
    for name, config in runs.items():
        write_json(output_dir / "configs" / f"{name}.json", config)
    with atomic_path(output_dir / "runs.txt") as tmp:
        tmp.write_text("".join(f"{name}\n" for name in runs))
    print(f"wrote {len(runs)} configs to {output_dir}/configs ({', '.join(runs)})")


def write_summary(args) -> None:
    out = Path(args.output_dir)
    summary = summarize(out, args.trait)
    write_json(out / "summary.json", summary)
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text(markdown_table(summary))
    plot_drift(out / "drift.png", summary)
    print_summary(summary)


def main():
    parser = ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    configs = commands.add_parser("configs")
    configs.add_argument("--model", default=None)
    configs.add_argument("--training_file", required=True)
    configs.add_argument("--control_file", default=None,
                         help="other data (the trait's neg-prompted answers, or another trait's): a control finetune, trained alike")
    configs.add_argument("--lora_diff_path", required=True)
    configs.add_argument("--vector_path", required=True)
    configs.add_argument("--layer", type=int, default=None,
                         help="the activation runs' steered layer (default: two thirds of the depth)")
    configs.add_argument("--coefs", nargs="+", type=finite_float, default=DEFAULT_COEFS)
    configs.add_argument("--n", type=positive_int, default=128)
    configs.add_argument("--training", default="{}")
    configs.add_argument("--output_dir", required=True)
    configs.add_argument("--ckpt_dir", required=True)
    summary = commands.add_parser("summarize")
    summary.add_argument("--output_dir", required=True)
    summary.add_argument("--trait", required=True)
    args = parser.parse_args()
    write_configs(args) if args.command == "configs" else write_summary(args)


if __name__ == "__main__":
    run_cli(main)
