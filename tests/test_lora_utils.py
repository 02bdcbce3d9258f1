"""The weight-space math of lora_utils against dense and PEFT references."""

import json
import math

import pytest
import torch

import lora_utils as lu
from conftest import make_adapter, make_tiny_llama
from io_utils import PersonaLoRAError
from lora_utils import LoRAMerger, LoRASteerer, WeightProjector
from model_loading import load_model_and_tokenizer


def peft_dense_update(model, adapter_dir):
    """The reference: what PEFT's own merge_and_unload adds to every weight."""
    from peft import PeftModel

    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    merged = PeftModel.from_pretrained(make_tiny_llama(), str(adapter_dir)).merge_and_unload()
    return {n: p.detach() - base[n] for n, p in merged.named_parameters() if not torch.equal(p.detach(), base[n])}


def raw_factors(adapter_dir):
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config["use_rslora"] else config["r"])
    factors = {}
    for key, tensor in state.items():
        name, part = lu._peft_key_to_param_name(key)
        factors.setdefault(name, {})[part] = tensor
    return factors, scale


def test_diff_equals_dense_scaled_difference_and_peft_merge(adapter_pair):
    model, pos_dir, neg_dir = adapter_pair
    diff = lu.compute_persona_lora_diff(pos_dir, neg_dir, trait="evil")
    pos_factors, pos_scale = raw_factors(pos_dir)
    neg_factors, neg_scale = raw_factors(neg_dir)
    assert pos_scale == pytest.approx(8 / 2)  # rsLoRA: alpha / sqrt(r)
    pos_merge, neg_merge = peft_dense_update(model, pos_dir), peft_dense_update(model, neg_dir)
    assert len(diff) == 3 * 7
    for name in diff:
        dense = (pos_scale * pos_factors[name]["B"] @ pos_factors[name]["A"]
                 - neg_scale * neg_factors[name]["B"] @ neg_factors[name]["A"])
        torch.testing.assert_close(diff.delta(name), dense, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(diff.delta(name), pos_merge[name] - neg_merge[name], rtol=1e-4, atol=1e-5)
        assert diff.rank(name) == 8  # r_p + r_n


def test_factorwise_subtraction_is_not_the_diff(adapter_pair):
    """Guards the known pitfall: (B_p − B_n)(A_p − A_n) ≠ ΔW, and so is forgetting the scale."""
    _, pos_dir, neg_dir = adapter_pair
    diff = lu.compute_persona_lora_diff(pos_dir, neg_dir)
    pos, scale = raw_factors(pos_dir)
    neg, _ = raw_factors(neg_dir)
    name = "model.layers.1.self_attn.q_proj.weight"
    wrong = scale * (pos[name]["B"] - neg[name]["B"]) @ (pos[name]["A"] - neg[name]["A"])
    unscaled = pos[name]["B"] @ pos[name]["A"] - neg[name]["B"] @ neg[name]["A"]
    true = diff.delta(name)
    assert (wrong - true).norm() > 0.1 * true.norm()
    assert (unscaled - true).norm() > 0.1 * true.norm()


def test_plain_lora_scale_and_rank_pattern(tmp_path):
    model = make_tiny_llama()
    adapter_dir, model = make_adapter(model, tmp_path / "a", seed=3, r=4, alpha=16,
                                      rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3})
    update = lu.load_adapter_update(adapter_dir)
    reference = peft_dense_update(model, adapter_dir)
    assert set(update) == set(reference)
    for name in update:
        torch.testing.assert_close(update.delta(name), reference[name], rtol=1e-4, atol=1e-5)
    assert update.rank("model.layers.0.self_attn.q_proj.weight") == 2


def test_save_load_roundtrip_weights_only_and_safetensors_twin(adapter_pair, tmp_path):
    _, pos_dir, neg_dir = adapter_pair
    diff = lu.compute_persona_lora_diff(pos_dir, neg_dir, trait="evil")
    path = diff.save(tmp_path / "evil_lora_diff.pt")
    state = torch.load(path, weights_only=True)
    assert state["metadata"]["trait"] == "evil" and state["format"] == lu.DIFF_FORMAT
    for loaded in (lu.load_lora_diff(path), lu.load_lora_diff(path.with_suffix(".safetensors"))):
        assert set(loaded) == set(diff)
        assert loaded.metadata["trait"] == "evil"
        for name in diff:
            assert torch.equal(loaded.delta(name), diff.delta(name))


def test_arithmetic_is_exact_and_lowrank(adapter_pair):
    model, pos_dir, neg_dir = adapter_pair
    evil = lu.compute_persona_lora_diff(pos_dir, neg_dir, trait="evil")
    other = lu.load_adapter_update(pos_dir)
    combo = 1.5 * evil - 0.5 * other
    name = "model.layers.2.mlp.down_proj.weight"
    torch.testing.assert_close(combo.delta(name), 1.5 * evil.delta(name) - 0.5 * other.delta(name), rtol=1e-5, atol=1e-6)
    assert combo.rank(name) == evil.rank(name) + other.rank(name)
    assert (evil / 2).delta(name).allclose(evil.delta(name) / 2)


def test_norms_and_inner_products_from_factors(adapter_pair):
    _, pos_dir, neg_dir = adapter_pair
    diff = lu.compute_persona_lora_diff(pos_dir, neg_dir)
    other = lu.load_adapter_update(pos_dir)
    dense_sq = sum(float(diff.delta(n, torch.float64).pow(2).sum()) for n in diff)
    assert diff.norm() == pytest.approx(math.sqrt(dense_sq), rel=1e-9)
    dense_inner = sum(float((diff.delta(n, torch.float64) * other.delta(n, torch.float64)).sum()) for n in diff)
    assert diff.inner(other) == pytest.approx(dense_inner, rel=1e-9)
    layer_sq = sum(float(diff.delta(n, torch.float64).pow(2).sum()) for n in diff if ".layers.1." in n)
    assert diff.layer_norms()[1] == pytest.approx(math.sqrt(layer_sq), rel=1e-9)


def test_compress_matches_truncated_svd_and_reports_energy(adapter_pair):
    _, pos_dir, neg_dir = adapter_pair
    diff = lu.compute_persona_lora_diff(pos_dir, neg_dir)
    compressed = diff.compress(3)
    kept = total = 0.0
    for name in diff:
        dense = diff.delta(name, torch.float64)
        u, s, vh = torch.linalg.svd(dense)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        torch.testing.assert_close(compressed.delta(name).double(), best, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(diff.singular_values(name)[:8], s[:8], rtol=1e-6, atol=1e-8)
        kept, total = kept + float((s[:3] ** 2).sum()), total + float((s**2).sum())
        assert compressed.rank(name) == 3
    assert compressed.metadata["compression"]["energy_kept"] == pytest.approx(kept / total, rel=1e-6)
    assert diff.compress(8).metadata["compression"]["energy_kept"] == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_restore_is_bit_exact_after_many_merges(adapter_pair, dtype):
    model, pos_dir, neg_dir = adapter_pair
    model = model.to(dtype)
    diff = lu.compute_persona_lora_diff(pos_dir, neg_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    merger = LoRAMerger(model)
    generator = torch.Generator().manual_seed(0)
    for _ in range(25):
        coefficient = float(torch.randn(1, generator=generator) * 3)
        subset = {n: diff.factors[n] for n in diff if torch.rand(1, generator=generator) < 0.5}
        merger.merge_lora_diff(lu.PersonaLoRADiff(subset), coefficient)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    merger.restore_original_weights()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_merge_adds_coefficient_times_delta_and_composes_linearly(adapter_pair):
    model, pos_dir, neg_dir = adapter_pair
    evil = lu.compute_persona_lora_diff(pos_dir, neg_dir)
    other = lu.load_adapter_update(neg_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    merger = LoRAMerger(model).merge_lora_diff(evil, 1.5).merge_lora_diff(other, -0.5)
    params = dict(model.named_parameters())
    for name in evil:
        expected = before[name] + 1.5 * evil.delta(name) - 0.5 * other.delta(name)
        torch.testing.assert_close(params[name], expected, rtol=1e-5, atol=1e-6)
    # The other order, and one merge of the combination, give the same weights.
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    merger.restore_original_weights()
    merger.merge_lora_diff(1.5 * evil - 0.5 * other, 1.0)
    for name in evil:
        torch.testing.assert_close(params[name], after[name], rtol=1e-6, atol=1e-7)
    merger.restore_original_weights()


def test_backups_are_lazy_and_only_for_touched_parameters(adapter_pair):
    model, pos_dir, neg_dir = adapter_pair
    diff = lu.compute_persona_lora_diff(pos_dir, neg_dir)
    merger = LoRAMerger(model, backup_device="cpu")
    assert merger.backup_bytes() == 0
    only_q = lu.PersonaLoRADiff({n: diff.factors[n] for n in diff if "q_proj" in n})
    merger.merge_lora_diff(only_q, 2.0)
    params = dict(model.named_parameters())
    assert merger.backup_bytes() == sum(params[n].numel() * params[n].element_size() for n in only_q)
    merger.restore_original_weights()


def test_steerer_restores_after_exception(adapter_pair, tmp_path):
    model, pos_dir, neg_dir = adapter_pair
    path = lu.compute_persona_lora_diff(pos_dir, neg_dir).save(tmp_path / "d.pt")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"):
        with LoRASteerer(model, path, coefficient=1.5):
            assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, before["model.layers.0.self_attn.q_proj.weight"])
            raise RuntimeError("boom")
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name])


def test_exported_peft_adapter_gives_merged_logits(adapter_pair, tmp_path):
    from peft import PeftModel

    model, pos_dir, neg_dir = adapter_pair
    diff = lu.compute_persona_lora_diff(pos_dir, neg_dir).compress(5)  # uneven ranks: exercises rank_pattern
    diff.factors["model.layers.0.mlp.up_proj.weight"] = tuple(t[..., :2] if i == 0 else t[:2] for i, t in
                                                              enumerate(diff.factors["model.layers.0.mlp.up_proj.weight"]))
    adapter_dir = diff.to_peft_adapter(tmp_path / "export", coefficient=2.5)
    tokens = torch.randint(3, 96, (2, 12))
    with LoRASteerer(model, diff, 2.5):
        merged_logits = model(tokens).logits
    peft_model = PeftModel.from_pretrained(make_tiny_llama(), str(adapter_dir))
    peft_logits = peft_model(tokens).logits
    torch.testing.assert_close(peft_logits, merged_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(make_tiny_llama()(tokens).logits, merged_logits, atol=1e-3)


def test_projections_from_factors_equal_dense(adapter_pair):
    _, pos_dir, neg_dir = adapter_pair
    diff = lu.compute_persona_lora_diff(pos_dir, neg_dir)
    generator = torch.Generator().manual_seed(1)
    dense_change = {n: torch.randn(diff.shape(n), generator=generator) for n in diff}
    result = WeightProjector.project(dense_change, diff)
    inner = sum(float((dense_change[n].double() * diff.delta(n, torch.float64)).sum()) for n in diff)
    change_norm = math.sqrt(sum(float(dense_change[n].double().pow(2).sum()) for n in diff))
    assert result["projection"] == pytest.approx(inner / diff.norm(), rel=1e-9)
    assert result["cosine"] == pytest.approx(inner / (diff.norm() * change_norm), rel=1e-9)
    name = "model.layers.2.self_attn.o_proj.weight"
    module = WeightProjector.module_projection(dense_change[name], diff, name)
    dense_module = float((dense_change[name].double() * diff.delta(name, torch.float64)).sum())
    assert module["projection"] == pytest.approx(dense_module / diff.delta(name, torch.float64).norm().item(), rel=1e-9)
    layer1 = [n for n in diff if ".layers.1." in n]
    layer_inner = sum(float((dense_change[n].double() * diff.delta(n, torch.float64)).sum()) for n in layer1)
    layer_norm = math.sqrt(sum(float(diff.delta(n, torch.float64).pow(2).sum()) for n in layer1))
    assert result["layers"][1]["projection"] == pytest.approx(layer_inner / layer_norm, rel=1e-9)
    # A low-rank change gives what its dense form gives.
    lowrank = lu.load_adapter_update(pos_dir)
    dense_form = {n: lowrank.delta(n) for n in lowrank}
    assert WeightProjector.project(lowrank, diff)["projection"] == pytest.approx(
        WeightProjector.project(dense_form, diff)["projection"], rel=1e-6)


def test_compute_layer_projections_for_peft_model_and_reference_model(adapter_pair):
    from peft import PeftModel

    model, pos_dir, neg_dir = adapter_pair
    diff = lu.compute_persona_lora_diff(pos_dir, neg_dir)
    finetune = PeftModel.from_pretrained(make_tiny_llama(), str(pos_dir))
    from_adapter = WeightProjector.compute_layer_projections(finetune, lora_diff_path=diff, num_layers=3)
    merged = PeftModel.from_pretrained(make_tiny_llama(), str(pos_dir)).merge_and_unload()
    from_weights = WeightProjector.compute_layer_projections(merged, diff, num_layers=3, reference_model=make_tiny_llama())
    assert set(from_adapter) == {0, 1, 2}
    for layer in range(3):
        assert from_adapter[layer]["projection"] == pytest.approx(from_weights[layer]["projection"], rel=1e-4)
        assert from_adapter[layer]["projection"] > 0  # pos adapter moves toward pos − neg
    with pytest.raises(PersonaLoRAError, match="needs a weight change"):
        WeightProjector.compute_layer_projections(make_tiny_llama(), diff, num_layers=3)


# --- refused inputs: one clear message, the model untouched -----------------------------------

def assert_untouched(model, before):
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_merge_refuses_diff_for_another_model(adapter_pair):
    model, pos_dir, neg_dir = adapter_pair
    diff = lu.compute_persona_lora_diff(pos_dir, neg_dir)
    wider = make_tiny_llama(hidden_size=48)
    before = {n: p.detach().clone() for n, p in wider.named_parameters()}
    with pytest.raises(PersonaLoRAError, match="does not fit this model"):
        LoRAMerger(wider).merge_lora_diff(diff, 1.0)
    assert_untouched(wider, before)
    shallow = make_tiny_llama(num_hidden_layers=2)
    before = {n: p.detach().clone() for n, p in shallow.named_parameters()}
    with pytest.raises(PersonaLoRAError, match="layers.2.* is missing"):
        LoRAMerger(shallow).merge_lora_diff(diff, 1.0)
    assert_untouched(shallow, before)


def test_merge_refuses_non_finite_diff_and_coefficient(adapter_pair):
    model, pos_dir, neg_dir = adapter_pair
    diff = lu.compute_persona_lora_diff(pos_dir, neg_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    last = diff.module_names[-1]
    up, down = diff.factors[last]
    poisoned = lu.PersonaLoRADiff({**diff.factors, last: (up.clone().index_fill_(0, torch.tensor([0]), float("nan")), down)})
    with pytest.raises(PersonaLoRAError, match="non-finite.*" + last.replace(".", r"\.")):
        LoRAMerger(model).merge_lora_diff(poisoned, 1.0)
    with pytest.raises(PersonaLoRAError, match="not a finite number"):
        LoRAMerger(model).merge_lora_diff(diff, float("inf"))
    assert_untouched(model, before)


def test_adapters_that_disagree_are_refused(tmp_path):
    model = make_tiny_llama()
    pos_dir, model = make_adapter(model, tmp_path / "pos", seed=1)
    neg_dir, model = make_adapter(model, tmp_path / "neg", seed=2, target_modules=["q_proj", "v_proj"])
    with pytest.raises(PersonaLoRAError, match=r"module model\.layers\.\d\.\w+\.\w+_proj\.weight is only in"):
        lu.compute_persona_lora_diff(pos_dir, neg_dir)
    other_dir, _ = make_adapter(make_tiny_llama(intermediate_size=48), tmp_path / "other", seed=3)
    with pytest.raises(PersonaLoRAError, match="adapters disagree: module .* is"):
        lu.compute_persona_lora_diff(pos_dir, other_dir)


def test_missing_and_corrupt_files_are_refused(tmp_path):
    with pytest.raises(PersonaLoRAError, match="not found"):
        lu.load_lora_diff(tmp_path / "nope.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(PersonaLoRAError, match="cannot read persona LoRA diff .*corrupt.pt"):
        lu.load_lora_diff(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"a": torch.zeros(2)}, foreign)
    with pytest.raises(PersonaLoRAError, match="not a persona LoRA diff"):
        lu.load_lora_diff(foreign)
    with pytest.raises(PersonaLoRAError, match="not a PEFT adapter folder"):
        lu.load_adapter_update(tmp_path)


def test_save_is_atomic_when_interrupted(adapter_pair, tmp_path, monkeypatch):
    _, pos_dir, neg_dir = adapter_pair
    diff = lu.compute_persona_lora_diff(pos_dir, neg_dir)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        diff.save(tmp_path / "evil_lora_diff.pt")
    assert list(tmp_path.glob("*evil*")) == []


def test_missing_model_gives_one_clear_line():
    with pytest.raises(PersonaLoRAError, match="omit --model to use the embedded default"):
        load_model_and_tokenizer("/no/such/model-folder", dtype="float32")


def test_row_blocked_merge_equals_whole_module_merge(adapter_pair):
    model, pos_dir, neg_dir = adapter_pair
    diff = lu.compute_persona_lora_diff(pos_dir, neg_dir)
    whole = LoRAMerger(model).merge_lora_diff(diff, 0.7)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    whole.restore_original_weights()
    blocked = LoRAMerger(model)
    blocked.workspace_elements = 40  # one or two rows per block
    blocked.merge_lora_diff(diff, 0.7)
    for name, param in model.named_parameters():  # equal up to GEMM rounding of other block shapes
        torch.testing.assert_close(param, reference[name], rtol=1e-6, atol=1e-7)
    blocked.restore_original_weights()
