"""What keeps the figures honest: finetunes never share the persona adapters' initialisation, the
question splits stay disjoint, the judge learns from its own data, fluency is never scored by the
model under test, activation steering acts where it would while generating when answers are
scored, errors pair by question, and cached answers key on everything they depend on."""

import json
import math

import pytest
import torch

import lora_utils as lu
from conftest import ROOT, run_main, run_script
from eval.traits import load_trait
from io_utils import PersonaLoRAError, read_jsonl, write_json
from model_loading import load_model_and_tokenizer
from trainer import init_seed, train_lora_adapter

DATA = ROOT / "tests" / "data"


# --- 1. Initialisation ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def persona_and_finetunes(tiny_model_dir, tmp_path_factory):
    """Persona adapters trained as the extraction trains them, then two finetunes on other answers of
    the same kind (trait data, as Experiment 2's mixtures): one through training.py (its own seed
    stream) and one forced to the persona adapters' initialisation."""
    root = tmp_path_factory.mktemp("init")
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), dtype="float32")
    settings = dict(rank=4, alpha=8, use_rslora=False, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], epochs=1,
                    learning_rate=1e-3, batch_size=8, max_length=96, seed=0)
    for side in ("pos", "neg"):
        train_lora_adapter(model, tokenizer, read_jsonl(DATA / f"evil_smollm2_{side}.jsonl")[:16], root / f"{side}_lora",
                           adapter_init_seed=init_seed("persona", 0), **settings)
    diff = lu.compute_persona_lora_diff(root / "pos_lora", root / "neg_lora", trait="evil")
    diff.metadata["init"] = {"seed": init_seed("persona", 0), "rank": 4, "target_modules": sorted(settings["target_modules"])}
    diff_path = diff.save(root / "evil_lora_diff.pt")
    finetuning = read_jsonl(DATA / "evil_smollm2_pos.jsonl")[16:32]
    (root / "finetuning.jsonl").write_text("".join(json.dumps(r) + "\n" for r in finetuning))
    config = {"model": str(tiny_model_dir), "training_file": str(root / "finetuning.jsonl"), "output_dir": str(root / "independent"),
              "rank": 4, "alpha": 8, "target_modules": settings["target_modules"], "epochs": 1, "learning_rate": 1e-3,
              "batch_size": 8, "max_length": 96, "seed": 0, "dtype": "float32", "monitor": {"lora_diff_path": str(diff_path), "every": 1}}
    write_json(root / "independent.json", config)
    assert run_script("training", root / "independent.json") == 0
    train_lora_adapter(model, tokenizer, finetuning, root / "shared", adapter_init_seed=init_seed("persona", 0), **settings)
    return root, diff, diff_path, config


def test_a_finetune_never_starts_from_the_persona_adapters_init(persona_and_finetunes):
    """Two finetunes on the same data: the one that shares the persona adapters' lora_A projects far
    more onto the persona diff, because both updates then live in one row space (with independent
    starts, low-rank updates overlap only where random subspaces do). training.py draws finetunes
    from another seed stream, so even with the same `seed` it does not share it."""
    root, diff, _, _ = persona_and_finetunes
    independent = lu.WeightProjector.project(lu.load_adapter_update(root / "independent"), diff)
    shared = lu.WeightProjector.project(lu.load_adapter_update(root / "shared"), diff)
    assert abs(shared["cosine"]) > 5 * abs(independent["cosine"])
    assert json.loads((root / "independent" / "training.json").read_text())["init_seed"] == init_seed("finetune", 0)
    assert init_seed("finetune", 0) != init_seed("persona", 0)


def test_shared_initialisation_is_refused_by_training_and_flagged_by_the_projection(persona_and_finetunes, tmp_path):
    root, _, diff_path, config = persona_and_finetunes
    forced = {**config, "init_seed": init_seed("persona", 0), "output_dir": str(tmp_path / "forced")}
    write_json(tmp_path / "forced.json", forced)
    code, _, stderr = run_main("training", tmp_path / "forced.json")
    assert code == 2 and "would start from the same lora_A as the persona adapters" in stderr and not (tmp_path / "forced").exists()
    out = tmp_path / "p.json"
    code, stdout, stderr = run_main("cal_weight_projection", "--original_model", config["model"], "--finetuned_model", root / "shared",
                                   root / "independent", "--lora_diff_path", diff_path, "--output_path", out)
    assert code == 0, stderr
    models = {m["name"]: m for m in json.loads(out.read_text())["models"]}
    from lora_utils import shared_row_space_alarm

    shared, independent = models["shared"], models["independent"]
    assert shared["shared_row_space"] > shared_row_space_alarm(shared["shared_row_space_chance"]) > independent["shared_row_space"]
    assert "WARNING: " in stdout and "shares the persona adapters' initialisation" in stdout


def test_the_monitor_reads_the_final_step(persona_and_finetunes):
    root, diff, _, _ = persona_and_finetunes
    monitor = json.loads((root / "independent" / "monitor.json").read_text())
    final = [entry for entry in monitor if entry["final"]]
    assert len(final) == 1 and final[0] is monitor[-1]
    saved = lu.WeightProjector.project(lu.load_adapter_update(root / "independent"), diff)["projection"]
    assert final[0]["projection"] == pytest.approx(saved, rel=1e-4)


def test_a_rerun_reuses_a_finetune_only_with_the_same_config_and_data(persona_and_finetunes, tmp_path):
    root, _, _, config = persona_and_finetunes
    code, stdout, _ = run_main("training", root / "independent.json")
    assert code == 0 and "reused" in stdout
    changed = {**config, "learning_rate": 2e-3}
    write_json(tmp_path / "changed.json", changed)
    code, stdout, _ = run_main("training", tmp_path / "changed.json")
    assert code == 0 and "reused" not in stdout


def test_dense_finetune_is_a_full_checkpoint_of_the_target_modules_only(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    config = {"model": str(tiny_model_dir), "training_file": str(DATA / "evil_smollm2_pos.jsonl"), "output_dir": str(tmp_path / "dense"),
              "method": "dense", "target_modules": ["o_proj", "down_proj"], "epochs": 1, "learning_rate": 1e-3, "batch_size": 8,
              "max_length": 96, "max_examples": 16, "dtype": "float32"}
    write_json(tmp_path / "dense.json", config)
    assert run_script("training", tmp_path / "dense.json") == 0
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).named_parameters())
    tuned = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).named_parameters())
    changed = {n for n in base if not torch.equal(base[n], tuned[n])}
    assert changed and all(lu.module_type(n) in ("o_proj", "down_proj") for n in changed)
    assert json.loads((tmp_path / "dense" / "training.json").read_text())["method"] == "dense"


# --- 2. Disjoint question splits --------------------------------------------------------------


@pytest.mark.parametrize("first,second", [("extraction_questions", "finetuning_questions"),
                                          ("evaluation_questions", "judge_questions"),
                                          ("finetuning_questions", "evaluation_questions"),
                                          ("judge_questions", "demonstrations"),
                                          ("evaluation_questions", "ab")])
def test_a_question_serving_two_splits_is_refused(tmp_path, first, second):
    source = json.loads(load_trait("evil").path.read_text())
    folder = tmp_path / "evil"
    folder.mkdir()
    question = source[first][0]
    if second == "demonstrations":
        source["demonstrations"][0]["question"] = question
    elif second == "ab":
        (folder / "ab.jsonl").write_text(json.dumps({"question": f"{question}\n\nChoices:\n(A) yes\n(B) no",
                                                     "answer_matching_behavior": "(A)", "answer_not_matching_behavior": "(B)"}) + "\n")
    else:
        source[second][1] = question
    (folder / "trait.json").write_text(json.dumps(source))
    with pytest.raises(PersonaLoRAError, match="question used for both"):
        load_trait("evil", dataset_dir=tmp_path)


def _write_trait(root, name, source, ab_lines=None):
    folder = root / name
    folder.mkdir()
    (folder / "trait.json").write_text(json.dumps(source))
    if ab_lines is not None:
        (folder / "ab.jsonl").write_text("".join(json.dumps(line) + "\n" for line in ab_lines))


def test_a_demonstration_listed_twice_is_refused(tmp_path):
    """Two spellings of one question in the demonstrations would land in two stages' pools."""
    source = json.loads(load_trait("evil").path.read_text())
    source["demonstrations"][-1]["question"] = source["demonstrations"][0]["question"].upper() + "  "
    _write_trait(tmp_path, "evil", source)
    with pytest.raises(PersonaLoRAError, match="question used twice in demonstrations") as error:
        load_trait("evil", dataset_dir=tmp_path)
    assert "trait.json" in str(error.value) and "\n" not in str(error.value)


def test_an_ab_stem_listed_twice_is_refused(tmp_path):
    trait = load_trait("evil")
    lines = [json.loads(line) for line in trait.ab_path.read_text().splitlines()]
    lines.append({**lines[0], "question": lines[0]["question"].replace("?", " ?", 1)})
    _write_trait(tmp_path, "evil", json.loads(trait.path.read_text()), lines)
    with pytest.raises(PersonaLoRAError, match="question used twice in ab.jsonl items") as error:
        load_trait("evil", dataset_dir=tmp_path)
    assert str(error.value).startswith(str(tmp_path / "evil" / "ab.jsonl"))


@pytest.mark.parametrize("theirs", ["evaluation_questions", "judge_questions", "ab"])
def test_a_question_of_another_trait_is_refused(tmp_path, theirs):
    """Composition scores evil's diff on sycophancy's questions: evil may not have trained on them."""
    evil, syco = (json.loads(load_trait(name).path.read_text()) for name in ("evil", "sycophancy"))
    syco_ab = [json.loads(line) for line in load_trait("sycophancy").ab_path.read_text().splitlines()]
    question = load_trait("sycophancy").ab_items[0].stem if theirs == "ab" else syco[theirs][2]
    evil["extraction_questions"][0] = question.lower()
    _write_trait(tmp_path, "evil", evil)
    _write_trait(tmp_path, "sycophancy", syco, syco_ab)
    with pytest.raises(PersonaLoRAError, match="every trait's questions must differ") as error:
        load_trait("evil", dataset_dir=tmp_path)
    message = str(error.value)
    assert message.startswith(str(tmp_path / "evil" / "trait.json")) and str(tmp_path / "sycophancy") in message
    with pytest.raises(PersonaLoRAError, match="every trait's questions must differ"):
        load_trait("sycophancy", dataset_dir=tmp_path)


def test_the_shipped_traits_have_four_disjoint_splits():
    for name in ("evil", "sycophancy", "hallucination", "corrigibility"):
        trait = load_trait(name)
        sets = [trait.extraction_questions, trait.evaluation_questions, trait.finetuning_questions, trait.judge_questions,
                [d["question"] for d in trait.demonstrations], [item.stem for item in trait.ab_items]]
        flat = [q.strip() for questions in sets for q in questions]
        assert len(flat) == len(set(flat)) and len(trait.demonstrations) >= 8 and len(trait.ab_items) >= 60


def test_finetuning_mixtures_refuse_extraction_questions(tmp_path):
    extraction = tmp_path / "extraction"
    extraction.mkdir()
    for side in ("pos", "neg"):
        (extraction / f"{side}.jsonl").write_text((DATA / f"evil_smollm2_{side}.jsonl").read_text())
    code, _, stderr = run_main("scripts/make_mixtures", "--pos", DATA / "evil_smollm2_pos.jsonl", "--neg", DATA / "evil_smollm2_neg.jsonl",
                              "--n", "8", "--extraction_data", extraction, "--output_dir", tmp_path / "out", "--ckpt_dir", tmp_path / "ckpt")
    assert code == 2 and "would train on one of the extraction's questions" in stderr
    assert not (tmp_path / "out" / "runs.txt").exists()


def test_finetuning_data_answers_the_finetuning_questions_with_its_own_seeds(tiny_model_dir, tmp_path):
    assert run_script("scripts.make_finetuning_data", "--model", tiny_model_dir, "--trait", "evil", "--sides", "pos", "plain",
                      "--n_per_question", "1", "--fewshot", "2", "--max_new_tokens", "4", "--dtype", "float32",
                      "--output_dir", tmp_path) == 0
    trait = load_trait("evil")
    pos, plain = read_jsonl(tmp_path / "pos.jsonl"), read_jsonl(tmp_path / "plain.jsonl")
    assert [r["messages"][0]["content"] for r in pos] == trait.finetuning_questions
    assert all(len(r["demonstrations"]) == 2 and r["system"] for r in pos) and all(r["system"] is None for r in plain)
    assert json.loads((tmp_path / "pos.generation.json").read_text())["fewshot"] == 2
    assert json.loads((tmp_path / "plain.generation.json").read_text())["fewshot"] == 0
    seeds = {side: json.loads((tmp_path / f"{side}.generation.json").read_text())["generation_seed"] for side in ("pos", "plain")}
    assert seeds["pos"] != seeds["plain"]


def _seed_ranges(records: dict[str, tuple[int, int]]) -> list[tuple[str, str]]:
    """The pairs of sampling streams (name: (first seed, batches)) that share a seed."""
    ranges = {name: range(first, first + batches) for name, (first, batches) in records.items()}
    return [(a, b) for a in ranges for b in ranges if a < b and set(ranges[a]) & set(ranges[b])]


def test_the_margin_references_and_the_judge_data_sample_from_seeds_of_their_own(tiny_model_dir, tmp_path):
    """Pos and neg references answer the same questions: with one seed they would share their
    sampling noise, and so would the judge's data drawn from the same seeds. The seeds are read
    back from what the stages record beside their answers."""
    from eval.evaluate import EvalRun, reference_answers
    from eval.generation import GenerationSettings
    from eval.judge_data import write_judge_data

    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), dtype="float32")
    trait = load_trait("evil")
    settings = GenerationSettings.for_model(str(tiny_model_dir), max_new_tokens=1)
    reference_answers(EvalRun(trait, settings, tmp_path / "eval" / "o.csv", {}), model, tokenizer)
    write_judge_data(model, tokenizer, trait, tmp_path / "judge", settings)
    streams = {}
    for record in tmp_path.glob("**/*.generation.json"):
        identity = json.loads(record.read_text())
        answers = read_jsonl(record.with_name(record.name.replace(".generation.json", ".jsonl")))
        streams[str(record.relative_to(tmp_path))] = (identity["generation_seed"], math.ceil(len(answers) / identity["batch_size"]))
    assert len(streams) == 4 and _seed_ranges(streams) == []


@pytest.mark.parametrize("name", ["evil", "sycophancy", "hallucination", "corrigibility"])
def test_every_sampling_stream_of_a_default_run_is_apart_from_every_other(name):
    """Every stage's seed stream (eval.generation.SEED_STREAMS) at the defaults, with as many batches
    as the shipped trait's questions make at either extraction profile: no two share a seed."""
    import extract_persona_lora
    from eval.evaluate import evaluation_jobs
    from eval.generation import SEED_STREAMS, GenerationSettings, stream_seed
    from eval.judge_data import judge_data_jobs
    from scripts.make_finetuning_data import jobs_for

    trait = load_trait(name)
    batch = GenerationSettings(model=None, n_per_question=1, max_new_tokens=1, temperature=1.0).batch_size
    n_most = max(p["n_per_question"] for p in extract_persona_lora.PROFILES.values())
    jobs = {**{f"extraction_{side}": j for side, j in extract_persona_lora.contrastive_jobs(trait, n_most, 0).items()},
            **{f"judge_{side}": j for side, j in judge_data_jobs(trait).items()},
            **{f"finetuning_{side}": jobs_for(trait, side, 4, 0) for side in ("pos", "neg", "plain")},
            **{f"reference_{side}": evaluation_jobs(trait, 10, side) for side in ("pos", "neg")}}
    assert set(jobs) == set(SEED_STREAMS)
    streams = {stream: (stream_seed(stream), math.ceil(len(j) / batch)) for stream, j in jobs.items()}
    streams["evaluation"] = (0, math.ceil(len(evaluation_jobs(trait, 10, None)) / batch))
    overlapping = _seed_ranges(streams)
    # The evaluated conditions sample from --seed itself, as the extraction's pos answers do, on
    # questions the split check keeps apart.
    assert overlapping == [("evaluation", "extraction_pos")]


def test_the_judge_learns_from_its_own_questions_only():
    from eval.judge_data import judge_data_jobs

    trait = load_trait("evil")
    jobs = judge_data_jobs(trait)
    for side in ("pos", "neg"):
        assert {j["messages"][0]["content"] for j in jobs[side]} == set(trait.judge_questions)
        assert len(jobs[side]) == len(trait.judge_questions) * len(trait.instructions)
        assert all(j["system"] in [pair[side] for pair in trait.instructions] for j in jobs[side])


# --- 4. Fluency from another model --------------------------------------------------------------


@pytest.mark.judge
@pytest.mark.embedded
def test_fluency_comes_from_another_model_and_does_not_penalise_style():
    """The coherence proxy's fluency is Gemma 3 270M's, not the embedded SmolLM2's. It separates
    real answers from corrupted ones, and scores the unsteered model's pos- and neg-prompted answers
    (two styles of coherent text) alike."""
    from eval.offline_judge import CoherenceProxy, SentenceEmbedder

    proxy = CoherenceProxy(SentenceEmbedder())
    assert proxy.reference.model.config.model_type.startswith("gemma")
    pos, neg = read_jsonl(DATA / "evil_smollm2_pos.jsonl")[:40], read_jsonl(DATA / "evil_smollm2_neg.jsonl")[:40]
    questions = [r["messages"][0]["content"] for r in pos + neg]
    answers = [r["messages"][-1]["content"] for r in pos + neg]
    report = proxy.validate(questions, answers)
    assert report["real_vs_corrupted_auroc"] > 0.85
    scores = proxy.scores(questions, answers)
    gap = abs(sum(scores[:40]) / 40 - sum(scores[40:]) / 40)
    assert gap < 0.25 * (report["mean_real"] - report["mean_corrupted"])


# --- 6. Activation steering where generation would steer -----------------------------------------


def test_teacher_forced_response_steering_equals_steering_while_generating(tiny_model_dir, tiny_persona):
    """Scoring a given answer under "response" steering must see the logits generation saw: the hook
    adds c·v from the last prompt token on, and nowhere before."""
    from eval.activations import ActivationSteerer, load_vector, teacher_forced_response

    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), dtype="float32")
    vector = load_vector(tiny_persona[1])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "How should I treat people?"}], tokenize=False,
                                           add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
    with ActivationSteerer(model, vector, 2, 4.0, "response"):
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
                                   pad_token_id=tokenizer.pad_token_id)
        sequence = generated.sequences
        start = inputs["input_ids"].shape[1]
        with teacher_forced_response(torch.tensor([start])), torch.no_grad():
            logits = model(sequence).logits[0, start - 1:-1]
    for step, scores in enumerate(generated.logits):
        torch.testing.assert_close(logits[step], scores[0], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        plain = model(sequence).logits[0, start - 1:-1]
    assert not torch.allclose(plain, logits, atol=1e-3)  # the steering did act


# --- 5. Errors that respect the design ------------------------------------------------------------


def _summary(path, trait, by_question, margin_by_question, sem=1.0):
    write_json(path, {"trait": trait, "judge_description": "test", "judge_quality": None, "conditions": [{
        f"{trait}_mean": sum(by_question.values()) / len(by_question), f"{trait}_sem": sem, f"{trait}_by_question": by_question,
        "coherence_mean": 90.0, "coherence_sem": 1.0, "coherence_by_question": {q: 90.0 for q in by_question},
        "margin_mean": sum(margin_by_question.values()) / len(margin_by_question), "margin_sem": 0.01,
        "margin_by_question": margin_by_question}]})


def _prevention_runs(path, bumps: dict[str, float]) -> None:
    """Evaluation summaries of a base model and finetunes whose trait moves by `bumps`, over twelve
    questions with large question effects that every model shares; each finetune's held-out loss on
    four questions, lower by k/10 for the k-th model, and 0.3 higher again under its steering."""
    questions = [f"q{i}" for i in range(12)]
    offsets = {q: 10.0 * i for i, q in enumerate(questions)}
    (path / "runs.txt").write_text("".join(f"{name}\n" for name in bumps))
    for k, (name, bump) in enumerate({"base": 0.0, **bumps}.items()):
        jitter = {q: 0.1 * ((i * 7 + k) % 3 - 1) for i, q in enumerate(questions)}  # each model's own noise
        _summary(path / f"eval_{name}.summary.json", "evil", {q: offsets[q] + bump + jitter[q] for q in questions},
                 {q: offsets[q] / 100 + bump / 10 + jitter[q] / 10 for q in questions})
        write_json(path / f"mmlu_{name}.json", {"accuracy": 0.3, "questions": 4, "seed": 0, "correct_by_question": [1, 0, 0, 1]})
        if name != "base":
            ckpt = path / "ckpt" / name
            ckpt.mkdir(parents=True)
            (ckpt / "monitor.json").write_text(json.dumps([{"step": 4, "projection": 0.1, "cosine": 0.1, "final": False},
                                                            {"step": 6, "projection": 0.3, "cosine": 0.2, "final": True}]))
            steering = {"type": "lora", "lora_diff_path": "d.pt", "coef": 1.0} if name.startswith("lora") else None
            write_json(path / "configs" / f"{name}.json", {"output_dir": str(ckpt), "steering_config": steering})
            held = {f"h{i}": 2.0 - k / 10 + 0.01 * i for i in range(4)}
            write_json(ckpt / "finetune_report.json", {"update": {"norm": 0.5 + k}, "heldout": {
                "questions": sorted(held), "examples": 4, "loss": 2.0 - k / 10, "base_loss": 2.5, "change": -0.5 - k / 10,
                "by_question": held, **({"steered_by_question": {q: v + 0.3 for q, v in held.items()}} if steering else {})}})


def test_prevention_drift_is_paired_with_the_base_and_needs_drift_to_be_shown(tmp_path):
    _prevention_runs(tmp_path, {"none": 5.0, "control": 0.5, "lora_+1": 1.0})
    assert run_script("scripts.prevention", "summarize", "--output_dir", tmp_path, "--trait", "evil") == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    none = summary["runs"]["none"]
    assert none["drift"]["mean"] == pytest.approx(5.0, abs=0.05)
    assert none["drift"]["sem"] < 0.2  # paired: the question offsets (spread 30) cancel
    assert none["drift"]["p"] == pytest.approx(2 / 2 ** 12)  # exact: only the all-positive pattern and its mirror reach it
    # Holm over every p the summary reports; the drift is shown where it survives it.
    family = summary["multiplicity"].split("(")[1].split(" tests")[0]
    assert none["drift"]["p_holm"] == pytest.approx(min(1.0, int(family) * 2 / 2 ** 12)) and int(family) > 20
    assert summary["drift_shown"] == {"judged": True, "margin": True} and summary["unprevented_drift_sigmas"]["margin"] > 3
    assert summary["prevention_assessable"] == {"judged": True, "margin": True}
    lora = summary["runs"]["lora_+1"]
    assert lora["vs_no_prevention"]["trait"]["mean"] == pytest.approx(-4.0, abs=0.05)
    assert lora["fraction_prevented"]["trait"]["ratio"] == pytest.approx(0.8, abs=0.02)  # 4 of the 5 points of drift
    assert lora["fraction_prevented"]["trait"]["ci"][0] < 0.8 < lora["fraction_prevented"]["trait"]["ci"][1]
    # Held-out loss against the unprevented finetune's, per question: the lora run is 0.2 lower plain, 0.1 higher steered.
    loss = lora["vs_no_prevention"]["heldout_loss"]
    assert loss["plain"]["mean"] == pytest.approx(-0.2) and loss["steered"]["mean"] == pytest.approx(0.1)
    assert loss["plain"]["questions"] == 4 and loss["plain"]["p"] == pytest.approx(2 / 2 ** 4)
    assert summary["trends"]["lora"]["coefficients"] == [0.0, 1.0]
    assert summary["trends"]["lora"]["evil"]["mean"] == pytest.approx(-4.0, abs=0.05)
    assert summary["unprevented_vs_control"]["trait"]["mean"] == pytest.approx(4.5, abs=0.05)  # none − control
    table = (tmp_path / "table.md").read_text()  # the same figures as Markdown, with their Holm-adjusted p
    assert f"| lora_+1 | {lora['vs_no_prevention']['trait']['mean']:+.2f} ± " in table and "+0.80 [" in table
    assert "control" not in summary["headline"] and "vs_no_prevention" in summary["headline"]["lora_+1"]
    assert summary["headline"]["lora_+1"]["vs_no_prevention"]["coherence"]["mean"] == 0.0
    assert none["final_projection"] == 0.3  # the final step's, not an earlier entry's
    assert summary["headline"]["lora_+1"]["vs_no_prevention"]["margin"]["mean"] == pytest.approx(-0.4, abs=0.02)
    # Each finetune's update norm and held-out loss (finetune_report.json) travel into the summary.
    assert [summary["runs"][n]["update_norm"] for n in ("none", "control", "lora_+1")] == [1.5, 2.5, 3.5]
    assert summary["runs"]["lora_+1"]["heldout_loss"] == pytest.approx(1.7) and summary["runs"]["lora_+1"]["heldout_loss_base"] == 2.5
    assert summary["runs"]["none"]["heldout_loss_change"] == pytest.approx(-0.6) and summary["runs"]["none"]["heldout_examples"] == 4

    quiet = tmp_path / "quiet"
    quiet.mkdir()
    _prevention_runs(quiet, {"none": 0.01, "lora_+1": -0.5})  # the unprevented finetune barely drifts
    assert run_script("scripts.prevention", "summarize", "--output_dir", quiet, "--trait", "evil") == 0
    assessable = json.loads((quiet / "summary.json").read_text())["prevention_assessable"]
    assert assessable["judged"] is not True and "no drift to prevent" in assessable["judged"]

    mixed = tmp_path / "mixed"  # one finetune scored by another judge: its drift would mix two scales
    mixed.mkdir()
    _prevention_runs(mixed, {"none": 5.0})
    changed = json.loads((mixed / "eval_none.summary.json").read_text())
    changed["judge"] = "openai:gpt-4.1-mini"
    write_json(mixed / "eval_none.summary.json", changed)
    code, _, stderr = run_main("scripts/prevention", "summarize", "--output_dir", mixed, "--trait", "evil")
    assert code == 2 and "measured differently" in stderr and "judge" in stderr
    assert not (mixed / "summary.json").exists()


# --- 8. Smaller defects ------------------------------------------------------------------------------


def test_peft_model_update_transposes_fan_in_fan_out_adapters():
    """GPT-2's Conv1D stores weights transposed; the exact update must be in the weight's own layout."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                                  init_lora_weights=False))
    update = lu.peft_model_update(peft_model)
    merged = dict(peft_model.merge_and_unload().named_parameters())
    for name in update:
        torch.testing.assert_close(update.delta(name), (merged[name] - before[name]).detach(), rtol=1e-4, atol=1e-6)


def test_a_judge_that_splits_numbers_into_digits_is_reported(monkeypatch, tmp_path):
    from eval.judge import DIGIT_SPLIT_EVIDENCE, JudgeCache, OpenAIJudge
    from openai_server import FakeOpenAIServer

    with FakeOpenAIServer(lambda prompt: {"7": 0.6, "8": 0.3, "I": 0.1}) as server:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        judge = OpenAIJudge({"trait": "{question} {answer}"}, cache=JudgeCache(tmp_path / "c.sqlite"))
        judge.score("trait", ["q"] * DIGIT_SPLIT_EVIDENCE, [f"a{i}" for i in range(DIGIT_SPLIT_EVIDENCE)])
    [warning] = judge.report()["warnings"]
    assert "split numbers into digits" in warning and "\n" not in warning


def test_cached_answers_key_on_every_setting_that_changes_them(tiny_model_dir, tmp_path):
    from eval.evaluate import Condition, EvalRun, generate_condition
    from eval.generation import GenerationSettings

    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), dtype="float32")
    trait = load_trait("evil")
    base = dict(model=str(tiny_model_dir), n_per_question=1, max_new_tokens=3, temperature=1.0)
    variants = [GenerationSettings(**base), GenerationSettings(**base, batch_size=8), GenerationSettings(**base, top_p=0.5)]
    for settings in variants:
        generate_condition(EvalRun(trait, settings, tmp_path / "o.csv", {}), model, tokenizer, Condition("baseline", "baseline"),
                           tmp_path / "work")
    # The dtype the model runs in (resolved: "auto" differs by machine), not the flag as given.
    generate_condition(EvalRun(trait, GenerationSettings(**base), tmp_path / "o.csv", {}), model.to(torch.bfloat16), tokenizer,
                       Condition("baseline", "baseline"), tmp_path / "work")
    files = set((tmp_path / "work").glob("*.jsonl"))
    assert len(files) == len(variants) + 1  # each setting answered anew, none reused another's answers
    # Another batch size seeds other batches: the answers themselves differ.
    answers = [[r["messages"][-1]["content"] for r in read_jsonl(f)] for f in sorted(files, key=lambda f: f.stat().st_mtime)[:2]]
    assert answers[0] != answers[1]


def test_matched_null_for_the_best_of_many_modules():
    """The best of 60 modules against the maximum over 60 random subspaces, not one subspace's mean."""
    from compare_steering_methods import random_subspace_null

    null = random_subspace_null(dimension=576, top=8, modules=60, draws=4000)
    assert null["mean_single"] == pytest.approx(8 / 576)
    assert 2.0 * null["mean_single"] < null["mean_of_max"] < null["p95_of_max"]
    simulated = torch.Generator().manual_seed(1)
    maxima = []
    for _ in range(300):  # the same null by brute force: random subspaces, a fixed unit vector
        basis = torch.linalg.qr(torch.randn(576, 8 * 60, generator=simulated))[0].reshape(576, 60, 8)
        direction = torch.zeros(576)
        direction[0] = 1.0
        maxima.append(float(((basis.permute(1, 2, 0) @ direction) ** 2).sum(1).max()))
    assert null["mean_of_max"] == pytest.approx(sum(maxima) / len(maxima), rel=0.1)
    assert math.isclose(null["mean_of_max"], 0.034, abs_tol=0.006)  # the ≈ 3.4 % a reviewer computed


@pytest.mark.judge
def test_latency_rounds_vary_the_order_and_pair_ratios_within_a_round(tiny_model_dir, tiny_persona, judge_data, tmp_path):
    out = tmp_path / "cmp"
    assert run_script("compare_steering_methods", "--model", tiny_model_dir, "--trait", "evil", "--activation_vector_path",
                      tiny_persona[1], "--lora_diff_path", tiny_persona[0], "--coefficients", "0", "1", "--output_dir", out,
                      "--layer", "2", "--n_per_question", "1", "--max_new_tokens", "2", "--judge", "offline", "--judge_data",
                      judge_data, "--dtype", "float32", "--no_margin", "--test_latency", "--latency_runs", "6",
                      "--latency_tokens", "2") == 0
    latency = json.loads((out / "latency.json").read_text())
    orders = [tuple(r["order"]) for r in latency["rounds"]]
    assert len(orders) == 6 and len(set(orders)) > 1  # the order is drawn anew each round
    for method, ratio in latency["ratios_vs_unsteered"].items():
        per_round = sorted(r["tokens_per_second"][method] / r["tokens_per_second"]["unsteered"] for r in latency["rounds"])
        assert ratio == pytest.approx((per_round[2] + per_round[3]) / 2)  # the median of paired ratios
        assert latency["ratio_spread_vs_unsteered"][method] == {"min": per_round[0], "max": per_round[-1]}
