"""compare_steering_methods.py end to end on a tiny random Llama (behaviour, latency, spaces)."""

import json

import pandas as pd
import pytest
import torch

from conftest import run_script
from eval.analysis import effective_rank
from eval.stats import linear_fit


def test_linear_fit_and_effective_rank():
    fit = linear_fit([0, 1, 2, 3], [1, 3, 5, 7.5])
    assert fit["slope"] == pytest.approx(2.15) and 0.99 < fit["r2"] < 1
    assert linear_fit([0, 1, 2], [5, 5, 5])["slope"] == 0
    assert effective_rank(torch.tensor([1.0, 1.0, 1.0, 1.0])) == pytest.approx(4)
    assert effective_rank(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1)


@pytest.mark.judge
def test_compare_writes_behaviour_latency_and_spaces(tiny_model_dir, tiny_persona, judge_data, tmp_path, monkeypatch):
    from transformers import AutoConfig

    monkeypatch.setattr("eval.judge.cache_dir", lambda: tmp_path / "judge-cache")
    diff_path, vector_path = tiny_persona
    config = AutoConfig.from_pretrained(tiny_model_dir)
    out = tmp_path / "comparison"
    assert run_script("compare_steering_methods", "--model", tiny_model_dir, "--trait", "evil", "--activation_vector_path", vector_path,
                      "--lora_diff_path", diff_path, "--coefficients", "0", "1", "2", "--output_dir", out, "--layer", "2",
                      "--n_per_question", "1", "--max_new_tokens", "4", "--judge", "offline", "--judge_data", judge_data,
                      "--dtype", "float32", "--test_latency", "--latency_runs", "2", "--latency_tokens", "4", "--analyze_spaces") == 0
    frame = pd.read_csv(out / "behavior.csv")
    assert set(frame.method) == {"baseline", "lora", "activation"} and sorted(frame.coef.unique()) == [0, 1, 2]
    comparison = json.loads((out / "comparison.json").read_text())
    assert set(comparison["fits"]) == {"lora", "activation"}
    summary = json.loads((out / "behavior.summary.json").read_text())
    for method, fit in comparison["fits"].items():
        assert fit["trait"]["points"] == 3  # the baseline is coefficient 0 of both methods
        # The slope is the mean of per-question slopes over coefficients 0, 1, 2: recomputed here.
        points = sorted((c for c in summary["conditions"] if c["method"] in (method, "baseline")), key=lambda c: c["coef"])
        per_question = [linear_fit([p["coef"] for p in points], [p["evil_by_question"][q] for p in points])["slope"]
                        for q in points[0]["evil_by_question"]]
        assert fit["trait"]["slope"] == pytest.approx(sum(per_question) / len(per_question))
        assert set(fit) == {"trait", "coherence", "margin"}
        # In calibrated units: the trait slope per nat of the same method's margin slope.
        calibrated = comparison["calibrated"]["trait"][method]
        assert calibrated["ratio"] == pytest.approx(fit["trait"]["slope"] / fit["margin"]["slope"])
    difference = comparison["calibrated"]["trait"]["difference"]
    assert difference["mean"] == pytest.approx(comparison["calibrated"]["trait"]["lora"]["ratio"]
                                               - comparison["calibrated"]["trait"]["activation"]["ratio"])
    latency = json.loads((out / "latency.json").read_text())
    assert set(latency["tokens_per_second"]) == {"unsteered", "activation_hook", "merged_lora", "unmerged_peft_adapter"}
    assert latency["ratios_vs_unsteered"]["unsteered"] == 1.0 and len(latency["rounds"]) == 2
    spaces = json.loads((out / "spaces.json").read_text())
    assert len(spaces["shift_vs_vector_cosine_by_layer"]) == config.num_hidden_layers + 1
    assert spaces["shift_vs_vector_cosine_by_layer"]["0"] == 0  # embeddings are not touched by ΔW
    best = spaces["residual_write_best"]
    assert best["modules"] == 2 * config.num_hidden_layers and 0 < best["p_value"] <= 1
    assert best["null_max_over_modules_mean"] > best["null_single_subspace_mean"]
    # The plots are real images with one panel per measure (three side by side for behaviour and spaces).
    import matplotlib.image

    for name in ("behavior.png", "spaces.png"):
        image = matplotlib.image.imread(out / name)
        assert image.shape[1] > 2.5 * image.shape[0] and image[..., :3].std() > 0.05, name
