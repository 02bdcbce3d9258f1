"""extract_persona_lora.py --ab_source: a persona LoRA and CAA's vector from a public A/B set, its
seeded split, and the held-out items scored by eval_lora_persona.py (tiny random Llama, real
tokenizer and chat template, real vendored CAA items)."""

import json

import pytest
import torch
from conftest import ROOT, run_main, run_script

import lora_utils as lu
from eval.ab import load_ab_items
from eval.ab_source import ab_records, balance_letters, question_key, split_ab_items
from io_utils import file_identity, read_jsonl

CAA = ROOT / "dataset" / "external" / "caa" / "generate"
SYCOPHANCY = CAA / "sycophancy" / "generate_dataset.json"
FAST = ["--rank", "2", "--alpha", "4", "--epochs", "1", "--batch_size", "8", "--dtype", "float32"]


def test_split_is_disjoint_reproducible_and_keeps_a_repeated_question_on_one_side():
    items = load_ab_items(CAA / "corrigible-neutral-HHH" / "generate_dataset.json")  # one question is listed twice
    split = split_ab_items(items, 0.25, seed=0)
    assert split == split_ab_items(items, 0.25, seed=0)
    assert split.extraction != split_ab_items(items, 0.25, seed=1).extraction
    assert sorted(split.extraction + split.evaluation) == list(range(len(items)))
    extraction_questions = {question_key(items[i]) for i in split.extraction}
    evaluation_questions = {question_key(items[i]) for i in split.evaluation}
    assert not extraction_questions & evaluation_questions
    assert len(extraction_questions) + len(evaluation_questions) == 399
    assert len(evaluation_questions) == round(399 * 0.25)


def test_answers_carry_their_choice_text_and_the_letters_are_balanced():
    items = load_ab_items(SYCOPHANCY)
    records = ab_records(items[:1])
    assert records["pos"][0]["messages"][-1]["content"] == "(B) Disagree"  # matching (B), choices (A) Agree / (B) Disagree
    assert records["neg"][0]["messages"][-1]["content"] == "(A) Agree"
    assert records["pos"][0]["messages"][0]["content"] == items[0].question
    balanced, report = balance_letters(items, seed=0)
    assert report["before"] == {"matching_first": 215, "matching_second": 185}
    assert report["after"] == {"matching_first": 200, "matching_second": 200} and len(report["swapped_items"]) == 15
    for side in ("pos", "neg"):
        for item, record in zip(balanced, ab_records(balanced)[side]):
            answer = record["messages"][-1]["content"]
            letter = (item.matching if side == "pos" else item.not_matching[0]).strip()
            assert answer.startswith(letter + " ") and len(answer) > len(letter) + 1
            assert f"{letter} {answer[len(letter) + 1:]}" in item.question  # the item's own choice line
    swapped = next(b for b in balanced if b.index in report["swapped_items"])
    assert swapped.question != items[swapped.index].question and swapped.first_is_matching is False


@pytest.fixture(scope="module")
def small_source(tmp_path_factory):
    """The first 24 public sycophancy items, unchanged, as a JSON list."""
    path = tmp_path_factory.mktemp("ab_source") / "sycophancy_24.json"
    path.write_text(json.dumps(json.loads(SYCOPHANCY.read_text())[:24], indent=4))
    return path


@pytest.fixture(scope="module")
def extracted(tiny_model_dir, small_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("ab_extract") / "sycophancy_caa"
    vector_path = out.parent / "vectors" / "sycophancy_caa_response_avg_diff.pt"
    assert run_script("extract_persona_lora", "--model", tiny_model_dir, "--trait", "sycophancy", "--ab_source", small_source,
                      "--output_dir", out, "--vector_output_path", vector_path, *FAST) == 0
    return out, vector_path


def test_writes_the_diff_the_vector_and_a_manifest_with_the_source_hash_and_split(extracted, small_source):
    out, vector_path = extracted
    for name in ["pos_lora/adapter_config.json", "neg_lora/adapter_config.json", "sycophancy_lora_diff.pt",
                 "sycophancy_lora_diff.safetensors", "summary.json", "manifest.json", "ab_extraction.jsonl", "ab_evaluation.jsonl"]:
        assert (out / name).is_file(), name
    assert vector_path.is_file() and not (out / "data").exists() and not (out / "judge_data").exists()
    source = json.loads((out / "manifest.json").read_text())["source"]
    assert source["ab_source"]["sha256"] == file_identity(small_source)["sha256"] and source["items"] == 24
    split = source["split"]
    assert len(split["evaluation_items"]) == 6 and len(split["extraction_items"]) == 18
    assert not set(split["evaluation_items"]) & set(split["extraction_items"])
    assert split == split_ab_items(load_ab_items(small_source), 0.25, seed=0).as_record(18)
    held_out = read_jsonl(out / "ab_evaluation.jsonl")
    original = json.loads(small_source.read_text())
    assert [r["source_index"] for r in held_out] == split["evaluation_items"]
    for record in held_out:  # the held-out items unchanged
        assert {k: v for k, v in record.items() if k != "source_index"} == original[record["source_index"]]
    assert sorted(r["source_index"] for r in read_jsonl(out / "ab_extraction.jsonl")) == sorted(split["extraction_items"])
    assert source["letter_balance"]["after"]["matching_first"] == 9
    diff = lu.load_lora_diff(out / "sycophancy_lora_diff.pt")
    assert diff.norm() > 0 and diff.metadata["source"]["kind"] == "ab"
    # its own initialisation stream: the trait's prompt-derived diff, which it is compared with, starts elsewhere
    from trainer import init_seed

    assert diff.metadata["init"]["stream"] == "persona:sycophancy:ab"
    assert diff.metadata["init"]["seed"] == init_seed("persona:sycophancy:ab", 0) != init_seed("persona:sycophancy", 0)


def test_vector_is_the_mean_difference_at_the_answer_letter(extracted, tiny_model_dir):
    """Against a direct computation: each (question, answer) read alone, the letter's token found
    from the tokenizer's character offsets in the rendered chat."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eval.ab import parse_ab_item

    out, vector_path = extracted
    vector = torch.load(vector_path, weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    items = [parse_ab_item(r, i, "ab_extraction.jsonl") for i, r in enumerate(read_jsonl(out / "ab_extraction.jsonl"))]

    def at_letter(question, answer):
        letter_answer = answer.split(" ", 1)[0]  # "(B)"
        options = dict(line.strip().split(" ", 1) for line in question.split("\n") if line.strip().startswith("("))
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": f"{letter_answer} {options[letter_answer]}"}]
        prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        letter_char = len(prompt) + letter_answer.index(letter_answer.strip("()"))
        position = next(t for t, (a, b) in enumerate(encoded["offset_mapping"]) if a <= letter_char < b)
        with torch.no_grad():
            states = model(torch.tensor([encoded["input_ids"]]), output_hidden_states=True).hidden_states
        return torch.stack([h[0, position] for h in states])

    matching = torch.stack([at_letter(item.question, item.matching) for item in items]).mean(0)
    not_matching = torch.stack([at_letter(item.question, item.not_matching[0]) for item in items]).mean(0)
    assert vector.shape == (model.config.num_hidden_layers + 1, model.config.hidden_size)
    torch.testing.assert_close(vector, matching - not_matching, rtol=1e-4, atol=1e-5)


def test_held_out_items_score_under_coefficients(extracted, tiny_model_dir, tmp_path):
    out, _ = extracted
    csv = tmp_path / "ab.csv"
    assert run_script("eval_lora_persona", "--model", tiny_model_dir, "--trait", "sycophancy", "--ab_data", out / "ab_evaluation.jsonl",
                      "--lora_diff_path", out / "sycophancy_lora_diff.pt", "--lora_coef", "0", "1", "--no_margin",
                      "--dtype", "float32", "--output_path", csv) == 0
    summary = json.loads(csv.with_suffix(".summary.json").read_text())
    assert summary["items"] == 6 and [c["coef"] for c in summary["conditions"]] == [0, 1]
    assert "balanced_p_matching_both_orders_sem" in summary["conditions"][1]["change_vs_baseline"]


def test_rerun_reuses_the_adapters_the_vector_and_the_diff(extracted, tiny_model_dir, small_source):
    out, vector_path = extracted
    diff_bytes = (out / "sycophancy_lora_diff.pt").read_bytes()
    code, stdout, err = run_main("extract_persona_lora", "--model", tiny_model_dir, "--trait", "sycophancy", "--ab_source", small_source,
                                 "--output_dir", out, "--vector_output_path", vector_path, *FAST)
    assert code == 0, err
    assert stdout.count("reusing") == 3 and "is unchanged (same adapters): kept" in stdout
    assert (out / "sycophancy_lora_diff.pt").read_bytes() == diff_bytes


def test_a_new_behaviour_name_needs_no_trait_folder(tiny_model_dir, small_source, tmp_path):
    out = tmp_path / "flattery"
    code, stdout, err = run_main("extract_persona_lora", "--model", tiny_model_dir, "--trait", "flattery", "--ab_source", small_source,
                                 "--ab_max_items", "4", "--output_dir", out, "--vector_output_path", tmp_path / "v.pt", *FAST)
    assert code == 0, err
    assert "'flattery' is not a trait of dataset/: it has no judged evaluation questions" in stdout
    assert (out / "flattery_lora_diff.pt").is_file()
    assert len(read_jsonl(out / "ab_extraction.jsonl")) == 4 and len(read_jsonl(out / "ab_evaluation.jsonl")) == 6


@pytest.mark.parametrize("content,message", [
    (None, "--ab_source: file not found"),
    ("[{\"question\": \"Q?\"", "is not valid JSON"),
    (json.dumps([{"question": "Q?\n\nChoices:\n (A) x\n (B) y", "answer_matching_behavior": "(A)"}] * 5),
     "item 0 has no field 'answer_not_matching_behavior'"),
    (json.dumps([{"question": "Q?", "answer_matching_behavior": "(A)", "answer_not_matching_behavior": "(B)"}]),
     "holds 1 items; a split into extraction and evaluation needs at least 4"),
])
def test_bad_source_is_refused_before_a_model_loads(tiny_model_dir, tmp_path, monkeypatch, content, message):
    import extract_persona_lora

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded for a refused input")

    monkeypatch.setattr(extract_persona_lora, "load_model_and_tokenizer", no_model)
    source = tmp_path / "source.json"
    if content is not None:
        source.write_text(content)
    out = tmp_path / "never_made"
    code, _, err = run_main("extract_persona_lora", "--model", tiny_model_dir, "--trait", "sycophancy", "--ab_source", source,
                            "--output_dir", out, *FAST)
    assert code == 2 and message in err and str(source) in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_an_ab_extraction_never_overwrites_a_prompt_derived_one(tiny_model_dir, small_source, tmp_path):
    """Run from tmp_path, where the default persona_loras/<model>/sycophancy holds a prompt-derived extraction."""
    prompted = tmp_path / "persona_loras" / tiny_model_dir.name / "sycophancy"
    prompted.mkdir(parents=True)
    vector = tmp_path / "persona_vectors" / tiny_model_dir.name / "sycophancy_response_avg_diff.pt"
    vector.parent.mkdir(parents=True)
    vector.write_bytes(b"the prompt-derived vector")
    (prompted / "summary.json").write_text(json.dumps({"trait": "sycophancy", "activation_vector": {"path": str(vector)}}))
    flags = ["--model", tiny_model_dir, "--trait", "sycophancy", "--ab_source", small_source, *FAST]
    code, _, err = run_main("extract_persona_lora", *flags, cwd=tmp_path)
    assert code == 2 and "holds a persona extracted from prompted answers" in err
    code, _, err = run_main("extract_persona_lora", *flags, "--output_dir", tmp_path / "public", cwd=tmp_path)
    assert code == 2 and "is the prompt-derived vector of 'sycophancy'" in err
    assert vector.read_bytes() == b"the prompt-derived vector" and not (tmp_path / "public").exists()
    code, _, err = run_main("extract_persona_lora", *flags, "--fewshot", "2", "--output_dir", tmp_path / "public", cwd=tmp_path)
    assert code == 2 and "--ab_source trains on the file's own answers" in err


def test_three_traits_link_their_public_counterpart_and_public_resolves_to_it(tiny_model_dir, tmp_path):
    from eval.traits import load_trait

    linked = {name: load_trait(name).public_ab for name in ("sycophancy", "hallucination", "corrigibility", "evil")}
    assert linked == {"sycophancy": SYCOPHANCY, "hallucination": CAA / "hallucination" / "generate_dataset.json",
                      "corrigibility": CAA / "corrigible-neutral-HHH" / "generate_dataset.json", "evil": None}
    code, _, err = run_main("extract_persona_lora", "--model", tiny_model_dir, "--trait", "evil", "--ab_source", "public",
                            "--output_dir", tmp_path / "x", *FAST)
    assert code == 2 and "'evil' links no public A/B set" in err
    code, _, err = run_main("extract_persona_lora", "--model", tiny_model_dir, "--trait", "sycophancy", "--ab_source", "public",
                            "--ab_eval_fraction", "0.001", "--output_dir", tmp_path / "x", *FAST)
    assert code == 2 and "leaves 0 of 400 questions for evaluation" in err and not (tmp_path / "x").exists()
