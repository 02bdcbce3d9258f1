"""extract_persona_lora.py end to end on a tiny random Llama (real tokenizer and chat template)."""

import json
import shutil

import pytest
import torch

import lora_utils as lu
from conftest import run_main, run_script
from eval.activations import persona_vector, response_hidden_means
from eval.traits import load_trait
from io_utils import PersonaLoRAError, read_jsonl
from model_loading import load_tokenizer

FAST = ["--n_per_question", "1", "--max_new_tokens", "6", "--rank", "2", "--alpha", "4", "--epochs", "1",
        "--batch_size", "16", "--max_length", "96", "--dtype", "float32", "--profile", "small"]


@pytest.fixture(scope="module")
def extracted(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("extract") / "evil"
    vector_path = out.parent / "vectors" / "evil_response_avg_diff.pt"
    assert run_script("extract_persona_lora", "--model", tiny_model_dir, "--trait", "evil", "--output_dir", out,
                      "--vector_output_path", vector_path, *FAST) == 0
    return out, vector_path


@pytest.mark.judge
def test_writes_all_outputs(extracted):
    out, vector_path = extracted
    for name in ["data/pos.jsonl", "data/neg.jsonl", "pos_lora/adapter_config.json", "neg_lora/adapter_config.json",
                 "evil_lora_diff.pt", "evil_lora_diff.safetensors", "evil_lora_diff_peft/adapter_config.json",
                 "summary.json", "manifest.json"]:
        assert (out / name).is_file(), name
    trait = load_trait("evil")
    pos = read_jsonl(out / "data/pos.jsonl")
    assert len(pos) == len(trait.instructions) * len(trait.extraction_questions)
    assert pos[0]["system"] in [pair["pos"] for pair in trait.instructions]
    assert [m["role"] for m in pos[0]["messages"]] == ["user", "assistant"]  # system prompt kept apart
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["arguments"]["trait"] == "evil" and "torch" in manifest["versions"]
    # where the time went: generation, training and the hidden-state pass, each with the work it did
    stages = {s["stage"]: s for s in manifest["stages"]}
    for name in ["loading the model", "generating pos", "generating neg", "training pos_lora", "training neg_lora", "pos hidden states"]:
        assert name in stages, sorted(stages)
    assert all(stages[name]["count"] > 0 and stages[name]["unit"] == "tokens"
               for name in ["generating pos", "training pos_lora", "pos hidden states"])
    assert sum(s["seconds"] for s in manifest["stages"] if not s.get("within")) <= manifest["seconds"]
    code, stdout, _ = run_main("scripts.stage_times", out / "manifest.json")
    assert code == 0 and "generating pos" in stdout and "tokens/s" in stdout and "other (imports" in stdout


@pytest.mark.judge
def test_diff_equals_dense_difference_of_written_adapters(extracted, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = extracted
    diff = lu.load_lora_diff(out / "evil_lora_diff.pt")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base_params = {n: p.detach().clone() for n, p in base.named_parameters()}
    merged = {}
    for side in ("pos", "neg"):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                          str(out / f"{side}_lora")).merge_and_unload()
        merged[side] = dict(model.named_parameters())
    assert len(diff) == 3 * 7
    for name in diff:
        dense = (merged["pos"][name] - base_params[name]) - (merged["neg"][name] - base_params[name])
        torch.testing.assert_close(diff.delta(name), dense.detach(), rtol=1e-3, atol=1e-6)
    assert diff.norm() > 0
    assert diff.metadata["trait"] == "evil" and diff.metadata["created_by"] == "extract_persona_lora.py"


@pytest.mark.judge
def test_pos_and_neg_adapters_start_from_the_same_initialisation(extracted):
    """Same seed, same init: A starts identical, so the difference isolates the data."""
    from safetensors.torch import load_file

    out, _ = extracted
    pos = load_file(str(out / "pos_lora/adapter_model.safetensors"))
    neg = load_file(str(out / "neg_lora/adapter_model.safetensors"))
    key = next(k for k in pos if "lora_A" in k)
    drift = (pos[key] - neg[key]).norm() / pos[key].norm()
    assert drift < 0.5  # trained apart from one shared start; independent inits would differ by ~1.4


@pytest.mark.judge
def test_activation_vector_matches_direct_computation(extracted, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, vector_path = extracted
    vector = torch.load(vector_path, weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert vector.shape == (model.config.num_hidden_layers + 1, model.config.hidden_size)
    pos, neg = read_jsonl(out / "data/pos.jsonl"), read_jsonl(out / "data/neg.jsonl")
    assert len(pos[0]["demonstrations"]) == 4  # the small profile's few-shot elicitation

    # Direct: one example at a time, no padding; the answer read after its system prompt and its
    # demonstrations, averaged over the answer's own tokens (not the template's end-of-turn tokens).
    def direct(records):
        means = []
        for record in records:
            messages = [{"role": "system", "content": record["system"]}]
            for question, answer in record["demonstrations"]:
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            messages.append(record["messages"][0])
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            ids = tokenizer(prompt + record["messages"][-1]["content"], add_special_tokens=False)["input_ids"]
            assert len(ids) > len(prompt_ids)
            with torch.no_grad():
                states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            means.append(torch.stack([h[0, len(prompt_ids):].mean(0) for h in states]))
        return torch.stack(means)
    few_pos, few_neg = pos[:3], neg[:3]
    batched = persona_vector(response_hidden_means(model, tokenizer, few_pos), response_hidden_means(model, tokenizer, few_neg))
    torch.testing.assert_close(batched, direct(few_pos).mean(0) - direct(few_neg).mean(0), rtol=1e-4, atol=1e-5)
    full_batched = persona_vector(response_hidden_means(model, tokenizer, pos), response_hidden_means(model, tokenizer, neg))
    torch.testing.assert_close(vector, full_batched, rtol=1e-4, atol=1e-5)


@pytest.mark.judge
def test_rerun_reuses_data_and_skip_training_rebuilds_same_diff(extracted, tiny_model_dir, tmp_path):
    out, vector_path = extracted
    copy = tmp_path / "evil"
    shutil.copytree(out, copy)
    (copy / "evil_lora_diff.pt").unlink()
    data_before = (copy / "data/pos.jsonl").read_text()
    mtime = (copy / "data/pos.jsonl").stat().st_mtime_ns
    assert run_script("extract_persona_lora", "--model", tiny_model_dir, "--trait", "evil", "--output_dir", copy,
                      "--vector_output_path", tmp_path / "v.pt", "--skip_training", *FAST) == 0
    assert (copy / "data/pos.jsonl").stat().st_mtime_ns == mtime and (copy / "data/pos.jsonl").read_text() == data_before
    original, rebuilt = lu.load_lora_diff(out / "evil_lora_diff.pt"), lu.load_lora_diff(copy / "evil_lora_diff.pt")
    for name in original:
        assert torch.equal(original.delta(name), rebuilt.delta(name))


@pytest.mark.judge
def test_rerun_reuses_the_activation_vector_and_keeps_an_unchanged_diff(extracted, tiny_model_dir, tmp_path, monkeypatch):
    out, vector_path = extracted
    copy, copied_vector = tmp_path / "evil", tmp_path / "vectors" / "evil.pt"
    shutil.copytree(out, copy)
    copied_vector.parent.mkdir()
    flags = ["--model", tiny_model_dir, "--trait", "evil", "--output_dir", copy, "--vector_output_path", copied_vector,
             "--skip_training", *FAST]
    assert run_script("extract_persona_lora", *flags) == 0  # another vector path: computed afresh, the same vector
    torch.testing.assert_close(torch.load(copied_vector, weights_only=True), torch.load(vector_path, weights_only=True))

    import extract_persona_lora

    def no_recomputation(*args, **kwargs):
        raise AssertionError("the activation vector was recomputed")

    def no_rewrite(*args, **kwargs):
        raise AssertionError("an unchanged diff was written again")

    monkeypatch.setattr(extract_persona_lora, "response_hidden_means", no_recomputation)
    # The same adapters give the same diff: the file is kept as it is (cached evaluations key on its hash).
    monkeypatch.setattr(lu.PersonaLoRADiff, "save", no_rewrite)
    first = json.loads((copy / "manifest.json").read_text())
    assert run_script("extract_persona_lora", *flags) == 0  # same responses, model, settings: reused
    # The rerun's manifest keeps the record of the run that made the kept diff (its time and stages).
    made_by = json.loads((copy / "manifest.json").read_text())["made_by"]
    assert (made_by["started"], made_by["seconds"], made_by["stages"]) == (first["started"], first["seconds"], first["stages"])
    assert run_script("extract_persona_lora", *flags) == 0  # and a third run still carries the first's
    assert json.loads((copy / "manifest.json").read_text())["made_by"]["seconds"] == first["seconds"]
    summary = json.loads((copy / "summary.json").read_text())
    summary["activation_vector"]["identity"] = "made from other responses"
    (copy / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(AssertionError, match="recomputed"):  # a vector of other responses is not reused
        run_script("extract_persona_lora", *flags)


def test_interrupted_generation_resumes_without_loss_or_duplicates(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from eval.generation import generate_records
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    jobs = [{"id": f"j{i}", "messages": [{"role": "user", "content": f"question {i}"}]} for i in range(10)]
    reference = generate_records(model, tokenizer, jobs, tmp_path / "ref.jsonl", max_new_tokens=4, temperature=1.0,
                                 batch_size=3, seed=5)
    path = tmp_path / "out.jsonl"
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json.dumps(r) + "\n" for r in reference[:3]) + '{"id": "torn')  # crash mid-write
    resumed = generate_records(model, tokenizer, jobs, path, max_new_tokens=4, temperature=1.0, batch_size=3, seed=5)
    assert [r["id"] for r in resumed] == [j["id"] for j in jobs]
    assert resumed == reference and not partial.exists()


def test_unknown_trait_lists_available_ones(tiny_model_dir, tmp_path):
    code, _, err = run_main("extract_persona_lora", "--model", tiny_model_dir, "--trait", "grumpiness", "--output_dir", tmp_path / "x")
    assert code == 2
    assert "unknown trait 'grumpiness'" in err and "corrigibility, evil, hallucination, sycophancy" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.judge
def test_bad_chat_data_and_changed_settings_are_refused(tiny_model_dir, tmp_path, extracted):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    code, _, err = run_main("extract_persona_lora", "--model", tiny_model_dir, "--trait", "evil", "--output_dir", tmp_path / "y",
                           "--pos_data", bad, "--neg_data", bad, *FAST)
    assert code == 2 and "bad.jsonl:1: the last message must be the assistant's response" in err
    out, _ = extracted
    copy = tmp_path / "evil"
    shutil.copytree(out / "data", copy / "data")
    code, _, err = run_main("extract_persona_lora", "--model", tiny_model_dir, "--trait", "evil", "--output_dir", copy,
                           *FAST[:2], "--max_new_tokens", "7", *FAST[4:])
    assert code == 2 and "generated with other settings (max_new_tokens)" in err


@pytest.mark.parametrize("problem,message", [
    ("missing_field", "is missing the field 'eval_prompt'"),
    ("overlap", "question used for both extraction and evaluation"),
    ("malformed", "is not valid JSON"),
    ("few_questions", "needs at least 20 questions"),
])
def test_malformed_trait_files_are_refused(tmp_path, problem, message):
    source = json.loads(load_trait("evil").path.read_text())
    folder = tmp_path / "evil"
    folder.mkdir()
    if problem == "missing_field":
        del source["eval_prompt"]
    elif problem == "overlap":
        source["evaluation_questions"][3] = source["extraction_questions"][0]
    elif problem == "few_questions":
        source["evaluation_questions"] = source["evaluation_questions"][:5]
    text = json.dumps(source) if problem != "malformed" else "{not json"
    (folder / "trait.json").write_text(text)
    with pytest.raises(PersonaLoRAError, match=message) as error:
        load_trait("evil", dataset_dir=tmp_path)
    assert "trait.json" in str(error.value)


@pytest.mark.judge
def test_judge_filter_keeps_pos_above_and_neg_below_threshold(extracted, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("eval.judge.cache_dir", lambda: tmp_path / "judge-cache")
    out, _ = extracted
    copy = tmp_path / "evil"
    shutil.copytree(out / "data", copy / "data")
    assert run_script("extract_persona_lora", "--model", tiny_model_dir, "--trait", "evil", "--output_dir", copy,
                      "--vector_output_path", tmp_path / "v.pt", "--filter_threshold", "50", "--judge", "offline", *FAST) == 0
    report = json.loads((copy / "summary.json").read_text())["judge_filter"]
    assert report["threshold"] == 50 and report["judge"].startswith("offline")
    for side in ("pos", "neg"):
        assert 0 < report[side]["kept"] < report[side]["of"]
        assert json.loads((copy / f"{side}_lora/training.json").read_text())["examples"] == report[side]["kept"]
