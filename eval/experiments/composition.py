"""Multi-persona composition (research question 4): several traits' diffs merged at once over a
factorial grid, each trait evaluated on its own questions under every combination. Does each
trait follow its own coefficient, and how much do the others leak into it?

Per measured trait and metric (judged score, coherence, judge-free margin) the additive model
    metric = β₀ + Σⱼ βⱼ·cⱼ
is fit over the combinations. β is a matrix (measured trait × diff): its diagonal is each
trait's response to its own coefficient, the rest is cross-talk. Every combination answers the
same questions with the same seeds, so the slopes' standard errors are paired by question (the
slopes fit per question, then their spread over questions). How far the effects simply add: the
additive model's R², and its residuals tested question by question (the largest |mean residual|
against the maxima of sign-flipped questions). In a two-level factorial the residual is exactly
the interactions; with three or more levels it also holds each coefficient's own curvature.

With an interaction the slopes average a diff's effect over the others' settings, and a "cross
slope" mixes what the other diff does alone with how it changes this one's effect. So the report
reads the grid through its simple effects: each diff's effect (its lowest level → its highest) at
every setting of the others (in the 0/+2 grid: at the other's 0 and at its +2), and each pair's
interaction (the difference of those two simple effects), all paired by question with sign-flip
p-values, on the judged score, coherence and the judge-free margin alike. Main-effect cross-talk is
reported only where no interaction is significant. Weight-space cosines of the diffs are reported
as they are; a cosine near 0 follows from independent initialisations and is not read as
independence of the behaviours.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import lora_utils as lu
from eval.activations import default_layer, load_vector
from eval.analysis import save_figure, trait_similarity
from eval.stats import additive_fit, clustered_sems, paired_difference, per_question_additive_fit, sign_flip_max_test, sign_flip_test
from io_utils import PersonaLoRAError, read_json_object
from model_loading import default_persona_paths


INTERACTION_ALPHA = 0.05  # an interaction with p below this is "significant": the grid is read by its simple effects


def factorial(levels: list[float], n_diffs: int) -> list[tuple[float, ...]]:
    return list(itertools.product(levels, repeat=n_diffs))


def read_points(path: Path, names: list[str]) -> tuple[dict, list[dict]]:
    """An evaluation summary of a composition grid and its conditions (with their coefficients)."""
    summary = read_json_object(path, "evaluation summary")
    points = [c for c in summary.get("conditions", []) if isinstance(c.get("coefs"), dict)]
    if not points or any(set(p["coefs"]) != set(names) for p in points):
        raise PersonaLoRAError(f"{path} holds no composition of exactly the diffs {', '.join(names)}: "
                               "run eval_lora_persona.py with one --lora_diff_path per trait and grouped --lora_coef")
    return summary, points


def metric_fit(points: list[dict], names: list[str], metric: str) -> dict:
    """The additive fit of one metric with slope errors paired by question, every cross slope, and
    the test of additivity on the per-question residuals."""
    per_question = per_question_additive_fit(points, names, f"{metric}_by_question")
    levels = {len({p["coefs"][n] for p in points}) for n in names}
    residuals = sign_flip_max_test(per_question["residuals"])
    fit = {**additive_fit(points, names, metric),
           "slope_sem": dict(zip(names, clustered_sems(per_question["slopes"]))),
           "slope_sem_kind": "paired by question (slopes fit per question, spread over questions)",
           "non_additivity": {"max_abs_mean_residual": residuals["max_abs_mean"], "p": residuals["p"],
                              "p_method": residuals["p_method"], "questions": residuals["units"],
                              "residual_holds": "the interactions" if levels == {2} else
                                                "the interactions and each coefficient's own curvature"}}
    return {**fit, "per_question_slopes": per_question["slopes"]}


def cross_talk(fit: dict, names: list[str], trait: str) -> dict | None:
    """The largest |slope| of another trait's coefficient on this trait's measure, against the
    maxima of the same slopes with whole questions sign-flipped (no cross-talk: each question's
    cross slopes as likely negative as positive)."""
    others = [i for i, n in enumerate(names) if n != trait]
    if not others:
        return None
    test = sign_flip_max_test(fit["per_question_slopes"][:, others])
    return {"largest_cross_slope": test["max_abs_mean"], "p": test["p"], "p_method": test["p_method"]}


def _paired_contrast(treated: dict, control: dict) -> dict:
    """treated − control question by question (the questions both measured): mean, standard error
    over questions, and the sign-flip p-value."""
    differences = [treated[q] - control[q] for q in treated if q in control]
    mean, sem, n = paired_difference(treated, control)
    test = sign_flip_test(differences)
    return {"mean": mean, "sem": sem, "questions": n, "p": test["p"], "p_method": test["p_method"]}


def simple_effects(points: list[dict], names: list[str], metric: str) -> dict:
    """Each diff's simple effect, its highest level minus its lowest at every setting of the other
    diffs, and each pair's interaction, the change of one's simple effect between the other's lowest
    and highest level (the rest held at each of their settings); all paired by question.

    In a 2 × 2 of levels 0 and 2, a's simple effects are m(2, 0) − m(0, 0) and m(2, 2) − m(0, 2), and
    the interaction is m(2, 2) − m(0, 2) − m(2, 0) + m(0, 0), the same whichever diff is read first."""
    by_coefs = {tuple(p["coefs"][n] for n in names): p[f"{metric}_by_question"] for p in points}
    levels = {n: sorted({p["coefs"][n] for p in points}) for n in names}
    effects, effect_by_question = [], {}
    for j, name in enumerate(names):
        low, high = levels[name][0], levels[name][-1]
        for setting in sorted({key[:j] + key[j + 1:] for key in by_coefs}):
            lower, upper = setting[:j] + (low,) + setting[j:], setting[:j] + (high,) + setting[j:]
            if lower not in by_coefs or upper not in by_coefs:
                continue
            at = {other: c for other, c in zip(names[:j] + names[j + 1:], setting)}
            effect = {q: by_coefs[upper][q] - by_coefs[lower][q] for q in by_coefs[upper] if q in by_coefs[lower]}
            effect_by_question[(name, setting)] = effect
            effects.append({"diff": name, "from": low, "to": high, "at": at, **_paired_contrast(by_coefs[upper], by_coefs[lower])})
    interactions = []
    for j, k in itertools.combinations(range(len(names)), 2):
        low, high = levels[names[k]][0], levels[names[k]][-1]
        position = k - 1  # k's place in the setting of j's others (k > j)
        rest_settings = sorted({s[:position] + s[position + 1:] for (name, s) in effect_by_question if name == names[j]})
        for rest in rest_settings:
            at_high = effect_by_question.get((names[j], rest[:position] + (high,) + rest[position:]))
            at_low = effect_by_question.get((names[j], rest[:position] + (low,) + rest[position:]))
            if at_high is None or at_low is None:
                continue
            others = [n for i, n in enumerate(names) if i not in (j, k)]
            interactions.append({"diffs": [names[j], names[k]], "at": dict(zip(others, rest)),
                                 **_paired_contrast(at_high, at_low)})
    interacting = any(i["p"] < INTERACTION_ALPHA for i in interactions)
    return {"simple_effects": effects, "interactions": interactions, "interaction_significant": interacting,
            "read_by": "the simple effects: the additive slopes average over an interaction" if interacting else
                       "the additive slopes (no interaction is significant at p < 0.05)"}


def changes_from_unsteered(points: list[dict], metric: str) -> list[dict]:
    """Each combination's metric minus the unsteered combination's, paired by question."""
    unsteered = next((p for p in points if not any(p["coefs"].values())), points[0])
    changes = []
    for p in points:
        mean, sem, _ = paired_difference(p[f"{metric}_by_question"], unsteered[f"{metric}_by_question"])
        changes.append({"coefs": p["coefs"], "change_mean": mean, "change_sem": sem})  # NaN (one question) draws no bar
    return changes


def summarize(output_dir: Path, names: list[str], model: str | None, layer: int | None) -> dict:
    """Fits for every measured trait from output_dir/eval_<trait>.summary.json, the traits'
    similarity in weight and activation space, and the plots."""
    measured, fits = {}, {}
    for trait in names:
        summary, points = read_points(output_dir / f"eval_{trait}.summary.json", names)
        measured[trait] = {"judge": summary.get("judge_description"), "judge_quality": summary.get("judge_quality"), "points": points}
        metrics = {"trait_score": trait, "coherence": "coherence"}
        if all("margin_by_question" in p for p in points):
            metrics["likelihood_margin"] = "margin"
        fits[trait] = {name: {**metric_fit(points, names, metric), **simple_effects(points, names, metric)}
                       for name, metric in metrics.items()}

    similarity = None
    paths = [default_persona_paths(model, t) for t in names]
    if all(d.is_file() and v.is_file() for d, v in paths):
        loaded = {t: (lu.load_lora_diff(d), load_vector(v)) for t, (d, v) in zip(names, paths)}
        # The vectors hold L+1 rows (embeddings, then each block).
        layer = layer or default_layer(next(iter(loaded.values()))[1].shape[0] - 1)
        similarity = trait_similarity(loaded, layer)

    headline = {}
    for t in names:
        entry = {"judge": measured[t]["judge"], "judge_held_out_auroc": (measured[t]["judge_quality"] or {}).get("held_out_auroc")}
        for name, fit in fits[t].items():
            entry[name] = {"own_slope": fit["slope"][t], "own_slope_sem": fit["slope_sem"][t],
                           "additive_r2": fit["additive_r2"], "non_additivity": fit["non_additivity"],
                           "read_by": fit["read_by"], "simple_effects": fit["simple_effects"], "interactions": fit["interactions"],
                           # a main-effect cross slope means something only when the effects add
                           "cross_talk": None if fit["interaction_significant"] else cross_talk(fit, names, t)}
        headline[t] = entry
    for fit in (f for per_trait in fits.values() for f in per_trait.values()):
        fit.pop("per_question_slopes")  # an array: its summary (slope_sem, cross_talk) is what the report keeps
    report = {"traits": names, "headline": headline, "fits": fits,
              "judges": {t: {k: v for k, v in m.items() if k != "points"} for t, m in measured.items()},
              "trait_similarity": similarity, "layer": layer}
    plot_composition(output_dir / "composition.png", names, measured)
    plot_slopes(output_dir / "slopes.png", names, fits, similarity, layer)
    return report


def plot_composition(path: Path, names: list[str], measured: dict) -> None:
    """Each trait against its own coefficient, one line per setting of the others: parallel lines
    mean the effects add, vertical spread is cross-talk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Every panel shows the change from the unsteered combination, paired by question: the errors
    # are those of the contrasts the fits use, not of the raw means (which carry question difficulty).
    rows = [("{trait}", "{trait} score, judged\n({judge}, AUROC {auroc})", "{trait} score − unsteered (0–100 scale)"),
            ("coherence", "coherence on {trait} questions", "coherence − unsteered")]
    if all("margin_by_question" in p for m in measured.values() for p in m["points"]):
        rows.append(("margin", "{trait}: log-likelihood margin (judge-free)", "margin − unsteered, nats/token"))
    figure, axes = plt.subplots(len(rows), len(names), figsize=(4.5 * len(names), 3.8 * len(rows)), squeeze=False)
    for column, trait in enumerate(names):
        others = [n for n in names if n != trait]
        auroc = (measured[trait]["judge_quality"] or {}).get("held_out_auroc")
        judge = (measured[trait]["judge"] or "unnamed judge").split(" (")[0].split(":")[0]  # its kind, short enough for a title
        for row, (metric, title, ylabel) in enumerate(rows):
            metric = metric.format(trait=trait)
            points = measured[trait]["points"]
            values = changes_from_unsteered(points, metric)
            ys, errors = [v["change_mean"] for v in values], [v["change_sem"] for v in values]
            for setting in sorted({tuple(p["coefs"][o] for o in others) for p in points}):
                line = sorted((i for i, p in enumerate(points) if tuple(p["coefs"][o] for o in others) == setting),
                              key=lambda i: points[i]["coefs"][trait])
                label = ", ".join(f"{o} {c:+g}" for o, c in zip(others, setting)) or "alone"
                axes[row][column].errorbar([points[i]["coefs"][trait] for i in line], [ys[i] for i in line],
                                           yerr=[errors[i] for i in line], marker="o", capsize=3, label=label)
            axes[row][column].set(title=title.format(trait=trait, judge=judge, auroc="n/a" if auroc is None else f"{auroc:.2f}"),
                                  xlabel=f"{trait} coefficient", ylabel=ylabel.format(trait=trait))
            axes[row][column].grid(alpha=0.3)
            axes[row][column].legend(fontsize=7, title="other diffs", title_fontsize=7)
    figure.suptitle("Persona LoRAs merged together: each trait against its own coefficient, change from the unsteered "
                    "model ± s.e. paired by question\n(parallel lines = effects add; vertical spread = cross-talk)", fontsize=10)
    figure.tight_layout()
    save_figure(figure, path)


def plot_slopes(path: Path, names: list[str], fits: dict, similarity: dict | None, layer: int) -> None:
    """The slope matrices (judged, judge-free) beside the persona vectors' cosines in activation space."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def slope_panel(metric: str) -> tuple:
        return (np.array([[fits[t][metric]["slope"][n] for n in names] for t in names]),
                np.array([[fits[t][metric]["slope_sem"][n] for n in names] for t in names]))

    panels = [("judged score slope per unit coefficient ± s.e.\n(row: trait measured, column: diff)", *slope_panel("trait_score"))]
    if "likelihood_margin" in fits[names[0]]:
        panels.append(("log-likelihood margin slope ± s.e. (judge-free)\n(row: trait measured, column: diff)",
                       *slope_panel("likelihood_margin")))
    if similarity:  # the weight-space cosine is not drawn: near 0 by independent initialisation, it invites a wrong reading
        key = f"activation_space_cosine_layer{layer}"
        panels.append((f"cosine of persona vectors (layer {layer})", np.array([[similarity[key][a][b] for b in names]
                                                                               for a in names]), None))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), squeeze=False)
    for axis, (title, matrix, sems) in zip(axes[0], panels):
        limit = float(np.abs(matrix).max()) or 1.0
        image = axis.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit)
        digits = 2 if limit > 0.5 else 3
        for (i, j), value in np.ndenumerate(matrix):
            text = f"{value:+.{digits}f}" + ("" if sems is None else f"\n± {sems[i, j]:.{digits}f}")
            axis.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if abs(value) > 0.6 * limit else "black")
        axis.set(xticks=range(len(names)), yticks=range(len(names)), title=title)
        axis.set_xticklabels(names, rotation=30)
        axis.set_yticklabels(names)
        figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    save_figure(figure, path)


def print_summary(report: dict) -> None:
    names = report["traits"]
    labels = {"trait_score": "judged score (points per unit coefficient)", "coherence": "coherence",
              "likelihood_margin": "judge-free log-likelihood margin (nats/token per unit coefficient)"}
    for metric, label in labels.items():
        if metric not in report["fits"][names[0]]:
            continue
        print(f"\n{label}: slope per unit of each diff's coefficient ± s.e. (paired by question), additive-model R²")
        print(f"{'measured':14s} " + " ".join(f"{'coef ' + n:>20s}" for n in names) + f" {'R²':>6s}")
        for t in names:
            fit = report["fits"][t][metric]
            digits = 4 if metric == "likelihood_margin" else 2
            print(f"{t:14s} " + " ".join(f"{fit['slope'][n]:+10.{digits}f} ± {fit['slope_sem'][n]:7.{digits}f}" for n in names)
                  + f" {fit['additive_r2']:6.3f}")
        print("tested question by question against the maxima of sign-flipped questions:")
        for t in names:
            entry, fit = report["headline"][t][metric], report["fits"][t][metric]
            cross, residual = entry["cross_talk"], fit["non_additivity"]
            cross_text = "" if cross is None else f"largest cross slope {cross['largest_cross_slope']:.4g} (p {cross['p']:.2g}), "
            print(f"  {t:12s} {cross_text}largest |mean residual| {residual['max_abs_mean_residual']:.4g} (p {residual['p']:.2g}; "
                  f"the residual holds {residual['residual_holds']})")
        print("simple effects (each diff, lowest → highest level, at each setting of the others; paired by question):")
        digits = 4 if metric == "likelihood_margin" else 2
        for t in names:
            entry = report["headline"][t][metric]
            print(f"  on {t}: read by {entry['read_by']}")
            for effect in entry["simple_effects"]:
                at = ", ".join(f"{n} {c:+g}" for n, c in effect["at"].items())
                print(f"    {effect['diff']:>12s} {effect['from']:+g} → {effect['to']:+g} at {at}: {effect['mean']:+.{digits}f} ± "
                      f"{effect['sem']:.{digits}f} (p {effect['p']:.2g})")
            for interaction in entry["interactions"]:
                at = "".join(f", {n} {c:+g}" for n, c in interaction["at"].items())
                print(f"    interaction {' × '.join(interaction['diffs'])}{at}: {interaction['mean']:+.{digits}f} ± "
                      f"{interaction['sem']:.{digits}f} (p {interaction['p']:.2g})")
