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
    assert comparison["fits"]["lora"]["trait"]["points"] == 3  # the baseline is coefficient 0 of both methods
    latency = json.loads((out / "latency.json").read_text())
    assert set(latency["tokens_per_second"]) == {"unsteered", "activation_hook", "merged_lora", "unmerged_peft_adapter"}
    assert all(v > 0 for v in latency["tokens_per_second"].values())
    spaces = json.loads((out / "spaces.json").read_text())
    assert len(spaces["shift_vs_vector_cosine_by_layer"]) == config.num_hidden_layers + 1
    assert spaces["shift_vs_vector_cosine_by_layer"]["0"] == 0  # embeddings are not touched by ΔW
    for name in ("behavior.png", "spaces.png", "manifest.json"):
        assert (out / name).stat().st_size > 0
