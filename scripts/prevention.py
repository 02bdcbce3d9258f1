"""Experiment 3 helpers: the training configs of the preventative-steering sweep, and its summary.

    python scripts/prevention.py configs --training_file F/pos.jsonl --lora_diff_path P --vector_path V \
        --layer 20 --coefs -1 1 --n 160 --output_dir results/exp3_prevention --ckpt_dir ckpt/exp3
    python scripts/prevention.py summarize --output_dir results/exp3_prevention --trait evil

`configs` writes configs/<run>.json and runs.txt: one run without prevention, then one per kind
(lora, activation) and coefficient. `summarize` reads each run's evaluation summary (eval_<run>),
A/B summary (ab_<run>, if any) and MMLU JSON, and the base model's, and writes summary.json and
drift.png. Drift = finetune − base, paired by question (the same held-out questions and sampling
seeds) for the judged score, coherence and the judge-free margin, by item for A/B and MMLU; each
prevention setting is also compared with the unprevented finetune, paired the same way. Drift is
"shown" by a measure when the unprevented finetune's drift is at least 3 of its standard errors:
prevention can only be judged where there was drift to prevent. Base and finetunes must be
measured one way (judge, settings, reference answers, A/B file), or summarize refuses.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.ab import balanced_with_error  # noqa: E402
from eval.analysis import save_figure  # noqa: E402
from eval.stats import mean_and_sem, paired_difference  # noqa: E402
from io_utils import (  # noqa: E402
    ArgumentParser,
    PersonaLoRAError,
    atomic_path,
    finite_float,
    positive_int,
    read_json_object,
    run_cli,
    write_json,
)

DRIFT_SHOWN_SIGMAS = 3.0
TRAINING = {"method": "lora", "rank": 8, "alpha": 16, "epochs": 2, "learning_rate": 5e-4, "batch_size": 8, "max_length": 256, "seed": 0}


def write_configs(args) -> None:
    base = {"model": args.model, "training_file": args.training_file, **TRAINING, "max_examples": args.n, **json.loads(args.training),
            "monitor": {"lora_diff_path": args.lora_diff_path, "every": 4}}
    runs = {"none": None}
    for coef in args.coefs:
        runs[f"lora_{coef:+g}"] = {"type": "lora", "lora_diff_path": args.lora_diff_path, "coef": coef}
        runs[f"activation_{coef:+g}"] = {"type": "activation", "vector_path": args.vector_path, "layers": [args.layer], "coef": coef}
    output_dir = Path(args.output_dir)
    for name, steering in runs.items():
        write_json(output_dir / "configs" / f"{name}.json", {**base, "output_dir": f"{args.ckpt_dir}/{name}", "steering_config": steering})
    with atomic_path(output_dir / "runs.txt") as tmp:
        tmp.write_text("".join(f"{name}\n" for name in runs))
    print(f"wrote {len(runs)} configs to {output_dir}/configs ({', '.join(runs)})")


def judged(out: Path, name: str) -> dict:
    summary = read_json_object(out / f"eval_{name}.summary.json", "evaluation summary")
    if len(summary.get("conditions", [])) != 1:
        raise PersonaLoRAError(f"{out / f'eval_{name}.summary.json'} should hold one condition")
    return {**summary["conditions"][0], "made_by": {key: summary.get(key) for key in ("judge", "settings", "references_sha256")},
            "judge": summary.get("judge_description"), "judge_quality": summary.get("judge_quality")}


def forced_choice(out: Path, name: str) -> dict | None:
    path = out / f"ab_{name}.summary.json"
    if not path.is_file():
        return None
    summary = read_json_object(path, "A/B summary")
    if len(summary.get("conditions", [])) != 1:
        raise PersonaLoRAError(f"{path} should hold one condition")
    return {**summary["conditions"][0], "made_by": {key: summary.get(key) for key in ("ab_data", "items")}}


def paired(run: dict, base: dict, metric: str) -> dict:
    mean, sem, n = paired_difference(run[f"{metric}_by_question"], base[f"{metric}_by_question"])
    return {"mean": mean, "sem": sem, "questions": n, "sigmas": mean / sem if sem else float("nan")}


def ab_paired(run: dict | None, base: dict | None) -> dict | None:
    """The A/B change, item by item, balanced over the matching answer's position."""
    if run is None or base is None:
        return None
    by_position = {True: [], False: []}
    for item, value in run["both_orders_by_item"].items():
        by_position[run["matching_first_by_item"][item]].append(value - base["both_orders_by_item"][item])
    mean, sem = balanced_with_error(by_position)
    return {"mean": mean, "sem": sem, "items": len(run["both_orders_by_item"]), "sigmas": mean / sem if sem else float("nan")}


def mmlu_change(run: dict, base: dict) -> dict:
    if run.get("seed") != base.get("seed") or len(run["correct_by_question"]) != len(base["correct_by_question"]):
        raise PersonaLoRAError("the MMLU runs used different question subsets: rerun them with the same --n and --seed")
    mean, sem, n = mean_and_sem(r - b for r, b in zip(run["correct_by_question"], base["correct_by_question"]))
    return {"mean": mean, "sem": sem, "questions": n}


def same_measurement(measured: dict[str, dict], what: str) -> None:
    """Drift subtracts the base's measurement from each finetune's: they must be made one way."""
    first_name, first = next(iter(measured.items()))
    for name, made_by in measured.items():
        if made_by != first:
            differing = sorted(k for k in made_by if made_by.get(k) != first.get(k))
            raise PersonaLoRAError(f"{what} of {name} and {first_name} were measured differently ({', '.join(differing)}): "
                                   "rerun them with one judge, one set of settings and one set of reference answers")


def summarize(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.output_dir)
    names = (out / "runs.txt").read_text().split() if (out / "runs.txt").is_file() else []
    if "none" not in names:
        raise PersonaLoRAError(f"{out / 'runs.txt'} lists no unprevented run: run 'prevention.py configs' first")
    trait = args.trait
    evaluations = {name: judged(out, name) for name in ["base", *names]}
    choices = {name: forced_choice(out, name) for name in ["base", *names]}
    same_measurement({name: e["made_by"] for name, e in evaluations.items()}, "the evaluations")
    if any(choices.values()):  # every run that has an A/B summary is paired below: all of them made one way
        same_measurement({name: c["made_by"] for name, c in choices.items() if c}, "the A/B runs")
    base, base_mmlu = evaluations["base"], read_json_object(out / "mmlu_base.json", "MMLU result")
    runs = {}
    for name in names:
        settings = read_json_object(out / "configs" / f"{name}.json", "training config")
        steering = settings["steering_config"]
        result, mmlu = evaluations[name], read_json_object(out / f"mmlu_{name}.json", "MMLU result")
        monitor_path = Path(settings["output_dir"]) / "monitor.json"
        monitor = json.loads(monitor_path.read_text()) if monitor_path.is_file() else []
        final = next((m for m in monitor if m.get("final")), None)
        runs[name] = {"kind": steering["type"] if steering else "none", "coef": steering["coef"] if steering else 0.0,
                      "trait": result[f"{trait}_mean"], "coherence": result["coherence_mean"], "margin": result.get("margin_mean"),
                      "drift": paired(result, base, trait), "coherence_drift": paired(result, base, "coherence"),
                      "margin_drift": paired(result, base, "margin"), "ab_drift": ab_paired(choices[name], choices["base"]),
                      "mmlu": mmlu["accuracy"], "mmlu_change": mmlu_change(mmlu, base_mmlu),
                      "final_projection": final["projection"] if final else None, "final_cosine": final["cosine"] if final else None}
    none = runs["none"]
    for name, run in runs.items():  # prevention: each setting against the unprevented finetune, paired
        run["vs_no_prevention"] = {"trait": paired(evaluations[name], evaluations["none"], trait),
                                   "margin": paired(evaluations[name], evaluations["none"], "margin"),
                                   "ab": ab_paired(choices[name], choices["none"])}
    shown = {measure: none[key]["sigmas"] for measure, key in (("judged", "drift"), ("margin", "margin_drift"), ("ab", "ab_drift"))
             if none[key] is not None}
    summary = {"trait": trait, "judge": base["judge"], "judge_quality": base["judge_quality"],
               "base": {"trait": base[f"{trait}_mean"], "trait_sem": base[f"{trait}_sem"], "margin": base.get("margin_mean"),
                        "mmlu": base_mmlu["accuracy"], "mmlu_questions": base_mmlu["questions"]},
               "runs": runs, "errors": "drifts are finetune − base and prevention effects setting − unprevented finetune, paired "
                                       "by question (A/B and MMLU: by item); one training seed per setting, so the errors are "
                                       "those of the measurement, not of training",
               "unprevented_drift_sigmas": shown,
               "drift_shown": {measure: bool(sigmas >= DRIFT_SHOWN_SIGMAS) for measure, sigmas in shown.items()},
               "headline": {name: {"drift": r["drift"], "margin_drift": r["margin_drift"], "ab_drift": r["ab_drift"],
                                   "mmlu_change": r["mmlu_change"], "vs_no_prevention": r["vs_no_prevention"]}
                            for name, r in runs.items() if name != "none"}}
    write_json(out / "summary.json", summary)

    measures = [("drift", f"{trait} drift, judged (finetune − base)"), ("margin_drift", "margin drift, no judge (nats/token)"),
                ("ab_drift", "A/B p_matching drift, no judge"), ("mmlu_change", f"MMLU change ({base_mmlu['questions']} questions)")]
    measures = [(key, label) for key, label in measures if none[key] is not None]
    figure, axes = plt.subplots(1, len(measures), figsize=(5 * len(measures), 4))
    for kind in ("lora", "activation"):
        points = sorted((r["coef"], r) for r in runs.values() if r["kind"] == kind)
        if not points:
            continue
        for axis, (key, _) in zip(axes, measures):
            axis.errorbar([c for c, _ in points], [r[key]["mean"] for _, r in points], yerr=[r[key]["sem"] for _, r in points],
                          marker="o", capsize=3, label=f"{kind} steering during training")
    for axis, (key, label) in zip(axes, measures):
        axis.axhline(none[key]["mean"], color="grey", linestyle="--", label=f"no prevention ({none[key]['mean']:+.3g} ± {none[key]['sem']:.2g})")
        axis.axhline(0, color="black", linewidth=0.5)
        axis.set(xlabel="steering coefficient during finetuning", ylabel=label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle("Preventative steering, errors paired with the base model; unprevented drift: "
                    + ", ".join(f"{m} {s:.1f}σ" for m, s in shown.items()), fontsize=9)
    figure.tight_layout()
    save_figure(figure, out / "drift.png")
    print(f"base {trait} {base[f'{trait}_mean']:.2f}, margin {base.get('margin_mean', float('nan')):+.4f}, MMLU {base_mmlu['accuracy']:.3f}")
    print("unprevented drift: " + ", ".join(f"{m} {s:+.1f} standard errors" for m, s in shown.items()))
    for name, r in runs.items():
        projection = "—" if r["final_projection"] is None else f"{r['final_projection']:+.4f}"
        ab = "" if r["ab_drift"] is None else f"  A/B {r['ab_drift']['mean']:+.3f} ± {r['ab_drift']['sem']:.3f}"
        print(f"{name:18s} drift {r['drift']['mean']:+7.2f} ± {r['drift']['sem']:.2f}  margin {r['margin_drift']['mean']:+.4f} ± "
              f"{r['margin_drift']['sem']:.4f}{ab}  MMLU {r['mmlu_change']['mean']:+.3f} ± {r['mmlu_change']['sem']:.3f}  "
              f"final projection {projection}")


def main():
    parser = ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    configs = commands.add_parser("configs")
    configs.add_argument("--model", default=None)
    configs.add_argument("--training_file", required=True)
    configs.add_argument("--lora_diff_path", required=True)
    configs.add_argument("--vector_path", required=True)
    configs.add_argument("--layer", type=int, required=True)
    configs.add_argument("--coefs", nargs="+", type=finite_float, default=[-1.0, 1.0])
    configs.add_argument("--n", type=positive_int, default=160)
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
