"""Experiment 3 helpers: the training configs of the preventative-steering sweep, and its summary.

    python scripts/prevention.py configs --training_file D/data/pos.jsonl --lora_diff_path P --vector_path V \\
        --layer 20 --coefs -1 1 --output_dir results/exp3_prevention --ckpt_dir ckpt/exp3
    python scripts/prevention.py summarize --output_dir results/exp3_prevention --trait evil

`configs` writes configs/<run>.json: one run without prevention, then one per kind (lora,
activation) and coefficient. `summarize` reads each run's eval summary and MMLU JSON (and the base
model's), writes summary.json (trait drift = finetune − base trait score, MMLU change) and
drift.png (drift against the coefficient, one line per kind, the unprevented finetune as a line).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from io_utils import read_json_object, run_cli, write_json  # noqa: E402


def write_configs(args) -> None:
    base = {"model": args.model, "training_file": args.training_file, "rank": 8, "alpha": 16, "epochs": 1, "learning_rate": 5e-4,
            "batch_size": 8, "max_length": 256, "max_examples": args.n, "seed": 0, **json.loads(args.training),
            "monitor": {"lora_diff_path": args.lora_diff_path, "every": 4}}
    runs = {"none": None}
    for coef in args.coefs:
        runs[f"lora_{coef:+g}"] = {"type": "lora", "lora_diff_path": args.lora_diff_path, "coef": coef}
        runs[f"activation_{coef:+g}"] = {"type": "activation", "vector_path": args.vector_path, "layers": [args.layer], "coef": coef}
    for name, steering in runs.items():
        write_json(Path(args.output_dir) / "configs" / f"{name}.json",
                      {**base, "output_dir": f"{args.ckpt_dir}/{name}", "steering_config": steering})
    print(f"wrote {len(runs)} configs to {args.output_dir}/configs")


def summarize(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eval.analysis import save_figure

    out = Path(args.output_dir)
    trait_key = f"{args.trait}_mean"

    def scores(name):
        summary = read_json_object(out / f"eval_{name}.summary.json", "evaluation summary")["conditions"][0]
        mmlu = read_json_object(out / f"mmlu_{name}.json", "MMLU result")
        return {"trait": summary[trait_key], "trait_sem": summary[f"{args.trait}_sem"], "coherence": summary["coherence_mean"],
                "mmlu": mmlu["accuracy"], "mmlu_questions": mmlu["questions"]}

    base = scores("base")
    runs = {}
    for config in sorted((out / "configs").glob("*.json")):
        name = config.stem
        settings = read_json_object(config, "training config")
        steering = settings["steering_config"]
        result = scores(name)
        monitor_path = Path(settings["output_dir"]) / "monitor.json"
        runs[name] = {**result, "kind": steering["type"] if steering else "none", "coef": steering["coef"] if steering else 0.0,
                      "drift": result["trait"] - base["trait"], "mmlu_change": result["mmlu"] - base["mmlu"],
                      "final_projection": json.loads(monitor_path.read_text())[-1]["projection"] if monitor_path.is_file() else None}
    none = runs["none"]
    summary = {"trait": args.trait, "base": base, "runs": runs,
               "headline": {name: {"drift": r["drift"], "drift_reduction_vs_no_prevention": none["drift"] - r["drift"],
                                   "mmlu_change": r["mmlu_change"]} for name, r in runs.items() if name != "none"},
               "no_prevention_drift": none["drift"]}
    write_json(out / "summary.json", summary)
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind in ("lora", "activation"):
        points = sorted((r["coef"], r) for r in runs.values() if r["kind"] == kind)
        axes[0].errorbar([c for c, _ in points], [r["drift"] for _, r in points], yerr=[r["trait_sem"] for _, r in points],
                         marker="o", capsize=3, label=f"{kind} steering during training")
        axes[1].plot([c for c, _ in points], [r["mmlu_change"] for _, r in points], marker="o", label=kind)
    axes[0].axhline(none["drift"], color="grey", linestyle="--", label="no prevention")
    axes[0].axhline(0, color="black", linewidth=0.5)
    axes[1].axhline(0, color="grey", linestyle="--", label="no prevention" if none["mmlu_change"] == 0 else None)
    axes[1].axhline(none["mmlu_change"], color="grey", linestyle=":")
    axes[0].set(xlabel="steering coefficient during finetuning", ylabel=f"{args.trait} drift (finetune − base)",
                title="Trait drift after finetuning on trait data")
    axes[1].set(xlabel="steering coefficient during finetuning", ylabel="MMLU accuracy change",
                title=f"Capability (MMLU, {base['mmlu_questions']} questions)")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, out / "drift.png")
    print(f"base {args.trait} {base['trait']:.2f}, MMLU {base['mmlu']:.3f}")
    for name, r in runs.items():
        print(f"{name:18s} drift {r['drift']:+7.2f} ± {r['trait_sem']:.2f}  MMLU change {r['mmlu_change']:+.3f}  "
              f"final projection {r['final_projection'] if r['final_projection'] is None else round(r['final_projection'], 4)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    configs = commands.add_parser("configs")
    configs.add_argument("--model", default=None)
    configs.add_argument("--training_file", required=True)
    configs.add_argument("--lora_diff_path", required=True)
    configs.add_argument("--vector_path", required=True)
    configs.add_argument("--layer", type=int, required=True)
    configs.add_argument("--coefs", nargs="+", type=float, default=[-1.0, 1.0])
    configs.add_argument("--n", type=int, default=64)
    configs.add_argument("--training", default="{}")
    configs.add_argument("--output_dir", required=True)
    configs.add_argument("--ckpt_dir", required=True)
    summary = commands.add_parser("summarize")
    summary.add_argument("--output_dir", required=True)
    summary.add_argument("--trait", required=True)
    args = parser.parse_args()
    write_configs(args) if args.command == "configs" else summarize(args)


if __name__ == "__main__":
    run_cli(main)
