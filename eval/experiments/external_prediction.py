"""Experiment 2 on data nobody here wrote (#20 item 3): does a finetune's projection onto the
sycophancy persona diffs predict its drift, when the finetunes learn from CAA's public items?

scripts/predict_finetuning_external.sh writes two projection runs (cal_weight_projection.py): one
scored on the public held-out items (projection_public.json) and one on the trait's own A/B items
(projection.json); both carry the judged score and margin on the evaluation questions, each
finetune's projection onto the prompt-derived and the A/B-derived diff with its random-draw null,
and the correlations per group. This summary reads both and adds what neither says alone:
- one multiplicity family for the experiment: Holm over the LoRA finetunes' correlations (one point
  per dataset; each diff and measure, each measured once: the judged score and margin are the same
  in both runs) with the partial correlations over the mixture series, and every finetune's
  random-draw null test per diff (taken from the public run, which computes them);
- the public held-out change of each finetune against the base model, clustered by question stem.
  CAA's sycophancy items ask a few questions of many users (three NLP-survey claims make up about
  two thirds of the held-out items, each introduced by another user's biography), and the finetunes
  learn from other users' versions of the same claims: the items of one stem are not independent,
  and an answer-word habit ("Agree") can pass for a stance. So the change is also given per stem
  kind (stems asked of one user only / of several) and per first word of the matching answer,
  with the LoRA finetunes' projections correlated with each: descriptive (the groups come from the
  items' text), outside the Holm family.
Two items share a stem when their questions end in the same MIN_SHARED_STEM characters or more
(choices included): the same question put to different users.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from eval.experiments.cross_source import answer_word
from eval.stats import clustered_mean_and_sem, correlations, holm, item_mean_clustered
from io_utils import PersonaLoRAError, read_json_object

MIN_SHARED_STEM = 80
MIN_GROUP = 5
# The correlations in the family: the LoRA finetunes, one point per dataset, and the partial
# correlation over the LoRA mixture series. The projection runs also report every finetune pooled
# (LoRA and dense on one axis, a dense finetune repeating a LoRA one's data): descriptive only.
FAMILY_GROUPS = ("lora_by_dataset", "partial_correlation_given_fraction")


def shared_suffix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a[::-1], b[::-1]]))


def stem_clusters(items) -> dict[str, str]:
    """{item index as text: its stem cluster}: items linked when their questions end in the same
    MIN_SHARED_STEM characters or more, clusters the linked groups (union-find); an item linked to
    none is its own cluster."""
    parent = {str(item.index): str(item.index) for item in items}

    def root(key: str) -> str:
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    texts = [(str(item.index), item.question.strip()) for item in items]
    for i, (key_a, a) in enumerate(texts):
        for key_b, b in texts[i + 1:]:
            if shared_suffix(a, b) >= MIN_SHARED_STEM:
                parent[root(key_b)] = root(key_a)
    return {key: root(key) for key in parent}


def item_groups(items) -> dict[str, dict[str, str]]:
    """The descriptive groupings of the held-out items: {grouping: {item: group}}."""
    clusters = stem_clusters(items)
    sizes = Counter(clusters.values())
    words = {str(item.index): answer_word(item) for item in items}
    counts = Counter(words.values())
    return {"stem": {key: "asked of several users" if sizes[c] > 1 else "asked of one user" for key, c in clusters.items()},
            "answer_word": {key: word if counts[word] >= MIN_GROUP else "other" for key, word in words.items()}}


def _by_item(path: Path) -> tuple[dict[str, float], dict]:
    summary = read_json_object(path, "evaluation summary")
    conditions = summary.get("conditions") or []
    if summary.get("mode") != "ab" or len(conditions) != 1 or "both_orders_by_item" not in conditions[0]:
        raise PersonaLoRAError(f"{path} is not the summary of a one-condition eval_lora_persona.py --ab_data run scored in both "
                               "orders; rerun it with this version")
    return conditions[0]["both_orders_by_item"], summary


def heldout_changes(output_dir: Path, names: list[str]) -> dict:
    """Each finetune's change on the public held-out items against the base model (both orders per
    item), over all items and per group of item_groups: the mean over stems with its error over
    stems, and the mean over items with its error clustered by stem; and its log(P(m) + P(n)) on
    them beside the base model's."""
    from eval.ab_source import load_ab_source

    base, base_summary = _by_item(output_dir / "public_ab_base.summary.json")
    items = [item for item in load_ab_source(base_summary["ab_data"], "the held-out items") if str(item.index) in base]
    clusters, groups = stem_clusters(items), item_groups(items)
    report = {"items": len(items), "stems": len(set(clusters.values())), "base_log_mass": base_summary["conditions"][0].get("choice_log_mass"),
              "groups": {grouping: dict(Counter(by_item.values())) for grouping, by_item in groups.items()}, "finetunes": {}}
    for name in names:
        treated, summary = _by_item(output_dir / f"public_ab_{name}.summary.json")
        if summary.get("ab_data_sha256") != base_summary.get("ab_data_sha256"):
            raise PersonaLoRAError(f"public_ab_{name} scored other items than public_ab_base: rerun the driver")
        keys = [k for k in clusters if k in treated]
        row = {}
        for grouping, by_item in [("all", {k: "all" for k in keys}), *groups.items()]:
            for group in sorted(set(by_item.values())):
                chosen = [k for k in keys if by_item.get(k) == group]
                changes = [treated[k] - base[k] for k in chosen]
                mean, sem, n_clusters = clustered_mean_and_sem(changes, [clusters[k] for k in chosen])
                item_mean, item_sem = item_mean_clustered(changes, [clusters[k] for k in chosen])
                row[group if grouping == "all" else f"{grouping}: {group}"] = {"mean": mean, "sem": sem, "stems": n_clusters,
                                                                              "items": len(chosen), "item_mean": item_mean,
                                                                              "item_sem": item_sem}
        report["finetunes"][name] = {"changes": row, "log_mass": summary["conditions"][0].get("choice_log_mass")}
    return report


def experiment_tests(public: dict, own: dict) -> list[dict]:
    """The experiment's one Holm family: every correlation of the public run (judged score, margin,
    public A/B), the own-A/B correlations of the other run, and every finetune's null test per
    diff (the same in both runs: once)."""
    tests = []
    for source, run, measures in (("public held-out items", public, None), ("own A/B items", own, {"ab"})):
        for diff, by_measure in run.get("correlations_by_diff", {}).items():
            for measure, stats in by_measure.items():
                if measures is not None and measure not in measures:
                    continue
                where = source if measure == "ab" else "evaluation questions"
                for group, test in stats.items():
                    if group not in FAMILY_GROUPS:
                        continue
                    keys = ("p",) if group == "partial_correlation_given_fraction" else ("pearson_p", "spearman_p")
                    for key in keys:
                        statistic = test["statistic"] if key == "p" else test["pearson_r" if key == "pearson_p" else "spearman_rho"]
                        name = {"pearson_p": "pearson", "spearman_p": "spearman", "p": "partial r"}[key]
                        tests.append({"test": f"{diff} · {measure} ({where}) · {group} · {name}",
                                      "statistic": statistic, "n": test["n"], "p": test[key]})
    for model in public.get("models", []):
        for diff, null in model.get("null", {}).items():
            tests.append({"test": f"{model['name']} · {diff} · random-draw null (z)", "statistic": null["null"]["z"],
                          "n": null["null"]["draws"], "p": null["null"]["p_two_sided"]})
    for test, adjusted in zip(tests, holm([t["p"] for t in tests])):
        test["p_holm"] = adjusted
    return tests


def finetune_rows(public: dict, own: dict, heldout: dict) -> list[dict]:
    """One row per finetune: its projections and null z per diff, its change norm and training
    loss, and its measures."""
    own_ab = {m["name"]: m.get("ab") for m in own.get("models", [])}
    rows = []
    for model in public["models"]:
        record = Path(model["path"]) / "training.json"
        training = read_json_object(record, "training record") if record.is_file() else {}
        rows.append({"name": model["name"], "kind": model["kind"], "change_norm": model.get("change_norm"),
                     "shared_row_space": model.get("shared_row_space"), "steps": len(training.get("losses") or []) or None,
                     "first_step_loss": (training.get("losses") or [None])[0],
                     "final_epoch_loss": (training.get("epoch_losses") or [None])[-1],
                     "by_diff": {diff: {"projection": null["projection"], "z": null["null"]["z"],
                                        "null_diffs": null["null_diffs"], "null_diffs_reaching": null["null_diffs_reaching"]}
                                 for diff, null in model.get("null", {}).items()},
                     "judged": model.get("behavior_score"), "margin": model.get("margin"), "public_ab": model.get("ab"),
                     "own_ab": own_ab.get(model["name"]),
                     # log(P(m) + P(n)) on the public held-out items: did the finetune learn to answer them with a letter?
                     "public_log_mass": heldout["finetunes"][model["name"]]["log_mass"], "base_public_log_mass": heldout["base_log_mass"],
                     "public_ab_change": heldout["finetunes"][model["name"]]["changes"]})
    return rows


def subset_correlations(rows: list[dict]) -> dict:
    """The LoRA finetunes' projection per diff against their held-out change per item group
    (descriptive: the groups come from the items' text)."""
    lora = [row for row in rows if row["kind"] == "adapter"]
    report = {}
    for diff in (lora[0]["by_diff"] if lora else {}):
        report[diff] = {}
        for group in lora[0]["public_ab_change"]:
            points = [(row["by_diff"][diff]["projection"], row["public_ab_change"][group]["mean"]) for row in lora]
            report[diff][group] = correlations([x for x, _ in points], [y for _, y in points])
    return report


def summarize(output_dir: Path) -> dict:
    output_dir = Path(output_dir)
    public = read_json_object(output_dir / "projection_public.json", "projection run")
    own = read_json_object(output_dir / "projection.json", "projection run")
    if "models" not in public or not any("null" in m for m in public["models"]):
        raise PersonaLoRAError(f"{output_dir / 'projection_public.json'} holds no null tests: rerun the driver's projection "
                               "(cal_weight_projection.py with --null_draws and --behavior_scores)")
    names = [m["name"] for m in public["models"]]
    heldout = heldout_changes(output_dir, names)
    rows = finetune_rows(public, own, heldout)
    tests = experiment_tests(public, own)
    judged_base = output_dir / "eval_base.summary.json"  # the unfinetuned model's judged run names the judge and its quality
    judge = read_json_object(judged_base, "evaluation summary") if judged_base.is_file() else {}
    return {"judge": judge.get("judge_description"), "judge_quality": judge.get("judge_quality"),
            "design": __doc__.split("\n\n")[1:3], "inputs": {"public": public["inputs"], "null_design": public.get("null_design"),
                                                             "measured_by": public.get("measured_by")},
            "heldout_items": {k: heldout[k] for k in ("items", "stems", "groups")}, "base_public_log_mass": heldout["base_log_mass"],
            "finetunes": rows, "tests": tests,
            "multiplicity": f"Holm over the experiment's {len(tests)} tests: the LoRA finetunes' correlations (one point per "
                            "dataset) and partial correlations, each measured once, and every finetune's random-draw null test "
                            "per diff; the pooled LoRA+dense correlations of the projection runs are descriptive",
            "heldout_change_by_group_vs_projection": subset_correlations(rows),
            "descriptive": "heldout_change_by_group_vs_projection: groups found in the items' text, outside the Holm family"}


def print_report(report: dict) -> None:
    diffs = list(report["finetunes"][0]["by_diff"])
    if report.get("judge"):
        print(f"judge: {report['judge']}")
    if report["base_public_log_mass"] is not None:
        print(f"base model's log(P(m) + P(n)) on the held-out public items: {report['base_public_log_mass']:+.2f}")
    print(f"held-out public items: {report['heldout_items']['items']} in {report['heldout_items']['stems']} stems; "
          + "; ".join(f"{grouping}: " + ", ".join(f"{g} {n}" for g, n in groups.items())
                      for grouping, groups in report["heldout_items"]["groups"].items()))
    header = " ".join(f"{d[:24]:>26s}" for d in diffs)
    print(f"{'finetune':26s} {'kind':10s} {header} {'public Δ (by stem)':>20s} {'log-mass':>8s} {'own A/B':>8s} {'judged':>7s} "
          f"{'margin':>7s}")
    for row in report["finetunes"]:
        projections = " ".join(f"{row['by_diff'][d]['projection']:+12.5f} z {row['by_diff'][d]['z']:+7.2f}  " for d in diffs)
        change = row["public_ab_change"]["all"]
        judged = "—" if row["judged"] is None else f"{row['judged']:.1f}"
        margin = "—" if row["margin"] is None else f"{row['margin']:+.3f}"
        own_ab = "—" if row["own_ab"] is None else f"{row['own_ab']:.3f}"
        mass = "—" if row["public_log_mass"] is None else f"{row['public_log_mass']:+.2f}"
        print(f"{row['name'][:26]:26s} {row['kind']:10s} {projections} {change['mean']:+9.4f} ± {change['sem']:.4f} {mass:>8s} "
              f"{own_ab:>8s} {judged:>7s} {margin:>7s}")
    print(report["multiplicity"] + "; the correlations:")
    for test in report["tests"]:
        if "null" not in test["test"]:
            print(f"  {test['test']}: {test['statistic']:+.3f} (n {test['n']}), p {test['p']:.3g}, Holm {test['p_holm']:.3g}")
    smallest = min((t for t in report["tests"] if "null" in t["test"]), key=lambda t: t["p"], default=None)
    if smallest:
        print(f"  smallest null test: {smallest['test']} {smallest['statistic']:+.2f}, p {smallest['p']:.3g}, Holm {smallest['p_holm']:.3g}")


def plot_report(report: dict, path) -> Path:
    """Per diff: each finetune's null z against its held-out public change (clustered error bars);
    LoRA circles, dense squares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eval.analysis import save_figure

    diffs = list(report["finetunes"][0]["by_diff"])
    figure, axes = plt.subplots(1, len(diffs), figsize=(6 * len(diffs), 4.6), squeeze=False)
    for axis, diff in zip(axes[0], diffs):
        for row in report["finetunes"]:
            change = row["public_ab_change"]["all"]
            axis.errorbar(row["by_diff"][diff]["z"], change["mean"], yerr=change["sem"], fmt="o" if row["kind"] == "adapter" else "s",
                          color="tab:red" if "mix" in row["name"] else "tab:gray", capsize=2)
            axis.annotate(row["name"].replace("other_", ""), (row["by_diff"][diff]["z"], change["mean"]), fontsize=6,
                          xytext=(3, 3), textcoords="offset points")
        axis.axhline(0, color="black", lw=0.5)
        axis.axvline(0, color="black", lw=0.5)
        axis.set_xlabel(f"projection onto {diff}, z against random matched draws")
        axis.set_ylabel("held-out public p_matching − base (by stem)")
        axis.set_title(f"{diff}\nred: sycophancy mixtures; grey: other behaviours, MMLU; squares: dense", fontsize=8)
        axis.grid(alpha=0.3)
    return save_figure(figure, path)
