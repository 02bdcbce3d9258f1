"""eval_lora_persona.py and eval/eval_persona.py on a tiny random Llama with the offline judge."""

import argparse
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import lora_utils as lu
from conftest import run_main, run_script
from eval.activations import ActivationSteerer, decoder_layers
from eval.traits import load_trait
from io_utils import cache_dir
from model_loading import load_model_and_tokenizer

DATA = Path(__file__).parent / "data"
EXPECTED_COLUMNS = ["question_id", "question", "prompt", "answer", "evil", "coherence", "coef", "method"]


@pytest.fixture
def tiny_diff(tiny_persona):
    return tiny_persona[0]


def common(tiny_model_dir, judge_data, cache_dir):
    return ["--model", tiny_model_dir, "--trait", "evil", "--n_per_question", "1", "--max_new_tokens", "5",
            "--temperature", "1.0", "--judge", "offline", "--judge_data", judge_data, "--dtype", "float32"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONA_LORAS_CACHE", str(cache_dir()))  # keep the converted embedded model
    monkeypatch.setattr("eval.judge.cache_dir", lambda: tmp_path / "judge-cache")


@pytest.mark.judge
def test_sweep_writes_csv_schema_summary_and_manifest(tiny_model_dir, judge_data, tiny_diff, tmp_path):
    out = tmp_path / "sweep.csv"
    assert run_script("eval_lora_persona", *common(tiny_model_dir, judge_data, tmp_path), "--lora_diff_path", tiny_diff,
                      "--lora_coef", "0", "4", "--output_path", out) == 0
    frame = pd.read_csv(out)
    assert list(frame.columns) == EXPECTED_COLUMNS
    questions = len(load_trait("evil").evaluation_questions)
    assert len(frame) == 2 * questions and sorted(frame.coef.unique()) == [0, 4]
    assert set(frame.method) == {"lora"} and frame.evil.between(0, 100).all() and frame.coherence.between(0, 100).all()
    assert frame.prompt.str.contains("<|im_start|>assistant", regex=False).all()
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert "OFFLINE PROXY" in summary["judge_description"] and summary["judge_quality"]["held_out_auroc"] > 0.5
    assert [c["coef"] for c in summary["conditions"]] == [0, 4]
    assert all(c["answers"] == questions and c["missing"] == 0 for c in summary["conditions"])
    assert json.loads((tmp_path / "sweep.manifest.json").read_text())["arguments"]["lora_coef"] == [0.0, 4.0]


def test_sweep_restores_weights_between_and_after_coefficients(tiny_model_dir, tiny_diff, tmp_path):
    from eval.evaluate import EvalRun, generate_condition
    from eval.generation import GenerationSettings
    from eval_lora_persona import lora_conditions

    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), dtype="float32")
    args = argparse.Namespace(lora_diff_path=[str(tiny_diff)], lora_coef=[0.0, 8.0, 0.0], backup_device=None)
    run = EvalRun(load_trait("evil"), GenerationSettings(str(tiny_model_dir), n_per_question=1, max_new_tokens=4, temperature=0.0,
                                                         batch_size=32), tmp_path / "out.csv", arguments={})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    conditions = lora_conditions(args, model, [lu.load_lora_diff(tiny_diff)])
    answers = []
    for condition in conditions:
        records = generate_condition(run, model, tokenizer, condition, tmp_path / "work")
        answers.append([r["messages"][-1]["content"] for r in records])
        for name, param in model.named_parameters():
            assert torch.equal(param, before[name]), name
    assert answers[0] == answers[2]  # the coefficient-0 run after a steered one is unaffected by it
    assert answers[1] != answers[0]  # and the steered one did change the model


@pytest.mark.judge
def test_interrupted_run_resumes_without_lost_or_duplicated_rows(tiny_model_dir, judge_data, tiny_diff, tmp_path, monkeypatch):
    import eval.generation as generation

    real_generate_batch, calls = generation.generate_batch, {"n": 0}

    def crash_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_generate_batch(*args, **kwargs)

    out = tmp_path / "resume.csv"
    flags = [*common(tiny_model_dir, judge_data, tmp_path), "--lora_diff_path", tiny_diff, "--lora_coef", "1", "2",
             "--batch_size", "8", "--output_path", out]
    monkeypatch.setattr(generation, "generate_batch", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run_script("eval_lora_persona", *flags)
    assert not out.exists()  # no half-written CSV
    partial = next((tmp_path / ".resume.work").glob("*.partial"))
    done_before = [json.loads(line) for line in partial.read_text().splitlines()]
    assert len(done_before) == 16
    monkeypatch.setattr(generation, "generate_batch", real_generate_batch)
    assert run_script("eval_lora_persona", *flags) == 0
    frame = pd.read_csv(out)
    questions = len(load_trait("evil").evaluation_questions)
    assert len(frame) == 2 * questions
    assert not frame.duplicated(["question_id", "coef"]).any()
    first = frame[frame.coef == 1].set_index("question_id")
    for record in done_before:  # answers finished before the crash are kept, not regenerated
        assert first.loc[record["question_id"], "answer"] == record["messages"][-1]["content"].strip()


@pytest.mark.judge
def test_activation_eval_same_schema_and_refuses_wrong_vector(tiny_model_dir, judge_data, tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    vector_path = tmp_path / "evil_response_avg_diff.pt"
    torch.save(torch.randn(config.num_hidden_layers + 1, config.hidden_size), vector_path)
    out = tmp_path / "act.csv"
    assert run_script("eval.eval_persona", *common(tiny_model_dir, judge_data, tmp_path), "--vector_path", vector_path,
                      "--layer", "2", "--coef", "3", "--steering_type", "all", "--output_path", out) == 0
    frame = pd.read_csv(out)
    assert list(frame.columns) == EXPECTED_COLUMNS and set(frame.method) == {"activation"} and set(frame.coef) == {3}
    prompted = tmp_path / "prompt.csv"
    assert run_script("eval.eval_persona", *common(tiny_model_dir, judge_data, tmp_path), "--persona_instruction_type", "pos",
                      "--output_path", prompted) == 0
    rows = pd.read_csv(prompted)
    assert set(rows.method) == {"system_prompt"} and rows.prompt.str.contains("malicious|cruelty|villain|despises|hostile").all()
    torch.save(torch.randn(7, config.hidden_size), tmp_path / "wrong.pt")
    code, _, err = run_main("eval/eval_persona", *common(tiny_model_dir, judge_data, tmp_path), "--vector_path", tmp_path / "wrong.pt",
                           "--output_path", tmp_path / "wrong.csv")
    assert code == 2 and "has shape (7, 32)" in err and not (tmp_path / "wrong.csv").exists()


def test_activation_hook_positions_and_removal(tiny_model):
    layers = decoder_layers(tiny_model)
    vector = torch.randn(len(layers) + 1, tiny_model.config.hidden_size)
    tokens = torch.randint(3, 96, (2, 7))
    with torch.no_grad():
        plain = tiny_model(tokens).logits
        with ActivationSteerer(tiny_model, vector, layer=2, coef=4.0, positions="all"):
            steered_all = tiny_model(tokens).logits
        with ActivationSteerer(tiny_model, vector, layer=2, coef=4.0, positions="response"):
            steered_last = tiny_model(tokens).logits
        with ActivationSteerer(tiny_model, vector, layer=2, coef=4.0, positions="prompt"):
            one_token = tiny_model(tokens[:, :1]).logits  # a decode step: the prompt type leaves it alone
    assert not torch.allclose(steered_all[:, 0], plain[:, 0])
    torch.testing.assert_close(steered_last[:, :-1], plain[:, :-1])  # only the last position is steered
    assert not torch.allclose(steered_last[:, -1], plain[:, -1])
    torch.testing.assert_close(one_token, tiny_model(tokens[:, :1]).logits)
    with pytest.raises(RuntimeError):
        with ActivationSteerer(tiny_model, vector, layer=2, coef=4.0):
            raise RuntimeError("boom")
    assert all(not layer._forward_hooks for layer in layers)
    torch.testing.assert_close(tiny_model(tokens).logits, plain)


def test_steering_at_layer_l_moves_hidden_state_l_by_coef_v(tiny_model):
    """Persona Vectors' convention: steering 'at layer ℓ' adds c·v[ℓ] to hidden_states[ℓ], the
    residual stream that block ℓ reads. (transformers 5 records output_hidden_states with hooks of
    its own that fire before ours, so the residual is read here from block ℓ's input.)"""
    layers = decoder_layers(tiny_model)
    vector = torch.randn(len(layers) + 1, tiny_model.config.hidden_size)
    tokens = torch.randint(3, 96, (1, 5))
    seen = []
    handle = layers[2].register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]),
                                                 with_kwargs=True)
    try:
        with torch.no_grad():
            plain_states = tiny_model(tokens, output_hidden_states=True).hidden_states
            with ActivationSteerer(tiny_model, vector, layer=2, coef=0.5, positions="all"):
                tiny_model(tokens)
    finally:
        handle.remove()
    plain_input, steered_input = seen
    torch.testing.assert_close(plain_input, plain_states[2])  # hidden_states[2] is what block 2 reads
    torch.testing.assert_close(steered_input, plain_input + 0.5 * vector[2])


@pytest.mark.judge
def test_adapter_flag_evaluates_the_finetune_and_refuses_a_foreign_adapter(tiny_model_dir, judge_data, tmp_path):
    from transformers import AutoModelForCausalLM

    from conftest import make_adapter, make_tiny_llama
    adapter, _ = make_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), tmp_path / "ft", seed=4,
                              r=2, alpha=64)
    outputs = {}
    for label, extra in (("base", []), ("finetune", ["--adapter", adapter])):
        out = tmp_path / f"{label}.csv"
        assert run_script("eval_lora_persona", *common(tiny_model_dir, judge_data, tmp_path), "--temperature", "0", *extra,
                          "--output_path", out) == 0
        outputs[label] = pd.read_csv(out).answer.tolist()
    assert outputs["base"] != outputs["finetune"]
    assert json.loads((tmp_path / "finetune.summary.json").read_text())["adapter"] == str(adapter)
    foreign, _ = make_adapter(make_tiny_llama(intermediate_size=48), tmp_path / "foreign", seed=5)
    code, _, err = run_main("eval_lora_persona", *common(tiny_model_dir, judge_data, tmp_path), "--adapter", foreign,
                           "--output_path", tmp_path / "x.csv")
    assert code == 2 and "does not fit this model" in err
