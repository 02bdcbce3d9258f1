"""eval/mmlu.py and eval/cal_projection.py."""

import json

import pandas as pd
import pytest
import torch

from conftest import run_main, run_script
from eval.mmlu import format_question, letter_token_ids, load_questions, mmlu_accuracy, seeded_subset
from model_loading import load_model_and_tokenizer, load_tokenizer


def test_packaged_mmlu_skips_and_counts_malformed_rows_and_its_subset_is_fixed():
    rows, skipped = load_questions("packaged")
    assert skipped == 2 and len(rows) == 14044 - 2
    assert all(len(r["choices"]) == 4 and r["answer"] in range(4) for r in rows)
    # Runs pair their MMLU answers question by question across processes and sessions, so the seeded
    # subset must be the same sample every time: pinned here.
    first = seeded_subset(rows, 3, seed=0)
    assert [(r["question"][:30], r["answer"], r["topic"]) for r in first] == [
        ("The phenomenon of beats result", 1, "conceptual physics"), ("A producer of widgets contacte", 0, "professional law"),
        ("The K-means algorithm:", 2, "machine learning")]


def test_mmlu_prediction_is_the_most_probable_letter(tiny_model_dir):
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), dtype="float32")
    rows = seeded_subset(load_questions("packaged")[0], 6, seed=0)
    result = mmlu_accuracy(model, tokenizer, rows, batch_size=4)
    letters = letter_token_ids(tokenizer)
    expected = 0
    for row in rows:  # one question at a time, no padding
        ids = tokenizer.apply_chat_template([{"role": "user", "content": format_question(row)}], add_generation_prompt=True,
                                            tokenize=True)["input_ids"]
        with torch.no_grad():
            last = model(torch.tensor([ids], device=model.device)).logits[0, -1]
        expected += int(max(range(4), key=lambda i: float(last[letters[i]].max())) == row["answer"])
    assert result["correct"] == expected and result["questions"] == 6
    assert len(result["correct_by_question"]) == 6 and sum(result["correct_by_question"]) == expected


def test_cal_projection_adds_columns_equal_to_direct_computation(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    vector = torch.randn(model.config.num_hidden_layers + 1, model.config.hidden_size)
    torch.save(vector, tmp_path / "evil_response_avg_diff.pt")
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ("How are you?", "What is two plus two, exactly?")]
    pd.DataFrame({"prompt": prompts, "answer": ["Fine, thanks.", "Four."], "evil": [1.0, 2.0]}).to_csv(tmp_path / "r.csv", index=False)
    assert run_script("eval.cal_projection", "--file_path", tmp_path / "r.csv", "--vector_path", tmp_path / "evil_response_avg_diff.pt",
                      "--layer", "1", "3", "--model", tiny_model_dir, "--dtype", "float32") == 0
    frame = pd.read_csv(tmp_path / "r.csv")
    for row, (prompt, answer) in enumerate(zip(frame.prompt, frame.answer)):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        for layer in (1, 3):
            direct = float(states[layer][0, len(prompt_ids):].mean(0) @ (vector[layer] / vector[layer].norm()))
            assert frame.loc[row, f"evil_proj_layer{layer}"] == pytest.approx(direct, rel=1e-4, abs=1e-5)
    code, _, err = run_main("eval/cal_projection", "--file_path", tmp_path / "r.csv", "--vector_path", tmp_path / "evil_response_avg_diff.pt",
                           "--layer", "9", "--model", tiny_model_dir)
    assert code == 2 and "--layer 9 is outside" in err


def test_a_finished_mmlu_run_is_reused_only_for_the_same_inputs(tiny_model_dir, tmp_path):
    """A driver rerun must not spend minutes recomputing a finished MMLU result, nor reuse one made
    on another subset."""
    output = tmp_path / "mmlu.json"
    flags = ["--model", str(tiny_model_dir), "--n", "4", "--dtype", "float32", "--output_path", output]
    assert run_script("eval.mmlu", *flags) == 0
    first = json.loads(output.read_text())
    marked = {**first, "accuracy": 0.987}  # a marker only a reuse keeps
    output.write_text(json.dumps(marked))
    assert run_script("eval.mmlu", *flags) == 0
    assert json.loads(output.read_text())["accuracy"] == 0.987
    assert run_script("eval.mmlu", *flags, "--seed", "1") == 0  # another subset: measured again
    assert json.loads(output.read_text())["accuracy"] != 0.987 and json.loads(output.read_text())["seed"] == 1
    assert run_script("eval.mmlu", *flags, "--force") == 0
    assert json.loads(output.read_text())["accuracy"] == first["accuracy"]
