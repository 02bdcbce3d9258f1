"""distill_steering_lora.py: a LoRA distilled from activation steering, on tiny models built in-process."""

import itertools
import json
import re
import shutil

import pytest
import torch

import distill_steering_lora as distill
import lora_utils as lu
from conftest import make_adapter, make_tiny_llama, run_main, run_script
from eval.activations import ActivationSteerer, teacher_forced_response
from eval.generation import ChatSpan, tokenize_chat
from eval.traits import load_trait
from io_utils import PersonaLoRAError
from trainer import init_seed

CONSTANT_INPUT, CONSTANT_UNIT = 5, 7  # the embedding dimension and the MLP unit of the construction below


def constant_unit_llama() -> torch.nn.Module:
    """A tiny Llama in which adding c·v to hidden_states[1] is exactly a rank-1 update of block 0's
    down_proj, ΔW = (c·v / C)·e_jᵀ:
    - every token embedding has the same norm and the same value in one dimension d, so after
      RMSNorm that dimension is the same constant at every position;
    - block 0's attention writes nothing (o_proj = 0), so its MLP reads exactly that normed embedding;
    - MLP unit j reads only dimension d through gate_proj and up_proj, so its activation is a
      constant C at every position, and down_proj's column j writes C·column into the residual.
    The sharpened lm_head makes the steering's effect on the next-token distribution large."""
    model = make_tiny_llama()
    with torch.no_grad():
        embeddings = model.model.embed_tokens.weight
        rest = embeddings.clone()
        rest[:, CONSTANT_INPUT] = 0
        embeddings.copy_(rest / rest.norm(dim=1, keepdim=True) * 3**0.5)
        embeddings[:, CONSTANT_INPUT] = 1.0  # every row now has norm 2
        block = model.model.layers[0]
        block.self_attn.o_proj.weight.zero_()
        for projection, scale in ((block.mlp.gate_proj, 2.0), (block.mlp.up_proj, 1.5)):
            projection.weight[CONSTANT_UNIT].zero_()
            projection.weight[CONSTANT_UNIT, CONSTANT_INPUT] = scale
        model.lm_head.weight.mul_(10.0)
    return model


def test_exactly_representable_steering_is_distilled_to_the_true_update():
    model = constant_unit_llama()
    vector = torch.nn.functional.normalize(torch.randn(4, 32, generator=torch.Generator().manual_seed(1)), dim=1)
    coef = 2.0
    generator = torch.Generator().manual_seed(0)
    # response_start 1: every position is steered, as it must be for a weight update to match it exactly.
    spans = [ChatSpan(torch.randint(3, 96, (10,), generator=generator).tolist(), 1, 10) for _ in range(32)]
    steerer = ActivationSteerer(model, vector, 1, coef, positions="response")
    name = "model.layers.0.mlp.down_proj"
    student = distill.attach_lora(model, [name], rank=1, adapter_init_seed=init_seed("distill", 0))
    curve = distill.distill(student, steerer, spans[:24], spans[24:], pad_id=0, steps=80, learning_rate=3e-2, batch_size=8, seed=0,
                            eval_every=20)
    result = distill.heldout_kl(student, steerer, spans[24:], pad_id=0, batch_size=8, plain=True)
    assert result["plain"] > 0.05
    assert result["distilled"] < 2e-3 * result["plain"]
    assert [c["step"] for c in curve["checkpoints"]] == [0, 20, 40, 60]

    reads = []  # what down_proj reads on these sequences: the update is only identifiable on them

    def record(module, args, output):
        reads.append(args[0].detach().reshape(-1, args[0].shape[-1]))

    hook = student.base_model.model.model.layers[0].mlp.down_proj.register_forward_hook(record)
    with torch.no_grad(), student.disable_adapter():
        student(input_ids=torch.tensor([span.ids for span in spans]))
    hook.remove()
    reads = reads[0]
    constant = reads[:, CONSTANT_UNIT]
    assert constant.std() < 1e-4 * constant.abs().mean()  # the construction holds: unit j is constant
    true_update = (coef / constant.mean()) * vector[1][:, None] @ torch.eye(reads.shape[1])[CONSTANT_UNIT][None, :]
    learned = lu.peft_model_update(student)
    learned_update = learned.delta(f"{name}.weight")
    writes_learned, writes_true = reads @ learned_update.T, reads @ true_update.T
    assert torch.nn.functional.cosine_similarity(writes_learned.flatten(), writes_true.flatten(), dim=0) > 0.995
    left, _, _ = learned.svd(f"{name}.weight")
    assert abs(float(left[:, 0] @ vector[1].double())) > 0.995  # it writes along v


@pytest.fixture(scope="module")
def persona_diffs(tiny_model_dir, tmp_path_factory):
    """Two diffs for the tiny model: one named evil (the persona diff), one named sycophancy (a control)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("distill_diffs")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    paths = {}
    for trait, seeds in (("evil", (1, 2)), ("sycophancy", (3, 4))):
        make_adapter(model, root / f"{trait}_pos", seed=seeds[0], r=2, alpha=4)
        make_adapter(model, root / f"{trait}_neg", seed=seeds[1], r=2, alpha=4)
        paths[trait] = lu.compute_persona_lora_diff(root / f"{trait}_pos", root / f"{trait}_neg", trait=trait).save(root / f"{trait}.pt")
    return paths


def common_flags(tiny_model_dir, vector_path):
    return ["--model", tiny_model_dir, "--trait", "evil", "--vector_path", vector_path, "--layer", 1, "--coef", 4.0,
            "--max_new_tokens", 8, "--n_per_question", 1, "--gen_batch_size", 64, "--dtype", "float32", "--learning_rate", 1e-2]


RUN_FLAGS = ["--rank", 2, "--steps", 30, "--eval_every", 10]


@pytest.fixture(scope="module")
def distilled_run(tiny_model_dir, tiny_persona, persona_diffs, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill_run")
    flags = common_flags(tiny_model_dir, tiny_persona[1])
    assert run_script("distill_steering_lora", *flags, *RUN_FLAGS, "--persona_diff_path", persona_diffs["evil"],
                      "--control_diff_paths", persona_diffs["sycophancy"], "--output_dir", out) == 0
    return out, flags


def kl_on_prompts(model, tokenizer, conversations, steerer_factory) -> float:
    """Mean KL(steered ‖ model) over the answers' positions, teacher-forced."""
    spans = [tokenize_chat(tokenizer, conversation) for conversation in conversations]
    batch = distill.Batch(spans, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        with steerer_factory(), teacher_forced_response(batch.starts):
            steered = distill.forward(model, batch, False).logits
        return float(distill.position_kl(steered, distill.forward(model, batch, False).logits).mean())


def test_saved_diff_loads_merges_and_moves_held_out_logits_toward_the_steered_model(distilled_run, tiny_model_dir, tiny_persona):
    from transformers import AutoModelForCausalLM

    from model_loading import load_tokenizer

    out, _ = distilled_run
    diff = lu.load_lora_diff(out / "evil_distilled_lora_diff.pt")
    twin = lu.load_lora_diff(out / "evil_distilled_lora_diff.safetensors")
    assert set(diff.factors) == set(twin.factors) and diff.cosine(twin) == pytest.approx(1.0)
    assert {lu.module_type(n) for n in diff} == {"o_proj", "down_proj"} and diff.layers() == [0]  # 'before' layer 1
    assert diff.metadata["created_by"] == "distill_steering_lora.py" and diff.metadata["trait"] == "evil"
    assert (diff.metadata["layer"], diff.metadata["coef"], diff.metadata["rank"]) == (1, 4.0, 2)
    assert diff.metadata["init"] == {"seed": init_seed("distill", 0), "rank": 2, "target_modules": ["down_proj", "o_proj"],
                                     "stream": "distill"}
    assert init_seed("distill", 0) != init_seed("persona", 0)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    vector = torch.load(tiny_persona[1], weights_only=True)
    # Evaluation questions: never seen in training (the distillation does not read them at all).
    conversations = [[{"role": "user", "content": question}, {"role": "assistant", "content": "Well, here is what I think."}]
                     for question in load_trait("evil").evaluation_questions[:4]]

    def steered():
        return ActivationSteerer(model, vector, 1, 4.0, positions="response")

    plain = kl_on_prompts(model, tokenizer, conversations, steered)
    merger = lu.LoRAMerger(model)
    merger.merge_lora_diff(diff, 1.0)
    merged = kl_on_prompts(model, tokenizer, conversations, steered)
    merger.restore_original_weights()
    assert plain > 0 and merged < 0.9 * plain


def test_held_out_kl_decreases_over_the_checkpoints(distilled_run):
    out, _ = distilled_run
    summary = json.loads((out / "summary.json").read_text())
    checkpoints = summary["curve"]["checkpoints"]
    assert [c["step"] for c in checkpoints] == [0, 10, 20, 30]
    values = [c["heldout_kl"] for c in checkpoints]
    # Full-batch held-out KL under a decaying learning rate: each checkpoint at most the previous one
    # (1 % slack for the noise of a 4-answer batch step), and the end well below the start.
    assert all(later <= 1.01 * earlier for earlier, later in itertools.pairwise(values))
    assert values[-1] < 0.8 * values[0]
    assert values[0] == pytest.approx(summary["heldout_kl_plain"], rel=1e-5)  # B starts at 0: step 0 is the plain model
    assert values[-1] == pytest.approx(summary["heldout_kl_distilled"])
    assert summary["ratio"] == pytest.approx(summary["heldout_kl_distilled"] / summary["heldout_kl_plain"])
    assert summary["fraction_reproduced"] == pytest.approx(1 - summary["ratio"])
    assert len(summary["curve"]["losses"]) == 30
    assert "evaluation questions are not used" in summary["heldout"]["questions"]
    assert summary["heldout"]["answers"] == 13 and summary["heldout"]["training_answers"] == 49  # 5 + 8 of 22 + 40 questions
    assert summary["comparisons"]["persona_diff"]["trait"] == "evil"
    assert [c["trait"] for c in summary["comparisons"]["controls"]] == ["sycophancy"]
    assert set(summary["update"]["norm_by_type"]) == {"o_proj", "down_proj"}
    assert not (out / "checkpoint.pt").exists()


def test_rerun_reuses_and_an_interrupted_run_resumes_where_it_stopped(distilled_run, persona_diffs, tmp_path, monkeypatch):
    out, flags = distilled_run
    finished = lu.load_lora_diff(out / "evil_distilled_lora_diff.pt")

    def no_model(*args, **kwargs):
        raise AssertionError("a rerun with the same settings must not load the model")

    copy = tmp_path / "copy"  # the output folder's name is not part of what a finished run depends on
    shutil.copytree(out, copy)
    with monkeypatch.context() as patch:
        patch.setattr(distill, "load_model_and_tokenizer", no_model)
        assert run_script("distill_steering_lora", *flags, *RUN_FLAGS, "--output_dir", copy) == 0
    assert json.loads((copy / "summary.json").read_text())["comparisons"]["controls"] == []  # recomputed, not retrained
    # A run finished before the functional comparison existed gets it on a rerun, without retraining.
    older = tmp_path / "older"
    shutil.copytree(out, older)
    summary = json.loads((older / "summary.json").read_text())
    original = summary.pop("functional")
    (older / "summary.json").write_text(json.dumps(summary))
    assert run_script("distill_steering_lora", *flags, *RUN_FLAGS, "--persona_diff_path", summary["comparisons"]["persona_diff"]["path"],
                      "--output_dir", older) == 0
    recomputed = json.loads((older / "summary.json").read_text())
    assert recomputed["curve"] == summary["curve"]
    assert not any("control" in pair for pair in recomputed["functional"]["pairs"])  # no control given to this rerun
    # Given a control it lacks, a rerun adds the control's pairs (the null), again without retraining.
    assert run_script("distill_steering_lora", *flags, *RUN_FLAGS, "--persona_diff_path", summary["comparisons"]["persona_diff"]["path"],
                      "--control_diff_paths", persona_diffs["sycophancy"], "--output_dir", older) == 0
    recomputed = json.loads((older / "summary.json").read_text())
    assert recomputed["curve"] == summary["curve"] and set(recomputed["functional"]["pairs"]) == set(original["pairs"])
    for pair, values in original["pairs"].items():
        assert recomputed["functional"]["pairs"][pair]["mean_change_cosine"] == pytest.approx(values["mean_change_cosine"], abs=1e-5)

    measure, calls = distill.heldout_kl, []

    def crash_at_step_20(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # steps 0, 10 measured (and 10 checkpointed), then the run dies
            raise RuntimeError("simulated crash")
        return measure(*args, **kwargs)

    resumed = tmp_path / "resumed"
    run = ["distill_steering_lora", *flags, *RUN_FLAGS, "--teacher_dir", out, "--output_dir", resumed]
    with monkeypatch.context() as patch:
        patch.setattr(distill, "heldout_kl", crash_at_step_20)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_script(*run)
    assert (resumed / "checkpoint.pt").is_file() and not (resumed / "summary.json").exists()
    assert run_script(*run) == 0
    again = lu.load_lora_diff(resumed / "evil_distilled_lora_diff.pt")
    for name in finished:
        assert torch.allclose(finished.delta(name), again.delta(name), atol=1e-6)
    assert json.loads((resumed / "summary.json").read_text())["curve"]["losses"] == pytest.approx(
        json.loads((out / "summary.json").read_text())["curve"]["losses"])
    assert not list(resumed.glob("teacher_*"))  # the teacher's answers came from the shared --teacher_dir


@pytest.fixture(scope="module")
def hidden_run(distilled_run, tmp_path_factory):
    """A second student of the same teacher: rank 1 on down_proj of blocks 0 and 2, with the hidden-state term."""
    out, flags = distilled_run
    target = tmp_path_factory.mktemp("distill_hidden")
    assert run_script("distill_steering_lora", *flags, "--rank", 1, "--steps", 3, "--eval_every", 3, "--layers", 0, 2,
                      "--hidden_weight", 1.0, "--target_modules", "down_proj", "--teacher_dir", out, "--output_dir", target) == 0
    return target


def test_hidden_state_objective_and_explicit_layers(hidden_run):
    target = hidden_run
    summary = json.loads((target / "summary.json").read_text())
    assert summary["layers"] == [0, 2] and "hidden_states[2..2]" in summary["objective"]
    assert all(error is not None and error >= 0 for error in summary["curve"]["hidden_error"])
    diff = lu.load_lora_diff(target / "evil_distilled_lora_diff.pt")
    assert diff.layers() == [0, 2] and {lu.module_type(n) for n in diff} == {"down_proj"}


def test_sweep_summary_per_placement_and_rank(distilled_run, hidden_run, tmp_path):
    out, _ = distilled_run
    assert run_script("scripts.distill_summary", "--runs", out, hidden_run, "--output_dir", tmp_path, "--target", 0.01) == 0
    report = json.loads((tmp_path / "summary.json").read_text())
    assert list(report["placements"]) == ["before", "0 2"] and (report["trait"], report["layer"]) == ("evil", 1)
    before = report["placements"]["before"]
    run = json.loads((out / "summary.json").read_text())
    assert before["ranks"] == [2] and before["fraction_reproduced"] == [pytest.approx(run["fraction_reproduced"])]
    assert before["smallest_rank_reaching_0.01"] == 2  # this run removes more than 1 % of the KL
    assert before["cosine_with_largest_rank"] == [pytest.approx(1.0)]
    assert before["cosine_with_persona_diff"] == [pytest.approx(run["comparisons"]["persona_diff"]["cosine"])]
    assert list(before["cosine_with_controls"]) == ["sycophancy"]
    assert report["placements"]["0 2"]["cosine_with_persona_diff"] == [None]  # no persona diff was given to that run
    # What the distilled update does, beside the persona diff and the steering, at the steered layer on held-out answers.
    pairs = run["functional"]["pairs"]
    # The control diff (sycophancy's) is compared alike: the null for the persona diff's cosines.
    assert set(pairs) == {"distilled vs steering", "distilled vs persona diff", "steering vs persona diff", "distilled vs control sycophancy",
                          "steering vs control sycophancy", "persona diff vs control sycophancy"}
    assert before["functional"]["steering vs control sycophancy"] == [pairs["steering vs control sycophancy"]]
    assert run["functional"]["layer"] == 1 and len({p["tokens"] for p in pairs.values()}) == 1 and pairs["distilled vs steering"]["tokens"] > 0
    assert all(-1 <= p["mean_change_cosine"] <= 1 and p["mean_change_norm_ratio"] > 0 for p in pairs.values())
    assert before["functional"]["distilled vs persona diff"] == [pairs["distilled vs persona diff"]]
    assert report["placements"]["0 2"]["functional"]["distilled vs persona diff"] == [None]
    distilled = lu.load_lora_diff(out / "evil_distilled_lora_diff.pt")
    persona = lu.load_lora_diff(run["comparisons"]["persona_diff"]["path"])
    spread = before["module_cosines_with_persona_diff"][0]
    assert spread["modules"] == sum(name in persona for name in distilled) > 0
    assert spread["abs_cosine_quantiles"]["q100"] == pytest.approx(max(
        abs(distilled.module_inner(n, persona)) / (distilled.module_norm(n) * persona.module_norm(n)) for n in distilled if n in persona))
    assert (tmp_path / "distillation.png").stat().st_size > 0
    with pytest.raises(PersonaLoRAError, match="is .* finished"):
        run_script("scripts.distill_summary", "--runs", out, tmp_path / "unfinished", "--output_dir", tmp_path)
    other_heldout = tmp_path / "other_heldout"
    shutil.copytree(out, other_heldout)
    summary = json.loads((other_heldout / "summary.json").read_text())
    summary["identity"]["heldout_fraction"] = 0.5
    (other_heldout / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(PersonaLoRAError, match="other held-out answers .*heldout_fraction differ"):
        run_script("scripts.distill_summary", "--runs", out, other_heldout, "--output_dir", tmp_path)


@pytest.mark.parametrize("flags, message", [
    (["--layers", "before", "1"], "stands alone"),
    (["--layers", "5"], "--layers 5 is outside 0..2"),
    (["--coef", "0"], "--coef 0 steers nothing"),
    (["--heldout_fraction", "1"], "leaves no question to train on"),
    (["--layer", "2", "--hidden_weight", "1"], "--hidden_weight needs a hidden state after --layer 2"),
    (["--target_modules", "q_proj_typo"], "--target_modules q_proj_typo matches no linear module"),
])
def test_inconsistent_settings_are_refused(distilled_run, tmp_path, flags, message):
    out, common = distilled_run
    with pytest.raises(PersonaLoRAError, match=re.escape(message)):
        run_script("distill_steering_lora", *common, *flags, "--teacher_dir", out, "--output_dir", tmp_path / "x")


@pytest.fixture(scope="module")
def config_only_model(tiny_model_dir, tmp_path_factory):
    """A model folder with the tiny model's config and no weights or tokenizer: loading it would fail,
    so an error about a flag proves the flag was checked before the model loads."""
    folder = tmp_path_factory.mktemp("config_only")
    (folder / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    return folder


@pytest.mark.parametrize("case", ["bad layer", "missing vector", "rank 0", "unwritable output"])
def test_bad_input_is_refused_in_one_line_before_the_model_loads(case, config_only_model, tiny_persona, tmp_path):
    flags = {"--model": config_only_model, "--trait": "evil", "--vector_path": tiny_persona[1], "--layer": 1, "--rank": 2,
             "--output_dir": tmp_path / "out"}
    expected = {"bad layer": "--layer 3 is outside 1..2", "missing vector": "persona vector not found",
                "rank 0": "argument --rank: must be ≥ 1, got 0", "unwritable output": "is a file, not a folder"}[case]
    if case == "bad layer":
        flags["--layer"] = 3
    elif case == "missing vector":
        flags["--vector_path"] = tmp_path / "missing.pt"
    elif case == "rank 0":
        flags["--rank"] = 0
    else:
        flags["--output_dir"] = tmp_path / "a_file"
        flags["--output_dir"].write_text("not a folder")
    code, _, stderr = run_main("distill_steering_lora", *[str(x) for pair in flags.items() for x in pair])
    assert code == 2, stderr
    assert expected in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "out").exists()


def test_the_fraction_interval_covers_the_true_fraction_at_its_nominal_rate():
    """13 held-out questions of 4 answers each, as a distillation run holds out: each question's KL
    to the plain model varies (log-normal), and the distilled model removes a share of it that
    varies by question around a true 1 − E[KL distilled]/E[KL plain] = 0.6. Over 1,000 simulated
    runs the 95 % interval must cover 0.6 at least 93 % of the time (a percentile bootstrap over the
    questions covered ~0.90 here)."""
    import numpy as np

    rng = np.random.default_rng(0)
    questions, answers, true_fraction, covered, runs = 13, 4, 0.6, 0, 1000
    labels = [f"q{q}" for q in range(questions) for _ in range(answers)]
    for _ in range(runs):
        plain_by_question = np.exp(rng.normal(0, 0.5, questions))
        kept = (1 - true_fraction) * np.exp(rng.normal(0, 0.3, questions) - 0.3 ** 2 / 2)
        plain = np.repeat(plain_by_question, answers) * rng.uniform(0.5, 1.5, questions * answers)
        per_answer = {"plain": plain.tolist(), "distilled": (plain * np.repeat(kept, answers)).tolist()}
        low, high = distill.fraction_interval(per_answer, labels)["ci95"]
        covered += low <= true_fraction <= high
    assert covered / runs >= 0.93
