"""Two sources, one direction? (eval/experiments/cross_source.py): the data-weighted inner products
and their random null against dense computations on the tiny model, the null's arithmetic, and the
cross-evaluation table's pairing and Holm adjustment."""

import json

import pytest
import torch

import lora_utils as lu
from conftest import make_tiny_llama, run_main
from eval.experiments import cross_source as cs
from eval.stats import holm

MODULES = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight",
           "model.layers.1.mlp.down_proj.weight", "model.layers.1.self_attn.o_proj.weight"]


def random_diff(model, seed: int, rank: int, modules=MODULES) -> lu.PersonaLoRADiff:
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for name in modules:
        out_features, in_features = model.get_parameter(name).shape
        factors[name] = (torch.randn(out_features, rank, generator=generator), torch.randn(rank, in_features, generator=generator))
    return lu.PersonaLoRADiff(factors)


def spans():
    generator = torch.Generator().manual_seed(0)
    return [(torch.randint(3, 90, (length,), generator=generator).tolist(), start, length)
            for length, start in ((9, 4), (12, 5), (7, 3), (10, 6))]


def module_inputs(model, modules) -> dict[str, torch.Tensor]:
    """Every module's inputs on the spans' answer tokens, one sequence at a time (no padding)."""
    captured = {name: [] for name in modules}
    for ids, start, end in spans():
        handles = [model.get_submodule(name.removesuffix(".weight")).register_forward_pre_hook(
            lambda module, inputs, name=name: captured[name].append(inputs[0][0, start:end].detach().double()))
            for name in modules]
        model(input_ids=torch.tensor([ids[:end]]))
        for handle in handles:
            handle.remove()
    return {name: torch.cat(values) for name, values in captured.items()}


def dense_inner(a: lu.PersonaLoRADiff, b: lu.PersonaLoRADiff, inputs: dict) -> float:
    """The mean over tokens of Σ_m ⟨ΔW_a,m x, ΔW_b,m x⟩ with dense updates."""
    total = sum(((x @ a.delta(m, torch.float64).T) * (x @ b.delta(m, torch.float64).T)).sum() for m, x in inputs.items() if m in a and m in b)
    return float(total) / len(next(iter(inputs.values())))


def test_weighted_inner_products_and_their_null_match_dense_computations():
    torch.manual_seed(0)
    model = make_tiny_llama()
    first, second = random_diff(model, 1, rank=2), random_diff(model, 2, rank=3, modules=MODULES[:3])
    diffs = {"prompt": first, "ab": second}
    result = cs.weighted_geometry(model, spans(), 0, diffs, {"prompt": "ab", "ab": "prompt"}, draws=4, seed=7, batch_size=3)
    inputs = module_inputs(model, MODULES)
    assert result["tokens"] == 5 + 7 + 4 + 4
    for (a, b), value in result["inner"].items():
        assert value == pytest.approx(dense_inner(diffs[a], diffs[b], inputs), rel=1e-5)
    # the null: draws with `like`'s ranks and per-module norms, rebuilt from the same generators
    for against, like in (("prompt", "ab"), ("ab", "prompt")):
        expected = []
        for draw in range(4):
            factors = {}
            for module in diffs[like].module_names:
                shape, rank = diffs[like].shape(module), diffs[like].rank(module)
                up, down = lu.null_up(shape, rank, 4, 7, module, like, cs.NULL_STREAM), lu.null_down(shape, rank, 4, 7, module, like, cs.NULL_STREAM)
                scale = lu.null_scales(up, down, diffs[like].module_norm(module))[draw]
                factors[module] = (up[draw].double() * scale, down[draw].double())
            drawn = lu.PersonaLoRADiff(factors)
            for module in drawn.module_names:
                assert drawn.module_norm(module) == pytest.approx(diffs[like].module_norm(module), rel=1e-6)
            expected.append(dense_inner(diffs[against], drawn, inputs)
                            / (dense_inner(diffs[against], diffs[against], inputs) * dense_inner(drawn, drawn, inputs)) ** 0.5)
        assert result["null"][against] == pytest.approx(expected, rel=1e-5, abs=1e-9)
    # a diff is its own best match, and its negation its worst
    again = cs.weighted_geometry(model, spans(), 0, {"a": first, "b": -first, "c": 2 * first})["inner"]
    assert cs.weighted_cosine(again, "a", "b") == pytest.approx(-1.0) and cs.weighted_cosine(again, "a", "c") == pytest.approx(1.0)


def test_against_null_counts_the_observed_and_scales_by_the_spread():
    report = lu.against_null(0.5, [0.0, 0.1, -0.1, 0.6])
    assert report["p"] == pytest.approx(2 / 5) and report["null_max"] == 0.6
    spread = torch.tensor([0.0, 0.1, -0.1, 0.6], dtype=torch.float64)
    assert report["z"] == pytest.approx((0.5 - float(spread.mean())) / float(spread.std()))


def write_run(folder, name, trait, by, values, matching_first=None):
    """A two-diff run's summary: conditions at 0 0, 1 0 and 0 1 with per-unit values."""
    conditions = []
    for coefs, per_unit in zip(((0, 0), (1, 0), (0, 1)), values):
        entry = {"condition": f"c{coefs}", "coefs": {"t": coefs[0], "t_2": coefs[1]}, by: per_unit}
        if by == f"{trait}_by_question":
            entry["margin_by_question"] = {k: v / 100 for k, v in per_unit.items()}
        if matching_first is not None:
            entry["matching_first_by_item"] = matching_first
        conditions.append(entry)
    (folder / name).write_text(json.dumps({"conditions": conditions, "judge_description": "test judge"}))


def test_the_table_pairs_by_unit_and_adjusts_over_every_contrast(tmp_path):
    trait = "sycophancy"
    items = {str(i): i % 2 == 0 for i in range(6)}
    base = {str(i): 0.4 + 0.01 * i for i in range(6)}
    write_run(tmp_path, f"public_ab_{trait}.summary.json", trait, "both_orders_by_item",
              [base, {k: v + 0.1 for k, v in base.items()}, {k: v + 0.02 * int(k) for k, v in base.items()}], items)
    write_run(tmp_path, f"own_ab_{trait}.summary.json", trait, "both_orders_by_item", [base, base, base], items)
    questions = {f"q{i}": 10.0 * i for i in range(5)}
    write_run(tmp_path, f"judged_{trait}.summary.json", trait, f"{trait}_by_question",
              [questions, {k: v + 5 for k, v in questions.items()}, {k: v + 2 + i for i, (k, v) in enumerate(questions.items())}])
    (tmp_path / f"similarity_{trait}.json").write_text(json.dumps({"weighted_cosine": 0.1}))
    report = cs.summarize(tmp_path, [trait])
    rows = report["traits"][trait]["contrasts"]
    assert rows["public_ab"]["prompt_vs_unsteered"]["mean"] == pytest.approx(0.1)
    # prompt − A/B per item: 0.1 − 0.02·i, balanced over the matching answer's position (even / odd items)
    even, odd = [0.1 - 0.02 * i for i in (0, 2, 4)], [0.1 - 0.02 * i for i in (1, 3, 5)]
    assert rows["public_ab"]["prompt_vs_ab"]["mean"] == pytest.approx((sum(even) / 3 + sum(odd) / 3) / 2)
    assert rows["judged"]["prompt_vs_ab"]["mean"] == pytest.approx(5 - (2 + 2))  # 5 − (2 + mean of 0..4)
    assert rows["margin"]["prompt_vs_unsteered"]["mean"] == pytest.approx(0.05)
    family = [c for row in rows.values() for key, c in row.items() if key.endswith(("_unsteered", "_vs_ab"))]
    assert len(family) == 12
    assert [c["p_holm"] for c in family] == pytest.approx(holm([c["p"] for c in family]), nan_ok=True)


def test_a_run_without_the_two_diff_grid_is_refused(tmp_path):
    trait = "sycophancy"
    (tmp_path / f"public_ab_{trait}.summary.json").write_text(json.dumps({"conditions": [{"coefs": {"t": 0, "t_2": 0}}]}))
    code, _, err = run_main("scripts/cross_source", "summarize", "--output_dir", tmp_path, "--traits", trait)
    message = err.strip().splitlines()
    assert code == 2
    assert len(message) == 1 and "lacks the condition(s) prompt, ab" in message[0] and "--lora_coef 0 0 1 0 0 1" in message[0]
