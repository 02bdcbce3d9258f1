"""The summary of scripts/ab_fewshot.sh: per trait and extraction setting (few-shot K), the A/B
balanced p_matching of the persona LoRA and of the vector at every coefficient (with its change
against coefficient 0, paired by item), their A/B and judge-free margin slopes, and how separable
the extraction's pos and neg answers were (the offline judge's AUROC on them; the judge never saw
them). Writes summary.json, table.md (the README's table) and ab.png.

    python scripts/ab_summary.py --traits evil sycophancy --fewshot 4 0 --output_dir results/exp6_ab
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.analysis import save_figure  # noqa: E402
from io_utils import ArgumentParser, atomic_path, non_negative_int, read_json_object, run_cli, write_json  # noqa: E402
from model_loading import persona_dir  # noqa: E402

METHODS = {"lora": "persona LoRA", "vector": "activation vector"}


def extraction_dir(model, trait: str, k: int, default_k: int) -> Path:
    return persona_dir(model, trait) if k == default_k else Path(f"{persona_dir(model, trait)}_k{k}")


def collect(args) -> dict:
    report = {}
    for trait in args.traits:
        report[trait] = {}
        for k in args.fewshot:
            separability = read_json_object(extraction_dir(args.model, trait, k, args.fewshot[0]) / "summary.json",
                                            "extraction summary").get("separability") or {}
            entry = {"separability_auroc": separability.get("judge_auroc_pos_vs_neg")}
            for method in METHODS:
                summary = read_json_object(Path(args.output_dir) / f"{trait}_k{k}_{method}.summary.json", "A/B summary")
                slope = next(iter(summary["slopes"].values()))
                margin = next(iter(summary["margin_slopes"].values()), None)
                entry[method] = {
                    "points": {c["coef"]: {"p": c["balanced_p_matching_both_orders"],
                                           "change": c["change_vs_baseline"]["balanced_p_matching_both_orders"],
                                           "change_sem": c["change_vs_baseline"]["balanced_p_matching_both_orders_sem"],
                                           "p_first_choice": c["p_first_choice"]} for c in summary["conditions"]},
                    "ab_slope": slope["slope"], "ab_slope_sem": slope["slope_sem"],
                    "margin_slope": margin["slope"] if margin else None, "margin_slope_sem": margin["slope_sem"] if margin else None,
                    "items": summary["items"]}
            report[trait][f"k{k}"] = entry
    return report


def table(report: dict, coefficients: list[float]) -> str:
    header = ("| trait | demonstrations | method | " + " | ".join(f"{c:+g}" for c in coefficients)
              + " | A/B slope | margin slope | pos/neg AUROC |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for trait, settings in report.items():
        for setting, entry in settings.items():
            for method, label in METHODS.items():
                m = entry[method]
                cells = []
                for c in coefficients:
                    point = m["points"].get(c)
                    cells.append("—" if point is None else f"{point['p']:.3f}" if c == 0 else
                                 f"{point['p']:.3f} ({point['change']:+.3f} ± {point['change_sem']:.3f})")
                margin = "—" if m["margin_slope"] is None else f"{m['margin_slope']:+.4f} ± {m['margin_slope_sem']:.4f}"
                auroc = "—" if entry["separability_auroc"] is None else f"{entry['separability_auroc']:.3f}"
                lines.append(f"| {trait} | {setting[1:]} | {label} | " + " | ".join(cells)
                             + f" | {m['ab_slope']:+.4f} ± {m['ab_slope_sem']:.4f} | {margin} | {auroc} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traits = list(report)
    figure, axes = plt.subplots(1, len(traits), figsize=(4.2 * len(traits), 3.8), squeeze=False)
    for axis, trait in zip(axes[0], traits):
        for setting, entry in report[trait].items():
            for method, label in METHODS.items():
                points = sorted(entry[method]["points"].items())
                axis.errorbar([c for c, _ in points], [p["p"] for _, p in points], yerr=[p["change_sem"] for _, p in points],
                              marker="o" if method == "lora" else "s", linestyle="-" if setting != "k0" else ":", capsize=3,
                              label=f"{label}, K={setting[1:]}")
        axis.axhline(0.5, color="grey", linewidth=0.5)
        axis.set(title=trait, xlabel="steering coefficient", ylabel="balanced p_matching (both orders)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
    figure.suptitle("Forced choice (no judge): p of the trait's answer, ± paired s.e. of the change from 0", fontsize=9)
    figure.tight_layout()
    save_figure(figure, path)


def main():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--traits", nargs="+", required=True)
    parser.add_argument("--fewshot", nargs="+", type=non_negative_int, required=True, help="the settings compared, the default first")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args()
    report = collect(args)
    output_dir = Path(args.output_dir)
    write_json(output_dir / "summary.json", report)
    coefficients = sorted({c for settings in report.values() for e in settings.values() for c in e["lora"]["points"]})
    markdown = table(report, coefficients)
    with atomic_path(output_dir / "table.md") as tmp:
        tmp.write_text(markdown)
    plot(report, output_dir / "ab.png")
    print(markdown)


if __name__ == "__main__":
    run_cli(main)
