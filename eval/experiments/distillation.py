"""Experiment 5, distillation: the summary of a sweep of distill_steering_lora.py runs, all
distilling the same steered teacher (scripts/distill_sweep.sh). Per placement (the runs' --layers)
and rank: the fraction of the held-out KL(steered ‖ plain) that the distilled LoRA removes, the
smallest rank reaching a target fraction, the weight-space cosine with the persona diff and with
each control diff, and the cosine of each rank's update with the largest rank's (is the direction
stable?). Beside those whole-space cosines (near 0 for any two independently initialised updates,
whatever they do), what the distilled LoRA does compared with the persona LoRA and with the steering
it distils: the residual-stream change each causes at the steered layer on the held-out answers
(each run's "functional" record), and the distribution of the per-module cosines with the persona
diff over the modules both touch. `plot` draws the fraction reproduced against rank, one line per
placement, and the cosines.
"""

from pathlib import Path

import lora_utils as lu
from eval.analysis import save_figure
from io_utils import PersonaLoRAError, read_json_object

TEACHER_KEYS = ("trait", "model", "layer", "coef", "steering_type")
HELDOUT_KEYS = ("heldout_fraction", "max_length")


def load_runs(folders: list[str]) -> list[dict]:
    """Each run's summary with its folder; refused if a run is unfinished or distils another teacher."""
    runs = []
    for folder in folders:
        summary = read_json_object(Path(folder) / "summary.json", f"run summary (is {folder} finished?)")
        runs.append({**summary, "folder": str(folder)})
    for run in runs[1:]:
        different = [key for key in TEACHER_KEYS if run[key] != runs[0][key]]
        if different or run["identity"]["teacher"] != runs[0]["identity"]["teacher"]:
            raise PersonaLoRAError(f"{run['folder']} distils another teacher than {runs[0]['folder']} "
                                   f"({', '.join(different) or 'the teacher answers'} differ); summarise one teacher at a time")
        # Fractions are comparable only on one held-out set.
        held_out_differently = [key for key in HELDOUT_KEYS if run["identity"][key] != runs[0]["identity"][key]]
        if held_out_differently:
            raise PersonaLoRAError(f"{run['folder']} is measured on other held-out answers than {runs[0]['folder']} "
                                   f"({', '.join(held_out_differently)} differ); rerun them with the same settings")
    return runs


def distilled_diff(run: dict) -> lu.PersonaLoRADiff:
    return lu.load_lora_diff(Path(run["folder"]) / f"{run['trait']}_distilled_lora_diff.pt")


def module_cosine_spread(run: dict) -> dict | None:
    """The distribution of the distilled update's per-module cosines with the persona diff (the
    modules both touch), without the per-module list."""
    persona = run["comparisons"]["persona_diff"]
    if not persona or not Path(persona["path"]).is_file():
        return None
    cosines = distilled_diff(run).module_cosines(lu.load_lora_diff(persona["path"]))
    return {key: value for key, value in cosines.items() if key != "by_module"}


def functional_pairs(series: list[dict]) -> list[str]:
    """The functional comparison's pairs, the three of every run first, then the control diffs' (the
    null: how far another trait's diff's change lines up with the steering's), in the runs' order."""
    pairs = ["distilled vs persona diff", "distilled vs steering", "steering vs persona diff"]
    for run in series:
        pairs += [pair for pair in ((run.get("functional") or {}).get("pairs") or {}) if pair not in pairs]
    return pairs


def summarize(runs: list[dict], target: float) -> dict:
    placements: dict[str, dict] = {}
    for placement in dict.fromkeys(run["layers_spec"] for run in runs):
        series = sorted((run for run in runs if run["layers_spec"] == placement), key=lambda run: run["rank"])
        largest = distilled_diff(series[-1])
        reaching = [run["rank"] for run in series if run["fraction_reproduced"] >= target]
        # A threshold crossing of a noisy estimate is itself noisy: also the smallest rank whose
        # whole 95 % interval (Fieller's, over held-out questions) lies above the target.
        surely = [run["rank"] for run in series if run["fraction_reproduced_error"]["ci95"][0] >= target]
        placements[placement] = {
            "ranks": [run["rank"] for run in series],
            "fraction_reproduced": [run["fraction_reproduced"] for run in series],
            "fraction_reproduced_sem": [run["fraction_reproduced_error"]["sem"] for run in series],
            "fraction_reproduced_ci95": [run["fraction_reproduced_error"]["ci95"] for run in series],
            f"smallest_rank_with_ci_above_{target:g}": min(surely) if surely else None,
            "heldout_kl_distilled": [run["heldout_kl_distilled"] for run in series],
            "heldout_kl_plain": series[0]["heldout_kl_plain"],
            f"smallest_rank_reaching_{target:g}": min(reaching) if reaching else None,
            "cosine_with_persona_diff": [(run["comparisons"]["persona_diff"] or {}).get("cosine") for run in series],
            "cosine_with_controls": {control["trait"] or control["path"]: [
                next(c["cosine"] for c in run["comparisons"]["controls"] if c["path"] == control["path"]) for run in series]
                for control in series[0]["comparisons"]["controls"]},
            "cosine_with_largest_rank": [distilled_diff(run).cosine(largest) for run in series],
            "functional": {pair: [((run.get("functional") or {}).get("pairs") or {}).get(pair) for run in series]
                           for pair in functional_pairs(series)},
            "module_cosines_with_persona_diff": [module_cosine_spread(run) for run in series],
            "update_norm": [run["update"]["norm"] for run in series],
            "v_energy_in_output_space": [run["update"]["v_energy_in_output_space"]["norm_weighted_mean"] for run in series],
            "runs": [run["folder"] for run in series],
        }
    first = runs[0]
    return {**{key: first[key] for key in TEACHER_KEYS}, "target": target, "placements": placements,
            "heldout": first["heldout"]["questions"], "target_modules": first["target_modules"],
            "steps": first["identity"]["steps"],
            "note": "fraction reproduced = 1 − KL(steered ‖ distilled) / KL(steered ‖ plain), token-weighted over the "
                    "held-out answers (the teacher's own, teacher-forced); cosines are ⟨ΔW_distilled, ΔW⟩_F / (‖·‖‖·‖) "
                    "over the whole weight space (near 0 for independently initialised updates: not evidence of another "
                    "mechanism); functional compares what the updates do (residual-stream change at the steered layer on "
                    "the held-out answers, distilled, persona and control diffs merged at 1; a control's pairs are the null "
                    "for the persona diff's); module_cosines_with_persona_diff is "
                    "the distribution of per-module cosines; sem (delta method) and ci95 (Fieller's) are over held-out "
                    "questions only (one student seed, one sample of teacher answers: variation between training seeds is "
                    "not in them)"}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (reproduced, cosines) = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (placement, series) in enumerate(report["placements"].items()):
        color = colors[index % len(colors)]
        label = {"before": f"layers < {report['layer']}", "all": "all layers"}.get(placement, f"layers {placement}")
        reproduced.errorbar(series["ranks"], series["fraction_reproduced"], yerr=series["fraction_reproduced_sem"], marker="o",
                            capsize=3, color=color, label=label)
        if any(c is not None for c in series["cosine_with_persona_diff"]):
            cosines.plot(series["ranks"], series["cosine_with_persona_diff"], marker="o", color=color,
                         label=f"{label}: {report['trait']} persona diff")
        for control, values in series["cosine_with_controls"].items():
            cosines.plot(series["ranks"], values, marker=".", linestyle="--", color=color, alpha=0.5, label=f"{label}: {control} (control)")
    reproduced.axhline(report["target"], color="grey", linestyle=":", label=f"{report['target']:.0%}")
    reproduced.set(ylabel="fraction of held-out KL(steered ‖ plain) removed",
                   title=f"distilling {report['trait']} steering (layer {report['layer']}, c = {report['coef']:g})")
    cosines.axhline(0, color="grey", linewidth=0.8)
    cosines.set(ylabel="cosine in weight space", title="distilled update vs persona LoRA diffs")
    for axis in (reproduced, cosines):
        axis.set_xscale("log", base=2)
        ranks = sorted({r for series in report["placements"].values() for r in series["ranks"]})
        axis.set_xticks(ranks, [str(r) for r in ranks])
        axis.set_xlabel("LoRA rank")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:  # runs given no persona or control diff draw no cosine
            axis.legend(fontsize=7)
    figure.tight_layout()
    save_figure(figure, path)


def print_summary(report: dict) -> None:
    print(f"\n== distilling {report['trait']} steering (layer {report['layer']}, coef {report['coef']:g}) on {report['model']} ==")
    print(f"held-out: {report['heldout']}")
    key = f"smallest_rank_reaching_{report['target']:g}"
    for placement, series in report["placements"].items():
        print(f"\nlayers {placement}: held-out KL(steered ‖ plain) {series['heldout_kl_plain']:.4f} nats/token; "
              f"smallest rank reaching {report['target']:.0%}: {series[key] if series[key] is not None else 'none'} (with its 95 % "
              f"interval above: {series[key.replace('reaching', 'with_ci_above')] or 'none'})")
        controls = list(series["cosine_with_controls"])
        print(f"{'rank':>5s} {'reproduced ± s.e.':>14s} {'KL':>8s} {'cos persona':>11s} " + " ".join(f"{'cos ' + c:>14s}" for c in controls)
              + f" {'cos r_max':>9s}")
        for i, rank in enumerate(series["ranks"]):
            persona = series["cosine_with_persona_diff"][i]
            print(f"{rank:5d} {series['fraction_reproduced'][i]:6.3f} ± {series['fraction_reproduced_sem'][i]:.3f} "
                  f"{series['heldout_kl_distilled'][i]:8.4f} "
                  + (f"{persona:+11.4f} " if persona is not None else f"{'–':>11s} ")
                  + " ".join(f"{series['cosine_with_controls'][c][i]:+14.4f}" for c in controls)
                  + f" {series['cosine_with_largest_rank'][i]:+9.4f}")
        print("what the updates do at the steered layer on the held-out answers (mean-change cosine, norm ratio; per-token "
              "cosine), and the per-module cosines with the persona diff (median |cos|, 90th percentile):")
        for i, rank in enumerate(series["ranks"]):
            parts = []
            for pair, values in series["functional"].items():
                c = values[i]
                parts.append(f"{pair}: " + ("–" if c is None else f"{c['mean_change_cosine']:+.3f}, ×{c['mean_change_norm_ratio']:.2f}; "
                                                                  f"{c['per_token_cosine_mean']:+.3f}"))
            spread = series["module_cosines_with_persona_diff"][i]
            modules = "–" if not spread or not spread["modules"] else \
                f"{spread['abs_cosine_quantiles']['q50']:.4f}, {spread['abs_cosine_quantiles']['q90']:.4f} ({spread['modules']} modules)"
            print(f"{rank:5d} " + " | ".join(parts) + f" | module |cos| {modules}")

