"""Experiment 3, preventative steering: the training configs of the sweep, and its summary.

`training_configs` makes one config per run: one without prevention, a control finetune trained
alike on other data (the trait's neg-prompted answers, or another trait's data: the drift any
finetuning causes; the model's own unprompted answers would be flat by construction), then one per
kind (lora, activation) and coefficient of the sweep. The runs share one training seed (the same
initialisation and data order: common random numbers, so a prevention contrast is not also a
contrast of two seeds), and one more unprevented run with the next seed (none_reseeded) measures what
a change of seed alone does: the yardstick for every contrast, whose errors are otherwise the
measurement's only. (The persona diff has its own initialisation stream, so no run shares its
lora_A, and projections onto it are not inflated.) Every run
holds out the same questions' answers (training.py's heldout_questions) and reports, from its
finetune_report.json, its update's Frobenius norm ‖W_ft − W‖_F (one norm over all modules) and its
held-out loss on the plain model after the steering is removed, beside the base model's: did it
learn the task it was trained on, or did the prevention stop the learning? `summarize` reads each
run's evaluation summary (eval_<run>), A/B summary (ab_<run>, if any) and MMLU JSON, and the base
model's. Drift = finetune − base, paired by question (the same held-out questions and sampling
seeds) for the judged score, coherence and the judge-free margin, by item for A/B and MMLU; each
prevention setting is also compared with the unprevented finetune, paired the same way, on these
measures and on the held-out loss (per held-out question; plain, and under the training-time
steering, where a prevented finetune that learned the task fits as well as the unprevented one),
with the fraction of the unprevented drift it prevented (Fieller's interval) and, per kind, the
trend of each measure over the coefficient (per-question slopes). Every p the summary reports is
adjusted by Holm over all of them (p_holm). Drift is "shown" by a measure when the unprevented
finetune's drift survives Holm at 0.05; prevention is assessed per measure only where it is, and
the summary says so where it is not. The control's data are the anti-trait side of the contrast
that also defines the margin, the offline judge's negative class and the persona diff, so
unprevented − control measures the training data's side, not drift beyond any finetuning. Base and
finetunes must be measured one way (judge, settings, reference answers, A/B file), or summarize
refuses.
"""

import json
from pathlib import Path

from eval.ab import balanced_paired_test
from eval.analysis import save_figure
from eval.evaluate import measurement_identity, require_same_measurement
from eval.stats import holm, mean_and_sem, paired_slope, ratio_interval, sign_flip_test
from io_utils import PersonaLoRAError, read_json_object

DRIFT_SHOWN_ALPHA = 0.05  # the unprevented drift's Holm-adjusted p at most this: there is drift to prevent
REPLICATE = "none_reseeded"  # the unprevented finetune again with the next seed: what a seed alone changes
TRAINING = {"method": "lora", "rank": 8, "alpha": 16, "epochs": 2, "learning_rate": 5e-4, "batch_size": 8, "max_length": 256, "seed": 0,
            "heldout_questions": 8}
DEFAULT_COEFS = [-1.0, 0.25, 0.5, 1.0, 2.0]  # four strengths toward the trait, one away


def training_configs(model: str | None, training_file: str, control_file: str | None, lora_diff_path: str, vector_path: str,
                     layer: int, coefs: list[float], n: int, training: dict, ckpt_dir: str) -> dict[str, dict]:
    """The sweep's training configs by run name, in run order: no prevention, the control on
    control_file's other data (when given), then lora and activation steering at each coefficient."""
    base = {"model": model, "training_file": training_file, **TRAINING, "max_examples": n, **training,
            "monitor": {"lora_diff_path": lora_diff_path, "every": 4}}
    runs = {"none": None, REPLICATE: None}
    if control_file:  # the same finetuning on other data: the drift that any finetuning causes
        runs["control"] = None
    for coef in coefs:
        runs[f"lora_{coef:+g}"] = {"type": "lora", "lora_diff_path": lora_diff_path, "coef": coef}
        runs[f"activation_{coef:+g}"] = {"type": "activation", "vector_path": vector_path, "layers": [layer], "coef": coef}
    return {name: {**base, **({"training_file": control_file} if name == "control" else {}),
                   **({"seed": base["seed"] + 1} if name == REPLICATE else {}),
                   "output_dir": f"{ckpt_dir}/{name}", "steering_config": steering}
            for name, steering in runs.items()}


def judged(out: Path, name: str) -> dict:
    summary = read_json_object(out / f"eval_{name}.summary.json", "evaluation summary")
    if len(summary.get("conditions", [])) != 1:
        raise PersonaLoRAError(f"{out / f'eval_{name}.summary.json'} should hold one condition")
    return {**summary["conditions"][0], "made_by": measurement_identity(summary),
            "judge": summary.get("judge_description"), "judge_quality": summary.get("judge_quality")}


def forced_choice(out: Path, name: str) -> dict | None:
    path = out / f"ab_{name}.summary.json"
    if not path.is_file():
        return None
    summary = read_json_object(path, "A/B summary")
    if len(summary.get("conditions", [])) != 1:
        raise PersonaLoRAError(f"{path} should hold one condition")
    return {**summary["conditions"][0], "made_by": measurement_identity(summary)}


def contrast(mean: float, sem: float, test: dict, **counts) -> dict:
    """A paired contrast: its mean, standard error, how many standard errors that is, and its
    sign-flip p-value (exact for ≤ 16 units): with about 20 questions "3 standard errors" is a t
    with 20 degrees of freedom, not a normal, so the p-value is the figure to quote."""
    return {"mean": mean, "sem": sem, **counts, "sigmas": mean / sem if sem else float("nan"),
            "p": test["p"], "p_method": test["p_method"]}


def paired(run: dict, base: dict, metric: str) -> dict:
    """run − base of one metric, question by question (questions both measured)."""
    treated, control = run[f"{metric}_by_question"], base[f"{metric}_by_question"]
    differences = [treated[q] - control[q] for q in treated if q in control]
    mean, sem, n = mean_and_sem(differences)
    return contrast(mean, sem, sign_flip_test(differences), questions=n)


def ab_paired(run: dict | None, base: dict | None) -> dict | None:
    """The A/B change, item by item, balanced over the matching answer's position (the two
    position groups weigh equally, so a letter preference cancels)."""
    if run is None or base is None:
        return None
    test = balanced_paired_test({item: value - base["both_orders_by_item"][item] for item, value in run["both_orders_by_item"].items()},
                                run["matching_first_by_item"])
    return contrast(test["mean"], test["sem"], test, items=test["items"])


def mmlu_change(run: dict, base: dict) -> dict:
    """The accuracy change, item by item, with what this many items can resolve: a change of three
    paired standard errors (which grows with the items on which the two models disagree)."""
    if (run.get("seed"), run.get("source"), len(run["correct_by_question"])) != \
            (base.get("seed"), base.get("source"), len(base["correct_by_question"])):
        raise PersonaLoRAError("the MMLU runs used different question subsets (seed, source or --n): rerun them alike")
    differences = [r - b for r, b in zip(run["correct_by_question"], base["correct_by_question"])]
    mean, sem, n = mean_and_sem(differences)
    return {**contrast(mean, sem, sign_flip_test(differences), questions=n),
            "disagreeing_items": sum(d != 0 for d in differences), "resolvable_change": 3 * sem}


MEASURES = {"trait": "drift", "coherence": "coherence_drift", "margin": "margin_drift", "ab": "ab_drift", "mmlu": "mmlu_change"}


def versus(evaluations: dict, choices: dict, mmlus: dict, trait: str, name: str, reference: str) -> dict:
    """Run `name` against run `reference` on every measure, paired by question (A/B, MMLU: by item)."""
    return {"trait": paired(evaluations[name], evaluations[reference], trait),
            "coherence": paired(evaluations[name], evaluations[reference], "coherence"),
            "margin": paired(evaluations[name], evaluations[reference], "margin"),
            "ab": ab_paired(choices[name], choices[reference]), "mmlu": mmlu_change(mmlus[name], mmlus[reference])}




def heldout_versus(report: dict, reference: dict) -> dict | None:
    """The held-out loss of a run against the unprevented finetune's, per held-out question (the
    same answers): plain (steering removed) and, for a steered run, under its training-time steering
    (the objective it optimised). None where a report lacks per-question losses."""
    if not report.get("by_question") or not reference.get("by_question"):
        return None

    def against(by_question: dict) -> dict:
        differences = [by_question[q] - reference["by_question"][q] for q in by_question if q in reference["by_question"]]
        mean, sem, n = mean_and_sem(differences)
        return contrast(mean, sem, sign_flip_test(differences), questions=n)

    return {"plain": against(report["by_question"]),
            "steered": against(report["steered_by_question"]) if report.get("steered_by_question") else None}


def fraction_prevented(run: dict, none: dict, base: dict, key: str) -> dict:
    """Σ(unprevented − setting) / Σ(unprevented − base) over questions (items): the share of the
    unprevented drift the setting prevented, with Fieller's interval (ratio_interval)."""
    shared = [q for q in none[key] if q in run[key] and q in base[key]]
    return ratio_interval([none[key][q] - run[key][q] for q in shared], [none[key][q] - base[key][q] for q in shared])


def trends(names: list[str], runs: dict, evaluations: dict, choices: dict, trait: str) -> dict:
    """Per kind of steering, each measure's slope over the coefficient (the unprevented finetune at
    0), fit per question (A/B: per item) and averaged, with a sign-flip p: the dose-response."""
    result = {}
    for kind in ("lora", "activation"):
        swept = sorted(((runs[n]["coef"], n) for n in names if runs[n]["kind"] == kind))
        if not swept:
            continue
        points = [(0.0, "none"), *swept]
        coefs = [c for c, _ in points]
        result[kind] = {metric: contrast_of_slope(paired_slope(coefs, [evaluations[n][f"{metric}_by_question"] for _, n in points]))
                        for metric in (trait, "coherence", "margin")}
        if all(choices.get(n) for _, n in points):
            result[kind]["ab"] = contrast_of_slope(paired_slope(coefs, [choices[n]["both_orders_by_item"] for _, n in points]))
        result[kind]["coefficients"] = coefs
    return result


def contrast_of_slope(slope: dict) -> dict:
    return {"mean": slope["slope"], "sem": slope["slope_sem"], "units": slope["clusters"],
            "sigmas": slope["slope"] / slope["slope_sem"] if slope["slope_sem"] else float("nan"), "p": slope["p"],
            "p_method": slope["p_method"], "kind": "slope per unit coefficient"}


def tested_contrasts(node) -> list[dict]:
    """Every contrast (a dict with a p) anywhere in the summary, in a fixed order."""
    if isinstance(node, dict):
        found = [node] if "p" in node and "mean" in node else []
        return found + [c for key in node for c in tested_contrasts(node[key]) if key != "headline"]
    if isinstance(node, list):
        return [c for value in node for c in tested_contrasts(value)]
    return []


def summarize(out: Path, trait: str) -> dict:
    """The sweep's summary (summary.json) from the runs' measurements in `out`."""
    names = (out / "runs.txt").read_text().split() if (out / "runs.txt").is_file() else []
    if "none" not in names:
        raise PersonaLoRAError(f"{out / 'runs.txt'} lists no unprevented run: run 'prevention.py configs' first")
    evaluations = {name: judged(out, name) for name in ["base", *names]}
    choices = {name: forced_choice(out, name) for name in ["base", *names]}
    mmlus = {name: read_json_object(out / f"mmlu_{name}.json", "MMLU result") for name in ["base", *names]}
    require_same_measurement({name: e["made_by"] for name, e in evaluations.items()}, "the evaluations")
    if any(choices.values()):  # every run that has an A/B summary is paired below: all of them made one way
        require_same_measurement({name: c["made_by"] for name, c in choices.items() if c}, "the A/B runs")
    base = evaluations["base"]
    runs, reports = {}, {}
    for name in names:
        settings = read_json_object(out / "configs" / f"{name}.json", "training config")
        steering = settings["steering_config"]
        monitor_path = Path(settings["output_dir"]) / "monitor.json"
        monitor = json.loads(monitor_path.read_text()) if monitor_path.is_file() else []
        final = next((m for m in monitor if m.get("final")), None)
        report_path = Path(settings["output_dir"]) / "finetune_report.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        heldout = reports[name] = report.get("heldout") or {}
        drift = versus(evaluations, choices, mmlus, trait, name, "base")
        runs[name] = {"kind": steering["type"] if steering else name, "coef": steering["coef"] if steering else 0.0,
                      "training_file": settings.get("training_file"), "seed": settings.get("seed"),
                      "trait": evaluations[name][f"{trait}_mean"], "coherence": evaluations[name]["coherence_mean"],
                      "margin": evaluations[name].get("margin_mean"), "mmlu": mmlus[name]["accuracy"],
                      **{key: drift[measure] for measure, key in MEASURES.items()},
                      "final_projection": final["projection"] if final else None, "final_cosine": final["cosine"] if final else None,
                      "update_norm": (report.get("update") or {}).get("norm"),
                      "heldout_loss": heldout.get("loss"), "heldout_loss_base": heldout.get("base_loss"),
                      "heldout_loss_change": heldout.get("change"), "heldout_examples": heldout.get("examples"),
                      "heldout_questions": heldout.get("questions"), "heldout_loss_steered": heldout.get("steered_loss"),
                      "heldout_loss_steering_alone": heldout.get("steering_alone_loss")}
    none = runs["none"]
    unit_keys = {"trait": f"{trait}_by_question", "margin": "margin_by_question"}
    for name, run in runs.items():  # prevention: each setting against the unprevented finetune, paired
        if name in ("none", "control", REPLICATE):
            continue
        run["vs_no_prevention"] = versus(evaluations, choices, mmlus, trait, name, "none")
        run["vs_no_prevention"]["heldout_loss"] = heldout_versus(reports[name], reports["none"])
        run["fraction_prevented"] = {measure: fraction_prevented(evaluations[name], evaluations["none"], base, key)
                                     for measure, key in unit_keys.items()}
        if choices.get(name) and choices.get("none") and choices.get("base"):
            run["fraction_prevented"]["ab"] = fraction_prevented(choices[name], choices["none"], choices["base"], "both_orders_by_item")
    heldout_sets = {tuple(r["heldout_questions"]) for name, r in runs.items() if name != "control" and r["heldout_questions"]}
    if len(heldout_sets) > 1:
        raise PersonaLoRAError("the finetunes held out different questions: their held-out losses do not compare; rerun them alike")
    summary = {
        "trait": trait, "judge": base["judge"], "judge_quality": base["judge_quality"],
        "base": {"trait": base[f"{trait}_mean"], "trait_sem": base[f"{trait}_sem"], "coherence": base["coherence_mean"],
                 "margin": base.get("margin_mean"), "mmlu": mmlus["base"]["accuracy"], "mmlu_questions": mmlus["base"]["questions"]},
        "runs": runs,
        "seed_spread": versus(evaluations, choices, mmlus, trait, REPLICATE, "none") if REPLICATE in runs else None,
        "unprevented_vs_control": versus(evaluations, choices, mmlus, trait, "none", "control") if "control" in runs else None,
        "trends": trends(names, runs, evaluations, choices, trait),
        "update_norm": "‖W_ft − W‖_F: one Frobenius norm over all modules of the saved finetune's update",
        "heldout_loss": "mean next-token loss (nats/token) on the answers to held-out finetuning questions never trained "
                        "on (the control: on its own data's), on the plain model + finetune after the steering was "
                        "removed; heldout_loss_change = finetune − base model; heldout_loss_steered: with the training-time "
                        "steering on (the objective optimised), steering_alone: that steering on the base model; "
                        "vs_no_prevention.heldout_loss: per held-out question against the unprevented finetune's plain loss",
        "errors": "drifts are finetune − base and prevention effects setting − unprevented finetune, paired by question (A/B "
                  "and MMLU: by item), with sign-flip p-values (exact up to 16 units); the sweep's runs share one training "
                  "seed, so their errors are the measurement's; seed_spread (none_reseeded − none) is what a seed alone "
                  "changes; fraction_prevented: Fieller's 95 % interval",
        "control": "trained on the trait's neg-prompted answers: the anti-trait side of the contrast that also defines the "
                   "margin, the judge's negative class and the persona diff, so unprevented_vs_control measures the training "
                   "data's side, not drift beyond any finetuning",
        "headline": {name: {**{key: r[key] for key in MEASURES.values()}, "vs_no_prevention": r["vs_no_prevention"],
                            "fraction_prevented": r["fraction_prevented"]}
                     for name, r in runs.items() if "vs_no_prevention" in r}}
    family = [c for c in tested_contrasts(summary) if c["p"] == c["p"]]  # the headline repeats runs' contrasts: skipped
    for c, adjusted in zip(family, holm([c["p"] for c in family])):
        c["p_holm"] = adjusted
    summary["multiplicity"] = f"Holm over every p in this summary ({len(family)} tests): p_holm beside each p"
    measures = (("judged", "drift"), ("margin", "margin_drift"), ("ab", "ab_drift"))
    summary["unprevented_drift_sigmas"] = {m: none[key]["sigmas"] for m, key in measures if none[key] is not None}
    summary["drift_shown"] = {m: bool(none[key].get("p_holm", float("nan")) <= DRIFT_SHOWN_ALPHA) for m, key in measures if none[key] is not None}
    summary["prevention_assessable"] = {
        m: True if shown else f"no: the unprevented finetune's {m} drift does not survive Holm at {DRIFT_SHOWN_ALPHA}, so there is "
                              "no drift to prevent on it" for m, shown in summary["drift_shown"].items()}
    return summary


def plot_drift(path: Path, summary: dict) -> None:
    """Top row: each run's drift from the base model. Middle row: each prevention setting minus the
    unprevented finetune, the paired contrast that says whether prevention worked. Bottom row: did
    each finetune learn its task (update norm, held-out loss plain and under its training steering)
    and where its update points (final projection onto the persona diff), against the coefficient."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trait, runs = summary["trait"], summary["runs"]
    none = runs["none"]
    judge = (summary["judge"] or "unnamed judge").split(":")[0]
    measures = [("trait", "drift", f"{trait}, judged"), ("coherence", "coherence_drift", "coherence"),
                ("margin", "margin_drift", "margin, no judge (nats/token)"), ("ab", "ab_drift", "A/B p_matching, no judge"),
                ("mmlu", "mmlu_change", f"MMLU accuracy ({summary['base']['mmlu_questions']} items)")]
    measures = [m for m in measures if none[m[1]] is not None]
    figure, axes = plt.subplots(3, max(len(measures), 4), figsize=(4.4 * max(len(measures), 4), 11), squeeze=False)
    learning = [("update_norm", "‖W_ft − W‖_F"), ("heldout_loss", "held-out loss, steering removed (nats/token)"),
                ("heldout_loss_steered", "held-out loss under its training steering"),
                ("final_projection", "final projection onto the persona diff")]
    for column, (key, label) in enumerate(learning):
        axis = axes[2][column]
        for kind, marker in (("lora", "o"), ("activation", "s")):
            points = sorted((r["coef"], r[key]) for r in runs.values() if r["kind"] == kind and r.get(key) is not None)
            if points:
                axis.plot(*zip(*points), marker=marker, label=f"{kind} steering during training")
        reference = "heldout_loss" if key == "heldout_loss_steered" else key  # the unsteered runs' plain loss
        for name, style in (("none", "--"), (REPLICATE, ":"), ("control", "-.")):
            if name == "control" and key.startswith("heldout"):
                continue  # its held-out answers are its own data's: another loss
            if name in runs and runs[name].get(reference) is not None:
                axis.axhline(runs[name][reference], color="grey", linestyle=style,
                             label=f"{name} (plain)" if reference != key else name)
        axis.set(xlabel="steering coefficient during finetuning", ylabel=label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
    for column in range(len(measures), axes.shape[1]):
        for row in (0, 1):
            axes[row][column].axis("off")
    for column in range(len(learning), axes.shape[1]):
        axes[2][column].axis("off")
    for kind, marker in (("lora", "o"), ("activation", "s")):
        points = sorted((r["coef"], r) for r in runs.values() if r["kind"] == kind)
        if not points:
            continue
        label = f"{kind} steering during training (coefficient in its own units)"
        for column, (measure, key, _) in enumerate(measures):
            axes[0][column].errorbar([c for c, _ in points], [r[key]["mean"] for _, r in points],
                                     yerr=[r[key]["sem"] for _, r in points], marker=marker, capsize=3, label=label)
            axes[1][column].errorbar([c for c, _ in points], [r["vs_no_prevention"][measure]["mean"] for _, r in points],
                                     yerr=[r["vs_no_prevention"][measure]["sem"] for _, r in points], marker=marker, capsize=3,
                                     label=label)
    for column, (measure, key, label) in enumerate(measures):
        top, bottom = axes[0][column], axes[1][column]
        top.axhline(none[key]["mean"], color="grey", linestyle="--",
                    label=f"no prevention ({none[key]['mean']:+.3g} ± {none[key]['sem']:.2g}, p {none[key]['p']:.2g})")
        if "control" in runs:
            top.axhline(runs["control"][key]["mean"], color="green", linestyle=":",
                        label=f"control: other data ({runs['control'][key]['mean']:+.3g} ± {runs['control'][key]['sem']:.2g})")
        if REPLICATE in runs:
            top.axhline(runs[REPLICATE][key]["mean"], color="grey", linestyle=":",
                        label=f"no prevention, next seed ({runs[REPLICATE][key]['mean']:+.3g} ± {runs[REPLICATE][key]['sem']:.2g})")
        top.set(ylabel=f"{label}: finetune − base", xlabel="steering coefficient during finetuning")
        bottom.set(ylabel=f"{label}: setting − no prevention", xlabel="steering coefficient during finetuning")
        for axis in (top, bottom):
            axis.axhline(0, color="black", linewidth=0.5)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=6)
    shown = ", ".join(f"{m} {s:.1f} s.e." for m, s in summary["unprevented_drift_sigmas"].items())
    missing = [m for m, assessable in summary["prevention_assessable"].items() if assessable is not True]
    verdict = f" — NO DRIFT TO PREVENT on {', '.join(missing)} (Holm): prevention not assessable there" if missing else ""
    figure.suptitle(f"Preventative steering ({trait}; judge: {judge}; {judge_quality_text(summary['judge_quality'])}); errors "
                    f"paired by question or item; the runs share one training seed (measurement error only; the reseeded "
                    f"unprevented run shows a seed's effect)\nunprevented drift: {shown}{verdict}", fontsize=9)
    figure.tight_layout()
    save_figure(figure, path)


def judge_quality_text(quality: dict | None) -> str:
    """The judge's measured quality in a few words: the trait judge's held-out-question AUROC against
    shuffled labels, and the coherence proxy's separation of real from corrupted answers."""
    if not quality or quality.get("held_out_auroc") is None:
        return "judge quality not measured (an LLM judge) or not recorded"
    text = (f"trait judge held-out-question AUROC {quality['held_out_auroc']:.3f} (shuffled labels "
            f"{quality.get('shuffled_label_auroc', float('nan')):.3f})")
    coherence = quality.get("coherence_proxy") or {}
    if coherence.get("real_vs_corrupted_auroc") is not None:
        text += f", coherence proxy real-vs-corrupted AUROC {coherence['real_vs_corrupted_auroc']:.3f}"
    return text


def contrast_text(value: dict | None, digits: int, raw_p: bool = True) -> str:
    """A contrast as "mean ± s.e. (p …, Holm …)" (without the raw p: Markdown cells); — if absent."""
    if value is None:
        return "—"
    tests = f"Holm {value.get('p_holm', float('nan')):.2g}"
    if raw_p:
        tests = f"p {value['p']:.2g}, {tests}"
    return f"{value['mean']:+.{digits}f} ± {value['sem']:.{digits}f} ({tests})"


def number_text(value, form: str) -> str:
    return "—" if value is None else format(value, form)


def markdown_table(summary: dict) -> str:
    """The summary as RESULTS-ready Markdown: each run's drift and learning, then each setting against
    the unprevented finetune with the fraction of drift it prevented, then the trends."""
    trait, runs = summary["trait"], summary["runs"]

    def cell(value: dict | None, digits: int) -> str:
        return contrast_text(value, digits, raw_p=False)

    number = number_text

    lines = [f"Judge: {(summary['judge'] or 'unnamed').split(':')[0]}; {judge_quality_text(summary['judge_quality'])}. "
             f"{summary['multiplicity']}.", "",
             f"| run | {trait} | coherence | margin | A/B | MMLU | ‖W_ft − W‖_F | held-out loss plain / steered / steering alone "
             "| final projection |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {cell(r['drift'], 2)} | {cell(r['coherence_drift'], 1)} | {cell(r['margin_drift'], 3)} | "
                     f"{cell(r['ab_drift'], 4)} | {cell(r['mmlu_change'], 3)} | {number(r['update_norm'], '.3f')} | "
                     f"{number(r['heldout_loss'], '.4f')} / {number(r['heldout_loss_steered'], '.4f')} / "
                     f"{number(r['heldout_loss_steering_alone'], '.4f')} | {number(r['final_projection'], '+.4f')} |")
    lines += ["", f"| setting − no prevention | {trait} | coherence | margin | A/B | held-out loss plain | held-out loss steered "
              f"| fraction prevented: {trait} / margin |", "|---|---|---|---|---|---|---|---|"]
    for name, h in summary["headline"].items():
        v, loss = h["vs_no_prevention"], h["vs_no_prevention"].get("heldout_loss") or {}
        fractions = " / ".join(f"{f['ratio']:+.2f} [{f['ci'][0]:+.2f}, {f['ci'][1]:+.2f}]"
                               for f in (h["fraction_prevented"]["trait"], h["fraction_prevented"]["margin"]))
        lines.append(f"| {name} | {cell(v['trait'], 2)} | {cell(v['coherence'], 1)} | {cell(v['margin'], 3)} | {cell(v['ab'], 4)} | "
                     f"{cell(loss.get('plain'), 4)} | {cell(loss.get('steered'), 4)} | {fractions} |")
    for label, key in (("a seed alone (none_reseeded − none)", "seed_spread"), ("unprevented − control", "unprevented_vs_control")):
        if summary.get(key):
            v = summary[key]
            lines.append(f"| {label} | {cell(v['trait'], 2)} | {cell(v['coherence'], 1)} | {cell(v['margin'], 3)} | "
                         f"{cell(v['ab'], 4)} | | | |")
    lines += ["", "| trend (slope per unit coefficient, none at 0) | coefficients | " + f"{trait} | coherence | margin | A/B |",
              "|---|---|---|---|---|---|"]
    for kind, t in summary["trends"].items():
        lines.append(f"| {kind} | {', '.join(f'{c:g}' for c in t['coefficients'])} | {cell(t[trait], 2)} | {cell(t['coherence'], 1)} | "
                     f"{cell(t['margin'], 4)} | {cell(t.get('ab'), 4)} |")
    return "\n".join(lines) + "\n"


def print_summary(summary: dict) -> None:
    trait, base = summary["trait"], summary["base"]
    print(f"judge: {summary['judge']}")
    print(f"judge quality: {judge_quality_text(summary['judge_quality'])}")
    print(f"base {trait} {base['trait']:.2f}, coherence {base['coherence']:.2f}, margin {base.get('margin') or float('nan'):+.4f}, "
          f"MMLU {base['mmlu']:.3f} ({base['mmlu_questions']} items)")
    print("unprevented drift: " + ", ".join(f"{m} {s:+.1f} standard errors" for m, s in summary["unprevented_drift_sigmas"].items()))
    print(summary["multiplicity"])
    for measure, assessable in summary["prevention_assessable"].items():
        if assessable is not True:
            print(f"prevention assessable on {measure}: {assessable}")

    shown, number = contrast_text, number_text

    def measures(v: dict) -> str:
        return (f"{trait} {shown(v['trait'], 2)}  coherence {shown(v['coherence'], 2)}  margin {shown(v['margin'], 4)}  "
                f"A/B {shown(v['ab'], 3)}  MMLU {shown(v['mmlu'], 3)}")

    print("drift from the base model; the finetune's ‖W_ft − W‖_F; held-out loss plain (change from base) / with its "
          "training steering on / that steering alone (nats/token):")
    for name, r in summary["runs"].items():
        print(f"  {name:16s} {measures({k: r[key] for k, key in MEASURES.items()})}  "
              f"final projection {number(r['final_projection'], '+.4f')}  norm {number(r['update_norm'], '.4f')}  "
              f"held-out loss {number(r['heldout_loss'], '.4f')} ({number(r['heldout_loss_change'], '+.4f')}) / "
              f"{number(r['heldout_loss_steered'], '.4f')} / {number(r['heldout_loss_steering_alone'], '.4f')}")
    if summary.get("seed_spread"):
        print(f"a seed alone (none_reseeded − none): {measures(summary['seed_spread'])}")
    if summary.get("unprevented_vs_control"):
        print(f"unprevented − control (the training data's side): {measures(summary['unprevented_vs_control'])}")
    print("prevention, setting − no prevention; held-out loss against the unprevented finetune's, plain / steered; "
          "fraction of the unprevented drift prevented [Fieller 95 %]:")
    for name, h in summary["headline"].items():
        loss = h["vs_no_prevention"].get("heldout_loss") or {}
        fractions = "  ".join(f"{m} {f['ratio']:+.2f} [{f['ci'][0]:+.2f}, {f['ci'][1]:+.2f}]" for m, f in h["fraction_prevented"].items())
        print(f"  {name:16s} {measures(h['vs_no_prevention'])}  held-out loss {shown(loss.get('plain'), 4)} / "
              f"{shown(loss.get('steered'), 4)}  prevented: {fractions}")
    for kind, trend in summary["trends"].items():
        print(f"trend over the {kind} coefficient {trend['coefficients']} (slope per unit): "
              + "  ".join(f"{m} {shown(v, 4)}" for m, v in trend.items() if m != "coefficients"))
