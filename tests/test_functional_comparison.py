"""Comparing two weight updates (or an update and an activation vector) by what they do: the
residual-stream change each causes at the steered layer (eval.activations.functional_comparison),
and the within-module cosines of two diffs (PersonaLoRADiff.module_cosines), against direct
computations on the tiny model."""

import pytest
import torch

import lora_utils as lu
from conftest import make_tiny_llama
from eval.activations import ActivationSteerer, compare_changes, functional_comparison, residual_changes

LAYER = 2  # hidden_states[2]: the output of block 1, the last block whose down_proj writes it
DOWN = "model.layers.1.mlp.down_proj.weight"


def spans():
    generator = torch.Generator().manual_seed(0)
    return [(torch.randint(3, 90, (length,), generator=generator).tolist(), start, length)
            for length, start in ((9, 4), (12, 5), (7, 3), (10, 6))]


def down_proj_diff(model, seed: int, rank: int = 2) -> lu.PersonaLoRADiff:
    out_features, in_features = model.get_parameter(DOWN).shape
    generator = torch.Generator().manual_seed(seed)
    return lu.PersonaLoRADiff({DOWN: (0.005 * torch.randn(out_features, rank, generator=generator),
                                      torch.randn(rank, in_features, generator=generator))})


class HookedUpdate:
    """The diff's update added by a forward hook on its module (x ↦ W·x + α·ΔW·x), not merged."""

    def __init__(self, model, diff, coefficient):
        self.module = model.get_submodule(DOWN.removesuffix(".weight"))
        self.delta = coefficient * diff.delta(DOWN)

    def __enter__(self):
        self.handle = self.module.register_forward_hook(lambda module, inputs, output: output + inputs[0] @ self.delta.T)
        return self

    def __exit__(self, *exc_info):
        self.handle.remove()


def test_a_diff_compared_with_itself_its_negation_and_a_hooked_equivalent():
    model = make_tiny_llama()
    diff = down_proj_diff(model, seed=1)
    edits = {"merged": lambda: lu.LoRASteerer(model, diff, 1.0), "negated": lambda: lu.LoRASteerer(model, -diff, 1.0),
             "again": lambda: lu.LoRASteerer(model, diff, 1.0), "hooked": lambda: HookedUpdate(model, diff, 1.0),
             "doubled": lambda: lu.LoRASteerer(model, 2 * diff, 1.0)}
    result = functional_comparison(model, spans(), 0, LAYER, edits, batch_size=3)
    same, negated, hooked = result["merged vs again"], result["merged vs negated"], result["merged vs hooked"]
    assert same["mean_change_cosine"] == pytest.approx(1.0) and same["per_token_cosine_mean"] == pytest.approx(1.0)
    assert same["mean_change_norm_ratio"] == pytest.approx(1.0) and same["tokens"] == 5 + 7 + 4 + 4
    # down_proj writes hidden_states[2] linearly: −ΔW changes it by exactly minus as much, 2ΔW twice as much
    assert negated["mean_change_cosine"] == pytest.approx(-1.0, abs=1e-6)
    assert negated["per_token_cosine_mean"] == pytest.approx(-1.0, abs=1e-6)
    assert negated["mean_change_norm_ratio"] == pytest.approx(1.0, rel=1e-4)
    assert result["merged vs doubled"]["mean_change_norm_ratio"] == pytest.approx(0.5, rel=1e-4)
    assert result["merged vs doubled"]["rms_change_norm_ratio"] == pytest.approx(0.5, rel=1e-4)
    assert hooked["per_token_cosine_mean"] == pytest.approx(1.0, abs=1e-6) and hooked["mean_change_norm_ratio"] == pytest.approx(1.0, rel=1e-4)
    # the merges were restored: the model is the plain one again
    assert torch.equal(model.get_parameter(DOWN), make_tiny_llama().get_parameter(DOWN))


def test_a_diff_against_a_vector_is_the_direct_computation():
    """The mean change a merged diff causes equals h(W + ΔW) − h(W) over the answer tokens computed
    directly, and a vector hooked at the layer changes every answer token by exactly c·v[ℓ]."""
    model = make_tiny_llama()
    diff = down_proj_diff(model, seed=2)
    vector = torch.randn(model.config.num_hidden_layers + 1, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    inputs = spans()
    changes = residual_changes(model, inputs, 0, LAYER, lambda: lu.LoRASteerer(model, diff, 1.0))
    direct = []
    for ids, start, end in inputs:
        with torch.no_grad():
            plain = model(torch.tensor([ids[:end]]), output_hidden_states=True).hidden_states[LAYER][0, start:end]
            with lu.LoRASteerer(model, diff, 1.0):
                merged = model(torch.tensor([ids[:end]]), output_hidden_states=True).hidden_states[LAYER][0, start:end]
        direct.append(merged - plain)
    torch.testing.assert_close(changes, torch.cat(direct), rtol=1e-4, atol=1e-5)
    steered = residual_changes(model, inputs, 0, LAYER, lambda: ActivationSteerer(model, vector, LAYER, 1.5, positions="response"))
    torch.testing.assert_close(steered, (1.5 * vector[LAYER]).expand_as(steered), rtol=1e-4, atol=1e-5)
    compared = compare_changes(changes, steered)
    expected = torch.nn.functional.cosine_similarity(torch.cat(direct).mean(0), vector[LAYER], dim=0)
    assert compared["mean_change_cosine"] == pytest.approx(float(expected), abs=1e-5)
    assert compared["mean_change_norm_ratio"] == pytest.approx(float(torch.cat(direct).mean(0).norm() / (1.5 * vector[LAYER].norm())),
                                                               rel=1e-4)


def test_module_cosines_are_the_dense_cosines_module_by_module():
    model = make_tiny_llama()
    names = [n for n, p in model.named_parameters() if n.endswith("proj.weight")][:6]

    def random_diff(seed):
        generator = torch.Generator().manual_seed(seed)
        return lu.PersonaLoRADiff({n: (torch.randn(model.get_parameter(n).shape[0], 2, generator=generator),
                                       torch.randn(2, model.get_parameter(n).shape[1], generator=generator)) for n in names})

    a, b = random_diff(4), random_diff(5)
    cosines = a.module_cosines(b)
    for name in names:
        dense = torch.nn.functional.cosine_similarity(a.delta(name).flatten(), b.delta(name).flatten(), dim=0)
        assert cosines["by_module"][name] == pytest.approx(float(dense), abs=1e-6)
    values = list(cosines["by_module"].values())
    assert cosines["modules"] == len(names)
    assert cosines["cosine_quantiles"]["q0"] == min(values) and cosines["cosine_quantiles"]["q100"] == max(values)
    assert all(v == pytest.approx(1.0) for v in a.module_cosines(a)["by_module"].values())
    assert all(v == pytest.approx(-1.0) for v in a.module_cosines(-2 * a)["by_module"].values())
    assert a.module_cosines(-a)["abs_cosine_quantiles"]["q0"] == pytest.approx(1.0)
