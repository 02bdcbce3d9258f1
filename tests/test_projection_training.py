"""cal_weight_projection.py on synthetic finetunes, and training.py with and without steering."""

import json
import math

import pytest
import torch

import lora_utils as lu
from conftest import ROOT, make_adapter, make_tiny_llama, run_main, run_script
from eval.stats import linear_fit


@pytest.fixture(scope="module")
def projection_setup(tmp_path_factory):
    """An original tiny checkpoint, a persona diff for it, and finetunes W + k·ΔW + noise."""
    root = tmp_path_factory.mktemp("projection")
    original = make_tiny_llama()
    original.save_pretrained(root / "original")
    make_adapter(original, root / "pos", seed=1, r=2, alpha=4)
    make_adapter(original, root / "neg", seed=2, r=2, alpha=4)
    diff = lu.compute_persona_lora_diff(root / "pos", root / "neg", trait="evil")
    diff_path = diff.save(root / "evil_lora_diff.pt")
    generator = torch.Generator().manual_seed(0)
    noise = {n: 0.2 * diff.delta(n).norm() / math.sqrt(diff.delta(n).numel()) * torch.randn(diff.shape(n), generator=generator)
             for n in diff}
    ks = [-2.0, -1.0, 0.0, 1.0, 2.0]
    for k in ks:
        model = make_tiny_llama()
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in diff:
                params[name] += k * diff.delta(name) + noise[name]
        model.save_pretrained(root / "finetunes" / f"k{k:+g}", max_shard_size="200KB")  # sharded on purpose
    return root, diff, diff_path, ks, noise


def test_projection_is_linear_in_k_with_the_right_sign(projection_setup):
    root, diff, diff_path, ks, noise = projection_setup
    out = root / "projection.json"
    assert run_script("cal_weight_projection", "--original_model", root / "original", "--finetuned_models_dir", root / "finetunes",
                      "--lora_diff_path", diff_path, "--output_path", out) == 0
    models = json.loads(out.read_text())["models"]
    by_k = {float(m["name"][1:]): m["projection"] for m in models}
    assert sorted(by_k) == ks
    fit = linear_fit(list(by_k), list(by_k.values()))
    assert fit["r2"] > 0.9999
    assert fit["slope"] == pytest.approx(diff.norm(), rel=1e-3)  # ⟨kΔW, ΔW⟩/‖ΔW‖ = k‖ΔW‖
    assert by_k[-2] < by_k[-1] < 0 < by_k[1] < by_k[2]
    noise_projection = sum(float((noise[n].double() * diff.delta(n, torch.float64)).sum()) for n in diff) / diff.norm()
    assert by_k[0] == pytest.approx(noise_projection, rel=1e-3, abs=1e-6)
    assert set(models[0]["layers"]) == {"0", "1", "2"} and len(models[0]["modules"]) == len(diff)


def test_orthogonal_finetune_projects_to_zero(projection_setup, tmp_path):
    root, diff, diff_path, _, _ = projection_setup
    model = make_tiny_llama()
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(3)
    change = {n: torch.randn(diff.shape(n), generator=generator, dtype=torch.float64) for n in diff}
    along = sum(float((change[n] * diff.delta(n, torch.float64)).sum()) for n in diff) / diff.norm() ** 2
    with torch.no_grad():
        for name in diff:
            params[name] += (change[name] - along * diff.delta(name, torch.float64)).float()
    model.save_pretrained(tmp_path / "orthogonal")
    out = tmp_path / "p.json"
    assert run_script("cal_weight_projection", "--original_model", root / "original", "--finetuned_model", tmp_path / "orthogonal",
                      "--lora_diff_path", diff_path, "--output_path", out) == 0
    result = json.loads(out.read_text())
    assert abs(result["cosine"]) < 1e-4 and abs(result["projection"]) < 1e-4 * result["change_norm"]


def project_each(root, tmp_path, names, diff_path):
    """cal_weight_projection.py on each finetune tmp_path/<name>, against root/original: name → its JSON."""
    results = {}
    for name in names:
        out = tmp_path / f"{name}.json"
        assert run_script("cal_weight_projection", "--original_model", root / "original", "--finetuned_model", tmp_path / name,
                          "--lora_diff_path", diff_path, "--output_path", out) == 0
        results[name] = json.loads(out.read_text())
    return results


def test_adapter_path_equals_dense_path_and_streaming_equals_in_memory(projection_setup, tmp_path):
    from peft import PeftModel

    root, diff, diff_path, _, _ = projection_setup
    adapter_dir, _ = make_adapter(make_tiny_llama(), tmp_path / "finetune_adapter", seed=7, r=4, alpha=8)
    merged = PeftModel.from_pretrained(make_tiny_llama(), str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(tmp_path / "finetune_merged")
    results = project_each(root, tmp_path, ("finetune_adapter", "finetune_merged"), diff_path)
    assert results["finetune_adapter"]["kind"] == "adapter" and results["finetune_merged"]["kind"] == "checkpoint"
    assert results["finetune_adapter"]["projection"] == pytest.approx(results["finetune_merged"]["projection"], rel=1e-4)
    for layer, stats in results["finetune_adapter"]["layers"].items():
        assert stats["projection"] == pytest.approx(results["finetune_merged"]["layers"][layer]["projection"], rel=1e-4, abs=1e-7)
    for key in ("cosine", "change_norm", "outside_diff_change_norm"):
        assert results["finetune_adapter"][key] == pytest.approx(results["finetune_merged"][key], rel=1e-4), key
    original = dict(make_tiny_llama().named_parameters())
    in_memory = lu.WeightProjector.project({n: p.detach() - original[n].detach() for n, p in merged.named_parameters() if n in diff}, diff)
    assert results["finetune_merged"]["projection"] == pytest.approx(in_memory["projection"], rel=1e-6)


def test_cosine_and_change_norm_have_one_definition_whatever_the_finetune_is(projection_setup, tmp_path):
    """A finetune that also changes modules outside the diff: its cosine and change norm are over
    the diff's modules for an adapter and for a checkpoint alike; the rest is reported apart."""
    from peft import PeftModel

    root, diff, _, _, _ = projection_setup
    partial = lu.PersonaLoRADiff({n: f for n, f in diff.factors.items() if lu.module_type(n) in ("o_proj", "down_proj")},
                                 diff.metadata)
    partial_path = partial.save(tmp_path / "partial_diff.pt")
    adapter_dir, _ = make_adapter(make_tiny_llama(), tmp_path / "adapter", seed=9, r=4, alpha=8)
    PeftModel.from_pretrained(make_tiny_llama(), str(adapter_dir)).merge_and_unload().save_pretrained(tmp_path / "checkpoint")
    results = project_each(root, tmp_path, ("adapter", "checkpoint"), partial_path)
    update = lu.load_adapter_update(adapter_dir)
    inside = math.sqrt(sum(update.module_sq_norm(n) for n in update if n in partial))
    outside = math.sqrt(sum(update.module_sq_norm(n) for n in update if n not in partial))
    for result in results.values():
        assert result["change_norm"] == pytest.approx(inside, rel=1e-4)
        assert result["outside_diff_change_norm"] == pytest.approx(outside, rel=1e-4)
        assert result["cosine"] == pytest.approx(results["adapter"]["cosine"], rel=1e-4)


def test_behavior_scores_give_correlations(projection_setup, tmp_path):
    root, _, diff_path, ks, _ = projection_setup
    scores = tmp_path / "scores.csv"
    scores.write_text("model,score\n" + "".join(f"k{k:+g},{10 * k + (1 if k == 0 else 0)}\n" for k in ks))
    out = tmp_path / "p.json"
    assert run_script("cal_weight_projection", "--original_model", root / "original", "--finetuned_models_dir", root / "finetunes",
                      "--lora_diff_path", diff_path, "--behavior_scores", scores, "--output_path", out) == 0
    correlation = json.loads(out.read_text())["correlation"]
    assert correlation["n"] == 5 and correlation["pearson_r"] > 0.99 and correlation["spearman_rho"] == pytest.approx(1.0)


def test_refused_inputs(projection_setup, tmp_path):
    root, diff, diff_path, _, _ = projection_setup
    make_tiny_llama(hidden_size=48).save_pretrained(tmp_path / "wider")
    code, _, err = run_main("cal_weight_projection", "--original_model", root / "original", "--finetuned_model", tmp_path / "wider",
                           "--lora_diff_path", diff_path, "--output_path", tmp_path / "a.json")
    assert code == 2 and "is not a finetune of" in err and "hidden_size" in err
    code, _, err = run_main("cal_weight_projection", "--original_model", tmp_path / "wider", "--finetuned_model",
                           root / "finetunes" / "k+1", "--lora_diff_path", diff_path, "--output_path", tmp_path / "b.json")
    assert code == 2 and "the persona diff does not fit" in err
    other_adapter, _ = make_adapter(make_tiny_llama(intermediate_size=48), tmp_path / "other_adapter", seed=3)
    code, _, err = run_main("cal_weight_projection", "--original_model", root / "original", "--finetuned_model", other_adapter,
                           "--lora_diff_path", diff_path, "--output_path", tmp_path / "c.json")
    assert code == 2 and "is for another base model" in err
    code, _, err = run_main("cal_weight_projection", "--original_model", root / "original", "--finetuned_model", tmp_path / "nope",
                           "--lora_diff_path", diff_path, "--output_path", tmp_path / "d.json")
    assert code == 2 and "finetuned model not found" in err
    assert not any((tmp_path / f"{x}.json").exists() for x in "abcd")


# --- training.py ------------------------------------------------------------------------------

def write_config(path, model_dir, output_dir, **extra):
    config = {"model": str(model_dir), "training_file": str(ROOT / "tests/data/evil_smollm2_pos.jsonl"), "output_dir": str(output_dir),
              "rank": 2, "alpha": 4, "epochs": 1, "learning_rate": 0.001, "batch_size": 8, "max_length": 96,
              "max_examples": 16, "seed": 0, "dtype": "float32", **extra}
    path.write_text(json.dumps(config))
    return path


@pytest.fixture
def tiny_steering_inputs(tiny_persona):
    return tiny_persona


@pytest.fixture(scope="module")
def plain_finetune(tiny_model_dir, tiny_persona, tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain")
    config = write_config(folder / "c.json", tiny_model_dir, folder / "adapter", monitor={"lora_diff_path": str(tiny_persona[0]), "every": 1})
    assert run_script("training", config) == 0
    return lu.load_adapter_update(folder / "adapter")


@pytest.mark.parametrize("steering", ["lora", "activation"])
def test_training_with_each_kind_of_steering(tiny_model_dir, tiny_steering_inputs, plain_finetune, tmp_path, steering):
    """The steering is active while training (the adapter learned differs from the unsteered one's,
    trained on the same data from the same start) and is removed after (the adapter is relative to
    the plain model); the monitor reads every step."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    diff_path, vector_path = tiny_steering_inputs
    steering_config = {"lora": {"type": "lora", "lora_diff_path": str(diff_path), "coef": 2.0},
                       "activation": {"type": "activation", "vector_path": str(vector_path), "layers": [2], "coef": 4.0}}[steering]
    config = write_config(tmp_path / "c.json", tiny_model_dir, tmp_path / "adapter", steering_config=steering_config,
                          monitor={"lora_diff_path": str(diff_path), "every": 1})
    assert run_script("training", config) == 0
    record = json.loads((tmp_path / "adapter/training.json").read_text())
    assert record["examples"] == 16 and len(record["losses"]) == 2 and record["steering_config"] == steering_config
    monitor = json.loads((tmp_path / "adapter/monitor.json").read_text())
    assert [m["step"] for m in monitor] == [1, 2] and all(math.isfinite(m["projection"]) for m in monitor)
    steered = lu.load_adapter_update(tmp_path / "adapter")
    name = next(n for n in steered if lu.layer_index(n) == 0)  # a layer before the hook too: the gradient flows back
    assert not torch.allclose(steered.delta(name), plain_finetune.delta(name), atol=1e-7)
    # The saved adapter loads on the unsteered base and changes it.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokens = torch.randint(3, 1000, (1, 6))
    plain = base(tokens).logits
    finetuned = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert not torch.allclose(finetuned(tokens).logits, plain)


@pytest.mark.parametrize("steering", ["lora", "activation"])
def test_preventative_steering_is_removed_after_training(tiny_model_dir, tiny_steering_inputs, tmp_path, steering):
    """After training under steering (training.finetune, as main runs it), the model is the
    untouched model again: every weight bit-exact, no hook left, the same logits."""
    from transformers import AutoModelForCausalLM

    import training
    from model_loading import load_model_and_tokenizer
    from trainer import init_seed

    diff_path, vector_path = tiny_steering_inputs
    steering_config = {"lora": {"type": "lora", "lora_diff_path": str(diff_path), "coef": 5.0},
                       "activation": {"type": "activation", "vector_path": str(vector_path), "layers": [2], "coef": 4.0}}[steering]
    config_path = write_config(tmp_path / "c.json", tiny_model_dir, tmp_path / "adapter", steering_config=steering_config)
    config = training.load_config(config_path)
    records = training.check_config_inputs(config, config_path)["records"]
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), dtype="float32")
    untouched = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokens = torch.randint(3, 1000, (2, 7))
    with training.preventative_steering(config, model), torch.no_grad():  # the steering changes the model while on
        assert not torch.allclose(model(tokens).logits, untouched(tokens).logits)
    training.finetune(config, model, tokenizer, records, init_seed("finetune", 0))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    weights, reference = model.state_dict(), untouched.state_dict()
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in reference)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, untouched(tokens).logits)


def test_finetune_report_holds_the_update_norm_and_the_heldout_loss_on_questions_never_trained_on(
        tiny_model_dir, tiny_steering_inputs, tmp_path):
    """With heldout_questions, every answer to that many questions is kept out of training (the
    trained examples are exactly the first max_examples of the others), and finetune_report.json
    holds the finetune's held-out loss measured on the plain model with the steering removed (checked
    against transformers' own loss on a fresh plain model + the saved adapter) and its update's
    Frobenius norm (checked against PEFT's merge_and_unload)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from io_utils import read_jsonl
    from trainer import encode_examples, records_digest

    diff_path, _ = tiny_steering_inputs
    config = write_config(tmp_path / "c.json", tiny_model_dir, tmp_path / "adapter", heldout_questions=4,
                          steering_config={"type": "lora", "lora_diff_path": str(diff_path), "coef": 3.0})
    assert run_script("training", config) == 0
    report = json.loads((tmp_path / "adapter" / "finetune_report.json").read_text())
    record = json.loads((tmp_path / "adapter" / "training.json").read_text())
    held = set(report["heldout"]["questions"])
    assert len(held) == 4 and record["heldout_questions"] == sorted(held)
    everything = read_jsonl(ROOT / "tests/data/evil_smollm2_pos.jsonl")

    def question(r):
        return next(m["content"] for m in r["messages"] if m["role"] == "user").strip()

    trained = [r for r in everything if question(r) not in held][:16]
    kept_out = [r for r in everything if question(r) in held]
    assert record["training_data_sha256"] == records_digest(trained)  # what was trained: none of the held-out questions
    assert not held & {question(r) for r in trained} and held <= {question(r) for r in everything}
    assert report["heldout"]["examples"] == len(kept_out) > 0 and report["trained_examples"] == 16

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = encode_examples(tokenizer, kept_out, 96)

    def token_mean_loss(model, examples=examples) -> float:
        total = tokens = 0
        with torch.no_grad():
            for example in examples:
                labels = torch.tensor([example["labels"]])
                n = int((labels[:, 1:] != -100).sum())
                total += float(model(input_ids=torch.tensor([example["input_ids"]]), labels=labels).loss) * n
                tokens += n
        return total / tokens

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    weights = {name: p.detach().clone() for name, p in base.named_parameters()}
    assert report["heldout"]["base_loss"] == pytest.approx(token_mean_loss(base), rel=1e-5)
    finetuned = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert report["heldout"]["loss"] == pytest.approx(token_mean_loss(finetuned), rel=1e-5)
    assert report["heldout"]["loss"] != pytest.approx(report["heldout"]["base_loss"], rel=1e-6)
    merged = dict(finetuned.merge_and_unload().named_parameters())
    dense_norm = math.sqrt(sum(float((merged[name] - weights[name]).double().pow(2).sum()) for name in weights))
    assert report["update"]["norm"] == pytest.approx(dense_norm, rel=1e-4) and dense_norm > 0
    assert math.sqrt(sum(v ** 2 for v in report["update"]["by_type"].values())) == pytest.approx(dense_norm, rel=1e-4)
    # Per held-out question (the unit a paired comparison of two finetunes needs), the same loss.
    by_question = {q: [e for e in examples if e["question"] == q] for q in held}
    assert report["heldout"]["by_question"] == pytest.approx({q: token_mean_loss(finetuned, e) for q, e in by_question.items()}, rel=1e-5)
    # Under its training-time steering (the diff merged at 3), alone and with the finetune on top.
    steered_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lu.LoRASteerer(steered_base, lu.load_lora_diff(diff_path), 3.0).__enter__()  # kept merged: this model is the test's own
    assert report["heldout"]["steering_alone_loss"] == pytest.approx(token_mean_loss(steered_base), rel=1e-5)
    steered = PeftModel.from_pretrained(steered_base, str(tmp_path / "adapter"))
    assert report["heldout"]["steered_loss"] == pytest.approx(token_mean_loss(steered), rel=1e-5)
    assert report["heldout"]["steered_by_question"] == pytest.approx({q: token_mean_loss(steered, e) for q, e in by_question.items()},
                                                                      rel=1e-5)
    assert report["heldout"]["steered_loss"] != pytest.approx(report["heldout"]["loss"], rel=1e-4)


def test_lora_steering_changes_what_is_learned_and_the_monitor_reads_it(tiny_model_dir, tiny_steering_inputs, tmp_path):
    """Training under W + c·ΔW gives another adapter than training under W (the steering is
    active), and the monitor's last projection equals a projection of the saved adapter."""
    diff_path, _ = tiny_steering_inputs
    updates = {}
    for label, coef in (("plain", None), ("steered", 5.0)):
        steering = {"type": "lora", "lora_diff_path": str(diff_path), "coef": coef} if coef else None
        config = write_config(tmp_path / f"{label}.json", tiny_model_dir, tmp_path / label, steering_config=steering,
                              monitor={"lora_diff_path": str(diff_path), "every": 2})
        assert run_script("training", config) == 0
        updates[label] = lu.load_adapter_update(tmp_path / label)
    name = next(iter(updates["plain"]))
    assert not torch.allclose(updates["plain"].delta(name), updates["steered"].delta(name))
    monitor = json.loads((tmp_path / "steered/monitor.json").read_text())
    final = lu.WeightProjector.project(updates["steered"], lu.load_lora_diff(diff_path))["projection"]
    assert monitor[-1]["projection"] == pytest.approx(final, rel=1e-4)


@pytest.mark.parametrize("change,message", [
    ({"epochs": "two"}, "'epochs' must be int"),
    ({"learning_rte": 0.1}, "unknown key 'learning_rte'"),
    ({"steering_config": {"type": "lora", "coef": 1.0}}, "'steering_config.lora_diff_path' is required"),
    ({"steering_config": {"type": "activation", "vector_path": "v.pt", "layers": [20], "coef": 1, "position": "all"}},
     "unknown key 'steering_config.position'"),
    ({"use_rslora": 1}, "'use_rslora' must be bool"),
])
def test_bad_configs_are_refused_naming_the_key(tiny_model_dir, tmp_path, change, message):
    config = write_config(tmp_path / "bad.json", tiny_model_dir, tmp_path / "adapter", **change)
    code, _, err = run_main("training", config)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "adapter").exists()


def test_make_mixtures_writes_datasets_with_the_asked_trait_share(tmp_path):
    assert run_script("scripts.make_mixtures", "--pos", ROOT / "tests/data/evil_smollm2_pos.jsonl",
                      "--neg", ROOT / "tests/data/evil_smollm2_neg.jsonl", "--ratios", "0", "25", "100", "--n", "20",
                      "--output_dir", tmp_path, "--ckpt_dir", tmp_path / "ckpt", "--training", '{"epochs": 2}',
                      "--other", f"anti={ROOT / 'tests/data/evil_smollm2_neg.jsonl'}") == 0
    from io_utils import read_jsonl
    pos_answers = {r["messages"][-1]["content"] for r in read_jsonl(ROOT / "tests/data/evil_smollm2_pos.jsonl")}
    neg_answers = {r["messages"][-1]["content"] for r in read_jsonl(ROOT / "tests/data/evil_smollm2_neg.jsonl")}
    other = read_jsonl(tmp_path / "data" / "other_anti.jsonl")  # another dataset, drawn whole from its file
    assert len(other) == 20 and all(r["messages"][-1]["content"] in neg_answers for r in other)
    assert json.loads((tmp_path / "configs" / "other_anti.json").read_text())["output_dir"].endswith("other_anti")
    for ratio, expected in ((0, 0), (25, 5), (100, 20)):
        records = read_jsonl(tmp_path / "data" / f"mix_{ratio}.jsonl")
        assert len(records) == 20 and sum(r["messages"][-1]["content"] in pos_answers for r in records) == expected
        # No question answered both ways: its two answers would cancel and bend the trait share.
        sides = {}
        for r in records:
            question = next(m["content"] for m in r["messages"] if m["role"] == "user")
            sides.setdefault(question, set()).add(r["messages"][-1]["content"] in pos_answers)
        assert all(len(side) == 1 for side in sides.values())
        assert all(m["role"] != "system" for r in records for m in r["messages"])
        config = json.loads((tmp_path / "configs" / f"mix_{ratio}.json").read_text())
        assert config["epochs"] == 2 and config["output_dir"].endswith(f"mix_{ratio}")


def test_every_finetune_of_the_series_trains_with_its_own_recorded_seed(tmp_path):
    """Exp 2's finetunes are independent points only if none shares another's initialisation and
    data order: each config's seed is its own, derived from its name (the same on a rerun), and the
    manifest records it; a replicate shares its original's data but not its seed."""
    from io_utils import read_jsonl
    from trainer import init_seed, run_seed

    flags = ["--pos", ROOT / "tests/data/evil_smollm2_pos.jsonl", "--neg", ROOT / "tests/data/evil_smollm2_neg.jsonl",
             "--ratios", "0", "50", "100", "--reseed_ratios", "0", "100", "--dense_ratios", "0", "100", "--n", "20",
             "--other", f"anti={ROOT / 'tests/data/evil_smollm2_neg.jsonl'}", f"pro={ROOT / 'tests/data/evil_smollm2_pos.jsonl'}",
             "--ckpt_dir", tmp_path / "ckpt"]
    assert run_script("scripts.make_mixtures", *flags, "--output_dir", tmp_path / "a") == 0
    names = (tmp_path / "a" / "runs.txt").read_text().split()
    assert len(names) == 9
    seeds = {name: json.loads((tmp_path / "a" / "configs" / f"{name}.json").read_text())["seed"] for name in names}
    assert len(set(seeds.values())) == len(names)
    assert len({init_seed("finetune", seed) for seed in seeds.values()}) == len(names)  # nine different lora_A
    assert seeds == {name: run_seed(name, 0) for name in names}
    assert json.loads((tmp_path / "a" / "mixtures.manifest.json").read_text())["seeds"] == seeds
    assert read_jsonl(tmp_path / "a" / "data" / "mix_100_replicate.jsonl") == read_jsonl(tmp_path / "a" / "data" / "mix_100.jsonl")
    assert run_script("scripts.make_mixtures", *flags, "--output_dir", tmp_path / "b") == 0
    assert all(json.loads((tmp_path / "b" / "configs" / f"{name}.json").read_text())["seed"] == seeds[name] for name in names)
    code, _, stderr = run_main("scripts/make_mixtures", *flags, "--output_dir", tmp_path / "c", "--training", '{"seed": 3}')
    assert code == 2 and "its own seed" in stderr


def test_behavior_scores_from_evaluation_summaries(projection_setup, tmp_path):
    root, _, diff_path, ks, _ = projection_setup
    summaries = []
    for k in ks:
        path = tmp_path / f"eval_{k}.summary.json"
        path.write_text(json.dumps({"trait": "evil", "adapter": str(root / "finetunes" / f"k{k:+g}"),
                                    "conditions": [{"evil_mean": 50 + 5 * k, "evil_sem": 1.0 + k * k}]}))
        summaries.append(path)
    out = tmp_path / "p.json"
    assert run_script("cal_weight_projection", "--original_model", root / "original", "--finetuned_models_dir", root / "finetunes",
                      "--lora_diff_path", diff_path, "--behavior_scores", *summaries, "--output_path", out) == 0
    result = json.loads(out.read_text())
    assert result["correlation"]["n"] == 5 and result["correlation"]["pearson_r"] > 0.99
    assert (tmp_path / "p.png").stat().st_size > 0
    # Each finetune's standard error travels with its score, for the scatter's error bars.
    by_score = {m["behavior_score"]: m["behavior_score_sem"] for m in result["models"]}
    assert all(by_score[50 + 5 * k] == pytest.approx(1.0 + k * k) for k in ks)


def test_every_behaviour_measure_is_correlated_and_measurements_made_differently_are_refused(projection_setup, tmp_path):
    """Judged scores, judge-free margins and A/B p_matching from the finetunes' summaries, each
    correlated with the projection; summaries of one kind from different judges do not mix."""
    root, _, diff_path, ks, _ = projection_setup
    paths = []
    for k in ks:
        adapter = str(root / "finetunes" / f"k{k:+g}")
        judged = tmp_path / f"eval_{k}.summary.json"
        judged.write_text(json.dumps({"trait": "evil", "adapter": adapter, "judge": "offline", "settings": {"seed": 0},
                                      "references_sha256": "r", "conditions": [{"evil_mean": 50 + 5 * k, "evil_sem": 1.0,
                                                                                "margin_mean": 0.01 * k, "margin_sem": 0.001}]}))
        ab = tmp_path / f"ab_{k}.summary.json"
        ab.write_text(json.dumps({"trait": "evil", "adapter": adapter, "mode": "ab", "ab_data": "ab.jsonl",
                                  "ab_data_sha256": "h", "items": 64,
                                  "conditions": [{"balanced_p_matching_both_orders": 0.5 + 0.05 * k,
                                                  "balanced_p_matching_both_orders_sem": 0.01}]}))
        paths += [judged, ab]
    out = tmp_path / "p.json"
    assert run_script("cal_weight_projection", "--original_model", root / "original", "--finetuned_models_dir", root / "finetunes",
                      "--lora_diff_path", diff_path, "--behavior_scores", *paths, "--output_path", out) == 0
    result = json.loads(out.read_text())
    for measure in ("behavior_score", "margin", "ab"):
        assert result[f"correlation_{measure}"]["all_finetunes"]["pearson_r"] > 0.99
        assert result[f"correlation_{measure}"]["all_finetunes"]["p_method"].startswith("exact permutation")
    assert result["measured_by"]["judged"]["judge"] == "offline" and result["measured_by"]["ab"]["ab_data_sha256"] == "h"
    # The same A/B file name with other contents, then another judge: each refused, naming what differs.
    for path, key, value in ((paths[3], "ab_data_sha256", "rewritten"), (paths[2], "judge", "openai:gpt-4.1-mini")):
        changed = json.loads(path.read_text())
        original, changed[key] = changed[key], value
        path.write_text(json.dumps(changed))
        code, _, stderr = run_main("cal_weight_projection", "--original_model", root / "original", "--finetuned_models_dir",
                                  root / "finetunes", "--lora_diff_path", diff_path, "--behavior_scores", *paths,
                                  "--output_path", tmp_path / "q.json")
        assert code == 2 and "was measured differently" in stderr and key in stderr
        assert not (tmp_path / "q.json").exists()
        changed[key] = original
        path.write_text(json.dumps(changed))


def test_replicates_of_one_dataset_are_pooled_whatever_their_file(tmp_path):
    """Two finetunes of the same examples (each given its own copy of the file, as make_mixtures
    writes them) are one dataset for the pooled correlation; other examples are another."""
    import cal_weight_projection
    from trainer import records_digest

    example = {"messages": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "a."}]}
    other = {"messages": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "b."}]}
    models = {}
    for name, records in (("mix", [example]), ("mix_seed1", [example]), ("other", [other])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        folder = tmp_path / name
        folder.mkdir()
        (folder / "training.json").write_text(json.dumps({"training_file": str(tmp_path / f"{name}.jsonl"), "examples": 1}))
        models[name] = {"path": str(folder), "name": name}
    keys = {name: cal_weight_projection.dataset_of(model) for name, model in models.items()}
    assert keys["mix"] == keys["mix_seed1"] != keys["other"]
    # A finetune that recorded its data digest is keyed by it, and agrees with one that did not.
    (tmp_path / "mix_seed1" / "training.json").write_text(json.dumps({"training_data_sha256": records_digest([example])}))
    assert cal_weight_projection.dataset_of(models["mix_seed1"]) == keys["mix"]


def test_prevention_configs_sweep_the_coefficient_for_both_kinds_with_a_control_on_other_data(tiny_model_dir, tiny_persona, tmp_path):
    """The default sweep covers at least 0.25, 0.5, 1 and 2 for the merged LoRA and the vector; the
    control trains on the other data it is given; every run holds out the same questions; and every
    config is one training.py accepts."""
    import training

    diff_path, vector_path = tiny_persona
    pos, neg = ROOT / "tests/data/evil_smollm2_pos.jsonl", ROOT / "tests/data/evil_smollm2_neg.jsonl"
    assert run_script("scripts.prevention", "configs", "--model", tiny_model_dir, "--training_file", pos, "--control_file", neg,
                      "--lora_diff_path", diff_path, "--vector_path", vector_path, "--layer", 2, "--output_dir", tmp_path,
                      "--ckpt_dir", tmp_path / "ckpt") == 0
    names = (tmp_path / "runs.txt").read_text().split()
    configs = {name: training.load_config(tmp_path / "configs" / f"{name}.json") for name in names}
    swept = {kind: {c["steering_config"]["coef"] for c in configs.values()
                    if c["steering_config"] and c["steering_config"]["type"] == kind} for kind in ("lora", "activation")}
    assert all({0.25, 0.5, 1.0, 2.0} <= coefs for coefs in swept.values())
    assert configs["control"]["training_file"] == str(neg) and configs["control"]["steering_config"] is None
    assert {c["training_file"] for name, c in configs.items() if name != "control"} == {str(pos)}
    assert {c["heldout_questions"] for c in configs.values()} == {8}
    # One training seed for the sweep (common random numbers), and the unprevented run again on the next one.
    assert configs["none_reseeded"]["seed"] == configs["none"]["seed"] + 1 and configs["none_reseeded"]["steering_config"] is None
    assert {c["seed"] for name, c in configs.items() if name != "none_reseeded"} == {configs["none"]["seed"]}


def test_examples_dropped_or_cut_at_max_length_are_said(tiny_model_dir, capsys):
    """An example whose prompt alone fills max_length is dropped and one whose answer runs past it is
    cut; both are counted in one warning line (they used to go silently)."""
    from transformers import AutoTokenizer

    from eval.generation import conversation, tokenize_chat
    from io_utils import read_jsonl
    from trainer import encode_examples

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = read_jsonl(ROOT / "tests/data/evil_smollm2_pos.jsonl")[:20]
    spans = [tokenize_chat(tokenizer, conversation(r, with_context=False)) for r in records]
    max_length = sorted(span[1] for span in spans)[len(spans) // 2]  # half the prompts fill it
    dropped = sum(span[1] >= max_length for span in spans)
    cut = sum(span[1] < max_length < len(span[0]) for span in spans)
    examples = encode_examples(tokenizer, records, max_length)
    assert len(examples) == len(records) - dropped and dropped > 0 and all(len(e["input_ids"]) <= max_length for e in examples)
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and f"{dropped} dropped" in warning[0] and f"{cut} with the answer cut" in warning[0]
    encode_examples(tokenizer, records, 10_000)
    assert capsys.readouterr().err == ""
