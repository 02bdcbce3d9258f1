"""The one reuse rule for generated answers (eval.generation.cached_generation): same identity →
reused without generating; interrupted → continued; other settings, unknown provenance or other
jobs → refused in one line naming what changed."""

import json

import pytest
import torch

from eval.generation import GenerationSettings, answers_identity, cached_generation, generate_records, reusable_answers
from io_utils import PersonaLoRAError
from model_loading import load_tokenizer


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), load_tokenizer(str(tiny_model_dir))


JOBS = [{"id": f"j{i}", "messages": [{"role": "user", "content": f"question {i}"}]} for i in range(5)]


def settings(tiny_model_dir, **overrides):
    values = dict(model=str(tiny_model_dir), n_per_question=1, max_new_tokens=4, temperature=1.0, batch_size=2, seed=0)
    return GenerationSettings(**{**values, **overrides})


def test_same_identity_is_reused_without_generating(model_and_tokenizer, tiny_model_dir, tmp_path, monkeypatch):
    import eval.generation

    model, tokenizer = model_and_tokenizer
    path = tmp_path / "answers.jsonl"
    first = cached_generation(model, tokenizer, JOBS, path, settings(tiny_model_dir), seed=7, desc="t", trait_file_sha256="abc")
    assert json.loads((tmp_path / "answers.generation.json").read_text())["generation_seed"] == 7

    def no_generation(*args, **kwargs):
        raise AssertionError("answers of the same identity were generated again")

    monkeypatch.setattr(eval.generation, "generate_records", no_generation)
    again = cached_generation(model, tokenizer, JOBS, path, settings(tiny_model_dir), seed=7, desc="t", trait_file_sha256="abc")
    assert again == first


@pytest.mark.parametrize("change, named", [
    (dict(overrides={"temperature": 0.5}), "temperature"),
    (dict(seed=8), "generation_seed"),
    (dict(what={"trait_file_sha256": "another trait file"}), "trait_file_sha256"),
])
def test_answers_of_other_settings_are_refused_naming_what_changed(model_and_tokenizer, tiny_model_dir, tmp_path, change, named):
    model, tokenizer = model_and_tokenizer
    path = tmp_path / "answers.jsonl"
    cached_generation(model, tokenizer, JOBS, path, settings(tiny_model_dir), seed=7, desc="t", trait_file_sha256="abc")
    kept = path.read_text()
    with pytest.raises(PersonaLoRAError, match=rf"generated with other settings \(.*{named}.*\); delete it to regenerate"):
        cached_generation(model, tokenizer, JOBS, path, settings(tiny_model_dir, **change.get("overrides", {})),
                          seed=change.get("seed", 7), desc="t", **change.get("what", {"trait_file_sha256": "abc"}))
    assert path.read_text() == kept  # somebody's answers are never overwritten


def test_answers_without_a_record_or_for_other_jobs_are_refused(model_and_tokenizer, tiny_model_dir, tmp_path):
    model, tokenizer = model_and_tokenizer
    path = tmp_path / "answers.jsonl"
    generate_records(model, tokenizer, JOBS, path, max_new_tokens=4, temperature=1.0, batch_size=2, seed=7)
    with pytest.raises(PersonaLoRAError, match="no record of how they were made"):
        cached_generation(model, tokenizer, JOBS, path, settings(tiny_model_dir), seed=7, desc="t")
    cached_path = tmp_path / "cached.jsonl"
    cached_generation(model, tokenizer, JOBS, cached_path, settings(tiny_model_dir), seed=7, desc="t")
    with pytest.raises(PersonaLoRAError, match="answers other jobs"):
        cached_generation(model, tokenizer, JOBS[:3], cached_path, settings(tiny_model_dir), seed=7, desc="t")


def test_an_interrupted_run_is_continued_to_the_same_answers(model_and_tokenizer, tiny_model_dir, tmp_path):
    model, tokenizer = model_and_tokenizer
    reference = cached_generation(model, tokenizer, JOBS, tmp_path / "ref.jsonl", settings(tiny_model_dir), seed=7, desc="t")
    path = tmp_path / "answers.jsonl"
    identity = answers_identity(settings(tiny_model_dir), model.dtype, 7)
    (tmp_path / "answers.generation.json").write_text(json.dumps(identity))
    path.with_name(path.name + ".partial").write_text("".join(json.dumps(r) + "\n" for r in reference[:2]))
    assert reusable_answers(path, identity, JOBS) is None  # a partial file of this identity is continued, not refused
    resumed = cached_generation(model, tokenizer, JOBS, path, settings(tiny_model_dir), seed=7, desc="t")
    assert resumed == reference
