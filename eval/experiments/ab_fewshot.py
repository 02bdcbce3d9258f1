"""Judge-free A/B choices and the few-shot extraction setting they depend on (scripts/ab_fewshot.sh):
per trait and extraction setting (few-shot K), the A/B balanced p_matching of the persona LoRA and of
the vector at every coefficient (with its change against coefficient 0, paired by item), their A/B
and judge-free margin slopes (each with a sign-flip p and, beside it, Holm's adjustment over every
slope and slope difference the report tests), how much probability the two answers hold at
coefficient 0 (the unsteered model's log(P(m) + P(n))) and how it changes at the extreme coefficients,
and how separable the extraction's pos and neg answers were (the judge's AUROC on them; an offline
judge never saw them); per method, the difference between the settings' A/B slopes, paired by
item (both settings answer the same items); and, where the sweep exists, the default setting's
vector steered at every position (a merged LoRA also changes how the question and choices are
read). `collect` makes the report, `table` its Markdown (the README's tables), `plot` ab.png.
"""

import math
from pathlib import Path

from eval.ab import balanced_paired_test
from eval.analysis import save_figure
from eval.evaluate import measurement_identity, require_same_measurement
from eval.stats import RANDOM_PERMUTATIONS, calibrated_contrast, cluster_slopes, holm, paired_slope
from io_utils import PersonaLoRAError, read_json_object
from model_loading import persona_dir

METHODS = {"lora": "persona LoRA", "vector": "activation vector"}
ALL_POSITIONS = "activation vector, every position"
DRAINED_LOG_MASS = -2.0  # log(P(m) + P(n)) fell by more than this: the model mostly stopped answering with a choice


def extraction_summary(model, trait: str, k: int, default_k: int) -> dict:
    """The extraction's summary.json (the default setting's folder, or <folder>_k<K> for another
    K, as ab_fewshot.sh writes them), checked to have been made with K demonstrations."""
    folder = persona_dir(model, trait) if k == default_k else Path(f"{persona_dir(model, trait)}_k{k}")
    summary = read_json_object(folder / "summary.json", "extraction summary")
    if summary.get("fewshot") != k:
        raise PersonaLoRAError(f"{folder / 'summary.json'} was extracted with --fewshot {summary.get('fewshot')}, not {k}: "
                               "give --fewshot the default setting first, as scripts/ab_fewshot.sh ran it")
    return summary


def item_slopes(summary: dict, with_margin_only: bool = False) -> dict[str, float]:
    """Each item's slope of its both-orders p_matching per unit coefficient (over the conditions
    that also measured the margin, with_margin_only: so a ratio to the margin slope is over one range)."""
    conditions = [c for c in summary["conditions"] if c.get("margin_by_question") or not with_margin_only]
    return cluster_slopes([c["coef"] for c in conditions], [c["both_orders_by_item"] for c in conditions])


def question_margin_slopes(summary: dict) -> dict[str, float]:
    """Each question's slope of its judge-free margin per unit coefficient ({} without a margin)."""
    measured = [c for c in summary["conditions"] if c.get("margin_by_question")]
    if len({c["coef"] for c in measured}) < 2:
        return {}
    return cluster_slopes([c["coef"] for c in measured], [c["margin_by_question"] for c in measured])


def calibrated_methods(lora: dict, vector: dict) -> dict | None:
    """The two methods in calibrated units: each one's A/B slope per nat of its margin slope (the
    forced-choice change it buys at an equal change of the margin), and the persona LoRA's minus the
    vector's, paired by item and by question (calibrated_contrast). Raw coefficients do not compare
    (α scales ΔW, c scales v); this does. None without margins."""
    margins = {"lora": question_margin_slopes(lora), "vector": question_margin_slopes(vector)}
    if not all(margins.values()):
        return None
    return calibrated_contrast({"lora": item_slopes(lora, True), "vector": item_slopes(vector, True)}, margins, same_units=False)


def sweep_slopes(summary: dict) -> tuple[dict, dict | None]:
    """The sweep's A/B slope and judge-free margin slope, each with the sign-flip p of its per-item
    (per-question) slopes, recomputed from the per-item values the summary keeps, so summaries
    written before slopes had p-values give them too. None: no margin was measured."""
    conditions = summary["conditions"]
    ab = paired_slope([c["coef"] for c in conditions], [c["both_orders_by_item"] for c in conditions])
    measured = [c for c in conditions if c.get("margin_by_question")]
    margin = (paired_slope([c["coef"] for c in measured], [c["margin_by_question"] for c in measured])
              if len({c["coef"] for c in measured}) > 1 else None)
    return ab, margin


def sweep_entry(summary: dict) -> dict:
    """One sweep's row of the report: each coefficient's p_matching, its change from 0 and the
    change of the answers' log-mass, and the A/B and margin slopes with their p."""
    slope, margin = sweep_slopes(summary)
    return {
        "points": {c["coef"]: {"p": c["balanced_p_matching_both_orders"],
                               "change": c["change_vs_baseline"]["balanced_p_matching_both_orders"],
                               "change_sem": c["change_vs_baseline"]["balanced_p_matching_both_orders_sem"],
                               "p_first_choice": c["p_first_choice"],
                               "choice_log_mass_change": c["change_vs_baseline"].get("choice_log_mass"),
                               "choice_log_mass_change_sem": c["change_vs_baseline"].get("choice_log_mass_sem")}
                   for c in summary["conditions"]},
        "ab_slope": slope["slope"], "ab_slope_sem": slope["slope_sem"], "ab_slope_p": slope["p"],
        "margin_slope": margin["slope"] if margin else None, "margin_slope_sem": margin["slope_sem"] if margin else None,
        "margin_slope_p": margin["p"] if margin else None,
        "items": summary["items"], "ab_data": summary["ab_data"], "model": summary["model"]}


def multiplicity_family(report: dict) -> list[tuple[dict, str]]:
    """Every p the report's table shows, as (the dict holding it, its key): each trait's, setting's
    and method's A/B and margin slopes, the methods' calibrated difference, the settings' slope
    differences, and the A/B slope of the vector steered at every position."""
    family = []
    for entries in report.values():
        for entry in settings_of(entries).values():
            for method in METHODS:
                family += [(entry[method], key) for key in ("ab_slope_p", "margin_slope_p") if entry[method][key] is not None]
            if entry.get("calibrated"):
                family.append((entry["calibrated"]["difference"], "p"))
        family += [(difference, "p") for difference in entries.get("slope_difference", {}).values()]
        if entries.get("all_positions"):
            family += [(entries["all_positions"], key) for key in ("ab_slope_p", "margin_slope_p")
                       if entries["all_positions"][key] is not None]
    return family


def family_size(report: dict) -> int:
    """The tests Holm counts (an undefined p, NaN, is not one)."""
    return sum(not math.isnan(holder[key]) for holder, key in multiplicity_family(report))


def adjust_for_multiplicity(report: dict) -> None:
    """Holm's adjustment over the whole family, written beside each raw p (<key>_holm)."""
    family = multiplicity_family(report)
    for (holder, key), adjusted in zip(family, holm([holder[key] for holder, key in family])):
        holder[f"{key}_holm"] = adjusted


def read_ab_summary(path: Path, trait: str) -> dict:
    summary = read_json_object(path, "A/B summary")
    if summary.get("mode") != "ab" or summary.get("trait") != trait:
        raise PersonaLoRAError(f"{path} is not an A/B summary of {trait} (mode {summary.get('mode')}, trait {summary.get('trait')})")
    if not summary.get("slopes") or any("change_vs_baseline" not in c for c in summary["conditions"]):
        raise PersonaLoRAError(f"{path} has no slope or no unsteered condition: rerun its sweep with coefficient 0 and another")
    return summary



def collect(output_dir: Path, traits: list[str], fewshot: list[int], model: str | None = None) -> dict:
    """The report (summary.json) of the sweeps <trait>_k<K>_{lora,vector}.summary.json in output_dir,
    the settings `fewshot` with the default first."""
    report = {}
    for trait in traits:
        report[trait] = {}
        summaries = {(k, method): read_ab_summary(Path(output_dir) / f"{trait}_k{k}_{method}.summary.json", trait)
                     for k in fewshot for method in METHODS}
        # The vector steered at every position (the driver's *_vector_all sweep, default setting only).
        all_positions_path = Path(output_dir) / f"{trait}_k{fewshot[0]}_vector_all.summary.json"
        if all_positions_path.exists():
            summaries[(fewshot[0], "vector_all")] = read_ab_summary(all_positions_path, trait)
        # Every setting and method on one A/B file and one set of coefficients, or the rows do not compare.
        require_same_measurement({f"{trait}_k{k}_{m}": {**measurement_identity(s), "coefficients": sorted(c["coef"] for c in s["conditions"])}
                                  for (k, m), s in summaries.items()}, f"the A/B sweeps of {trait}")
        for k in fewshot:
            separability = extraction_summary(model, trait, k, fewshot[0]).get("separability") or {}
            entry = {"separability_auroc": separability.get("judge_auroc_pos_vs_neg"), "separability_judge": separability.get("judge")}
            for method in METHODS:
                summary = summaries[(k, method)]
                baseline = next(c for c in summary["conditions"] if c["coef"] == 0)
                entry["baseline_choice_log_mass"] = baseline["choice_log_mass"]  # the unsteered model: one per trait
                entry[method] = sweep_entry(summary)
            entry["calibrated"] = calibrated_methods(summaries[(k, "lora")], summaries[(k, "vector")])
            report[trait][f"k{k}"] = entry
        if (fewshot[0], "vector_all") in summaries:
            report[trait]["all_positions"] = {"setting": f"k{fewshot[0]}", **sweep_entry(summaries[(fewshot[0], "vector_all")])}
        if len(fewshot) == 2:
            first, second = fewshot
            report[trait]["slope_difference"] = {}
            for method in METHODS:
                slopes = {k: item_slopes(summaries[(k, method)]) for k in fewshot}
                matching_first = summaries[(first, method)]["conditions"][0]["matching_first_by_item"]
                report[trait]["slope_difference"][method] = {
                    "contrast": f"K={first} − K={second}", "errors": "paired by item (both settings answer the same items)",
                    **balanced_paired_test({item: slopes[first][item] - slopes[second][item] for item in slopes[first]},
                                           matching_first)}
    adjust_for_multiplicity(report)
    return report



def settings_of(entries: dict) -> dict:
    return {setting: entry for setting, entry in entries.items() if setting.startswith("k")}


P_FLOOR = 1 / (RANDOM_PERMUTATIONS + 1)  # a random-pattern p counts the observed one: it is never below this


def at_floor(p: float) -> bool:
    """No random pattern reached the observed value: the next possible p is 2/(N + 1)."""
    return p < 1.5 * P_FLOOR


def p_text(p: float) -> str:
    """A sign-flip p: beyond 16 items it comes from RANDOM_PERMUTATIONS random patterns and the
    observed one, so at the floor it is a bound (≤ 1/100,001), not a value."""
    return f"≤ {P_FLOOR:.0e}" if at_floor(p) else f"{p:.2g}"


def holm_text(p: float, p_holm: float) -> str:
    """Holm's adjusted p; from a p at the floor it is a bound too (≤), not a value."""
    return f"≤ {p_holm:.2g}" if at_floor(p) else p_text(p_holm)


def tested(value: float, sem: float, p: float, p_holm: float) -> str:
    return f"{value:+.4f} ± {sem:.4f} (p {p_text(p)}, Holm {holm_text(p, p_holm)})"



def coefficients_of(report: dict) -> list[float]:
    """Every coefficient some sweep of the report measured, in order."""
    return sorted({c for entries in report.values() for e in settings_of(entries).values() for c in e["lora"]["points"]})


def table(report: dict, coefficients: list[float]) -> str:
    bottom, top = min(coefficients), max(coefficients)
    first = next(iter(settings_of(next(iter(report.values()))).values()))["lora"]
    judges = sorted({e["separability_judge"] or "—" for entries in report.values() for e in settings_of(entries).values()})
    lines = [f"Balanced p_matching (both orders of the choices) on {first['items']} A/B items per trait, {first['model']}; "
             "in brackets the change from coefficient 0 ± its item-paired s.e.; slopes per unit coefficient fit item by item. "
             f"log-mass: change of log(P(m) + P(n)) at {bottom:+g} / {top:+g} (the answers' total probability, which p_matching "
             "shares out; its paired s.e. is in summary.json); log-mass at 0: the unsteered model's log(P(m) + P(n)) itself, "
             "averaged over items (0: all its probability on the two answers; −2.3: a tenth). "
             "p: sign flips of the per-item (per-question) slopes; Holm: adjusted over every slope, slope difference and "
             f"calibrated difference these tables report ({family_size(report)} tests). "
             f"pos/neg AUROC: the judge ({', '.join(judges)}) on the extraction's own pos vs neg answers, which it was not fit on. "
             "Caveats: the judge's data and the margin's reference answers are elicited with demonstrations, which favours "
             "K > 0 by construction; vector coefficients are raw, so vector slopes do not compare across K (their norms differ).", ""]
    header = ("| trait | K | method | " + " | ".join(f"{c:+g}" for c in coefficients)
              + f" | A/B slope | margin slope | log-mass at 0 | log-mass {bottom:+g} / {top:+g} | pos/neg AUROC |")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]

    def row(trait: str, setting: str, label: str, entry: dict, m: dict) -> str:
        cells = []
        for c in coefficients:
            point = m["points"].get(c)
            cells.append("—" if point is None else f"{point['p']:.3f}" if c == 0 else
                         f"{point['p']:.3f} ({point['change']:+.4f} ± {point['change_sem']:.4f})")
        margin = "—" if m["margin_slope"] is None else tested(m["margin_slope"], m["margin_slope_sem"], m["margin_slope_p"],
                                                                 m["margin_slope_p_holm"])
        masses = [m["points"].get(c, {}).get("choice_log_mass_change") for c in (bottom, top)]
        mass = "—" if None in masses else " / ".join(f"{v:+.2f}" for v in masses)
        auroc = "—" if entry["separability_auroc"] is None else f"{entry['separability_auroc']:.3f}"
        ab_slope = tested(m["ab_slope"], m["ab_slope_sem"], m["ab_slope_p"], m["ab_slope_p_holm"])
        return (f"| {trait} | {setting[1:]} | {label} | " + " | ".join(cells)
                + f" | {ab_slope} | {margin} | {entry['baseline_choice_log_mass']:.2f} | {mass} | {auroc} |")

    for trait, entries in report.items():
        for setting, entry in settings_of(entries).items():
            lines += [row(trait, setting, label, entry, entry[method]) for method, label in METHODS.items()]
            if entries.get("all_positions", {}).get("setting") == setting:
                lines.append(row(trait, setting, ALL_POSITIONS, entry, entries["all_positions"]))
    differences = [(trait, method, d) for trait, entries in report.items() for method, d in entries.get("slope_difference", {}).items()]
    if differences:
        lines += ["", "| trait | method | A/B slope difference | ± s.e. (paired by item) | p (sign flips) | Holm |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {trait} | {METHODS[method]} ({d['contrast']}) | {d['mean']:+.4f} | {d['sem']:.4f} | {p_text(d['p'])} "
                  f"| {holm_text(d['p'], d['p_holm'])} |" for trait, method, d in differences]
    calibrated = [(trait, setting, e["calibrated"]) for trait, entries in report.items()
                  for setting, e in settings_of(entries).items() if e.get("calibrated")]
    if calibrated:
        lines += ["", "Methods in calibrated units: the A/B slope per nat of the same sweep's margin slope (the forced-choice change "
                  "a method buys at an equal change of the margin) ± delta-method s.e. [Fieller 95 %]; the difference paired by "
                  "item and question, t p (undefined where a margin slope is not distinguishable from 0).", "",
                  "| trait | K | persona LoRA | activation vector | LoRA − vector | p | Holm |", "|---|---|---|---|---|---|---|"]
        for trait, setting, c in calibrated:
            d = c["difference"]
            cells = [f"{c[m]['ratio']:+.4f} ± {c[m]['sem']:.4f} [{c[m]['ci'][0]:+.3g}, {c[m]['ci'][1]:+.3g}]" for m in METHODS]
            tests = "— | —" if math.isnan(d["p"]) else f"{p_text(d['p'])} | {holm_text(d['p'], d['p_holm'])}"
            lines.append(f"| {trait} | {setting[1:]} | {cells[0]} | {cells[1]} | {d['mean']:+.4f} ± {d['sem']:.4f} | {tests} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traits = list(report)
    figure, axes = plt.subplots(1, len(traits), figsize=(4.2 * len(traits), 3.8), squeeze=False)
    for axis, trait in zip(axes[0], traits):
        sweeps = [(setting, method, label, entry[method]) for setting, entry in settings_of(report[trait]).items()
                  for method, label in METHODS.items()]
        if report[trait].get("all_positions"):
            sweeps.append((report[trait]["all_positions"]["setting"], "vector_all", ALL_POSITIONS, report[trait]["all_positions"]))
        for setting, method, label, sweep in sweeps:
            points = sorted(sweep["points"].items())
            line = axis.errorbar([c for c, _ in points], [p["p"] for _, p in points], yerr=[p["change_sem"] for _, p in points],
                                 marker={"lora": "o", "vector": "s"}.get(method, "^"), linestyle="-" if setting != "k0" else ":",
                                 capsize=3, label=f"{label}, K={setting[1:]}")
            drained = [(c, p["p"]) for c, p in points if (p.get("choice_log_mass_change") or 0) < DRAINED_LOG_MASS]
            if drained:
                axis.scatter(*zip(*drained), s=150, facecolors="none", edgecolors=line[0].get_color(), linewidths=1.5, zorder=5)
        axis.axhline(0.5, color="grey", linewidth=0.5)
        axis.set(title=trait, xlabel="steering coefficient", ylabel="balanced p_matching (both orders)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
    figure.suptitle("Forced choice (no judge): p of the trait's answer, ± paired s.e. of the change from 0; ringed: the two answers' "
                    f"probability fell over {math.exp(-DRAINED_LOG_MASS):.0f}-fold (p there is a ratio of small numbers)", fontsize=9)
    figure.tight_layout()
    save_figure(figure, path)
