"""Fits, spectra and plots shared by compare_steering_methods.py and the experiment drivers."""

from __future__ import annotations

from pathlib import Path

import torch

import lora_utils as lu
from io_utils import atomic_path


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular values (Roy & Vetterli, 2007)."""
    p = singular_values[singular_values > 0].double()
    p = p / p.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def trait_similarity(traits: dict[str, tuple["lu.PersonaLoRADiff", torch.Tensor]], layer: int) -> dict:
    """Cosine between traits in weight space (⟨ΔW_a, ΔW_b⟩_F from the factors, never dense; over the
    whole space, and the distribution of the within-module cosines) and in activation space (the
    persona vectors at `layer`). `traits` maps a name to (diff, vector). A weight-space cosine near 0
    is what independently initialised adapters give whatever they learned: it says nothing about
    whether the traits' behaviours are independent (that is what a composition's simple effects test)."""
    names = list(traits)
    weight = {a: {b: traits[a][0].cosine(traits[b][0]) for b in names} for a in names}
    modules = {a: {b: {k: v for k, v in traits[a][0].module_cosines(traits[b][0]).items() if k != "by_module"}
                   for b in names if b != a} for a in names}
    activation = {a: {b: float(torch.nn.functional.cosine_similarity(traits[a][1][layer], traits[b][1][layer], dim=0))
                      for b in names} for a in names}
    return {"traits": names, "weight_space_cosine": weight, "weight_space_module_cosines": modules,
            f"activation_space_cosine_layer{layer}": activation,
            "note": "weight-space cosines near 0 follow from independent initialisations; they are no evidence that the "
                    "traits act independently"}


def save_figure(figure, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=130, bbox_inches="tight", format=Path(path).suffix.lstrip(".") or "png")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return Path(path)


def plot_sweep(series: dict[str, list[dict]], trait: str, path: str | Path, title: str) -> Path:
    """Panels against the coefficient, one line per method with standard-error bars: the judged
    trait score, coherence and (when measured) the judge-free margin. `series` maps a method to its
    condition summaries (coef, <metric>_mean, <metric>_sem)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [(trait, f"{trait} score (0–100, judged)"), ("coherence", "coherence (0–100)")]
    if all("margin_mean" in p for points in series.values() for p in points):
        metrics.append(("margin", "log-likelihood margin (nats/token, no judge)"))
    figure, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4))
    for method, points in series.items():
        points = sorted(points, key=lambda p: p["coef"])
        coefs = [p["coef"] for p in points]
        for axis, (metric, _) in zip(axes, metrics):
            axis.errorbar(coefs, [p[f"{metric}_mean"] for p in points], yerr=[p[f"{metric}_sem"] for p in points],
                          marker="o", capsize=3, label=method)
    for axis, (_, label) in zip(axes, metrics):
        axis.set(xlabel="steering coefficient", ylabel=label)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title, fontsize=9)
    return save_figure(figure, path)


def plot_ab_sweep(series: dict[str, list[dict]], path: str | Path, title: str) -> Path:
    """Forced choice against the coefficient, one line per method: the balanced p_matching (both
    orders of the choices) with its paired error, and P(first choice), which shows letter bias."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, points in series.items():
        points = sorted(points, key=lambda p: p["coef"])
        coefs = [p["coef"] for p in points]
        axes[0].errorbar(coefs, [p["balanced_p_matching_both_orders"] for p in points],
                         yerr=[p.get("change_vs_baseline", {}).get("balanced_p_matching_both_orders_sem", 0.0) for p in points],
                         marker="o", capsize=3, label=method)
        axes[1].plot(coefs, [p["p_first_choice"] for p in points], marker="o", label=method)
    axes[0].axhline(0.5, color="grey", linestyle=":")
    axes[1].axhline(0.5, color="grey", linestyle=":")
    axes[0].set(xlabel="steering coefficient", ylabel="balanced p_matching (± paired s.e. of the change)")
    axes[1].set(xlabel="steering coefficient", ylabel="P(first choice): position bias")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title, fontsize=9)
    return save_figure(figure, path)
