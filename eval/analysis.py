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
    """Cosine between traits in weight space (⟨ΔW_a, ΔW_b⟩_F from the factors, never dense) and in
    activation space (the persona vectors at `layer`). `traits` maps a name to (diff, vector)."""
    names = list(traits)
    weight = {a: {b: traits[a][0].cosine(traits[b][0]) for b in names} for a in names}
    activation = {a: {b: float(torch.nn.functional.cosine_similarity(traits[a][1][layer], traits[b][1][layer], dim=0))
                      for b in names} for a in names}
    return {"traits": names, "weight_space_cosine": weight, f"activation_space_cosine_layer{layer}": activation}


def save_figure(figure, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=130, bbox_inches="tight", format=Path(path).suffix.lstrip(".") or "png")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return Path(path)


def plot_sweep(series: dict[str, list[dict]], trait: str, path: str | Path, title: str) -> Path:
    """Two panels, trait score and coherence against the coefficient, one line per method with
    standard-error bars. `series` maps a method to its condition summaries (coef, means, sems)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, points in series.items():
        points = sorted(points, key=lambda p: p["coef"])
        coefs = [p["coef"] for p in points]
        for axis, metric in zip(axes, (trait, "coherence")):
            axis.errorbar(coefs, [p[f"{metric}_mean"] for p in points], yerr=[p[f"{metric}_sem"] for p in points],
                          marker="o", capsize=3, label=method)
    for axis, metric in zip(axes, (f"{trait} score", "coherence")):
        axis.set_xlabel("steering coefficient")
        axis.set_ylabel(f"{metric} (0–100)")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title, fontsize=10)
    return save_figure(figure, path)
