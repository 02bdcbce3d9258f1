"""Two sources, one direction? (eval/experiments/cross_source.py): the data-weighted inner products
and their random null against dense computations on the tiny model, the null's arithmetic, and the
cross-evaluation table's pairing and Holm adjustment."""

import json

import pytest
import torch

import lora_utils as lu
from conftest import ROOT, make_tiny_llama, run_main
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
    sets = {"one": spans()[:3], "two": spans()[3:]}
    result = cs.weighted_geometry(model, sets, 0, diffs, {"prompt": "ab", "ab": "prompt"}, draws=4, seed=7, batch_size=2,
                                  label="t")
    inputs = module_inputs(model, MODULES)
    assert result["all"]["tokens"] == 5 + 7 + 4 + 4 and result["one"]["tokens"] == 5 + 7 + 4
    part = {m: x[:16] for m, x in inputs.items()}  # the first three spans' tokens
    for name, reference in (("all", inputs), ("one", part)):
        for (a, b), value in result[name]["inner"].items():
            assert value == pytest.approx(dense_inner(diffs[a], diffs[b], reference), rel=1e-5)
    # the null: draws with `like`'s ranks, each module scaled to `like`'s data-weighted norm there,
    # rebuilt from the same generators (stream "t/like")
    for against, like in (("prompt", "ab"), ("ab", "prompt")):
        expected = []
        for draw in range(4):
            factors = {}
            for module in diffs[like].module_names:
                shape, rank = diffs[like].shape(module), diffs[like].rank(module)
                up = lu.null_up(shape, rank, 4, 7, module, f"t/{like}", cs.NULL_STREAM)[draw].double()
                down = lu.null_down(shape, rank, 4, 7, module, f"t/{like}", cs.NULL_STREAM)[draw].double()
                single = {module: inputs[module]}
                scale = (dense_inner(diffs[like], diffs[like], single)
                         / dense_inner(*[lu.PersonaLoRADiff({module: (up, down)})] * 2, single)) ** 0.5
                factors[module] = (up * scale, down)
            drawn = lu.PersonaLoRADiff(factors)
            assert dense_inner(drawn, drawn, inputs) == pytest.approx(dense_inner(diffs[like], diffs[like], inputs), rel=1e-5)
            expected.append(dense_inner(diffs[against], drawn, inputs)
                            / (dense_inner(diffs[against], diffs[against], inputs) * dense_inner(drawn, drawn, inputs)) ** 0.5)
        assert result["all"]["null"][against] == pytest.approx(expected, rel=1e-5, abs=1e-9)
    # a diff is its own best match, and its negation its worst
    again = cs.weighted_geometry(model, {"all": spans()}, 0, {"a": first, "b": -first, "c": 2 * first})["all"]["inner"]
    assert cs.weighted_cosine(again, "a", "b") == pytest.approx(-1.0) and cs.weighted_cosine(again, "a", "c") == pytest.approx(1.0)


def test_against_null_counts_the_observed_both_ways_and_scales_by_the_spread():
    report = lu.against_null(0.5, [0.0, 0.1, -0.6, 0.4])
    assert report["p_two_sided"] == pytest.approx(2 / 5) and report["null_max_abs"] == 0.6
    assert lu.against_null(-0.5, [0.0, 0.1, -0.6, 0.4])["p_two_sided"] == pytest.approx(2 / 5)  # a large negative counts too
    spread = torch.tensor([0.0, 0.1, -0.6, 0.4], dtype=torch.float64)
    assert report["z"] == pytest.approx((0.5 - float(spread.mean())) / float(spread.std()))


def write_run(folder, name, trait, by, values, matching_first=None, diffs=("prompt.pt", "ab.pt")):
    """A two-diff run's summary (conditions at 0 0, 1 0 and 0 1 with per-unit values) and its manifest."""
    conditions = []
    for coefs, per_unit in zip(((0, 0), (1, 0), (0, 1)), values):
        entry = {"condition": f"c{coefs}", "coefs": {"t": coefs[0], "t_2": coefs[1]}, by: per_unit}
        if by == f"{trait}_by_question":
            entry["margin_by_question"] = {k: v / 100 for k, v in per_unit.items()}
        if matching_first is not None:
            entry["matching_first_by_item"] = matching_first
            entry["balanced_p_matching_both_orders"] = 0.5
        conditions.append(entry)
    (folder / name).write_text(json.dumps({"conditions": conditions, "judge_description": "test judge"}))
    manifest = folder / name.replace(".summary.json", ".manifest.json")
    manifest.write_text(json.dumps({"arguments": {"lora_diff_path": list(diffs)}}))


def similarity_report(p_values=(0.01, 0.5), items_path="items.jsonl"):
    test = lambda p: {"p_two_sided": p, "z": 1.0, "null_max_abs": 0.1}  # noqa: E731
    return {"weighted_cosine": 0.1, "weight_cosine": 0.0, "comparators": {}, "by_input": {}, "inputs": {"ab_items": str(items_path)},
            "residual_stream": {"layer": 2, "pairs": {}}, "diffs": {"prompt": "prompt.pt", "ab": "ab.pt"},
            "null_random": {"prompt vs draws like ab": test(p_values[0]), "ab vs draws like prompt": test(p_values[1])}}


def table_runs(folder, trait="sycophancy", diffs=("prompt.pt", "ab.pt")):
    items = {str(i): i % 2 == 0 for i in range(6)}
    base = {str(i): 0.4 + 0.01 * i for i in range(6)}
    write_run(folder, f"public_ab_{trait}.summary.json", trait, "both_orders_by_item",
              [base, {k: v + 0.1 for k, v in base.items()}, {k: v + 0.02 * int(k) for k, v in base.items()}], items, diffs)
    write_run(folder, f"own_ab_{trait}.summary.json", trait, "both_orders_by_item", [base, base, base], items, diffs)
    questions = {f"q{i}": 10.0 * i for i in range(5)}
    write_run(folder, f"judged_{trait}.summary.json", trait, f"{trait}_by_question",
              [questions, {k: v + 5 for k, v in questions.items()}, {k: v + 2 + i for i, (k, v) in enumerate(questions.items())}],
              diffs=diffs)
    # the held-out items: even ones answered 'Yes, …' the matching way, odd ones 'No, …'
    lines = [{"question": f"Question {i}?\n\nChoices:\n (A) {'Yes' if i % 2 == 0 else 'No'}, item {i}.\n (B) "
                          f"{'No' if i % 2 == 0 else 'Yes'}, item {i}.", "answer_matching_behavior": "(A)",
              "answer_not_matching_behavior": "(B)"} for i in range(6)]
    (folder / "items.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folder / f"similarity_{trait}.json").write_text(json.dumps(similarity_report(items_path=folder / "items.jsonl")))


def test_changes_by_the_matching_answers_word(tmp_path):
    """The public items grouped by the matching answer's first word: a diff that moves 'yes' and 'no'
    items differently shows it there (the A/B diff here adds 0.02·i: 0.04 on items 0, 2, 4, 0.06 on 1, 3, 5)."""
    table_runs(tmp_path)
    split = cs.answer_word_split(tmp_path, "sycophancy", tmp_path / "items.jsonl", min_group=3)
    assert list(split) == ["no", "yes"] or list(split) == ["yes", "no"]
    assert split["yes"]["items"] == split["no"]["items"] == 3
    assert split["yes"]["ab_vs_unsteered"]["mean"] == pytest.approx(0.04)
    assert split["no"]["ab_vs_unsteered"]["mean"] == pytest.approx(0.06)
    assert split["yes"]["prompt_vs_unsteered"]["mean"] == pytest.approx(0.1)
    # with the default minimum (5) both groups are too small: one pooled group, kept out of Holm's family
    report = cs.summarize(tmp_path, ["sycophancy"])
    assert list(report["traits"]["sycophancy"]["public_ab_by_answer_word"]) == ["other"]
    assert "14 tests" in report["multiplicity"]


def test_the_table_pairs_by_unit_and_adjusts_over_every_test(tmp_path):
    trait = "sycophancy"
    table_runs(tmp_path)
    report = cs.summarize(tmp_path, [trait])
    rows = report["traits"][trait]["contrasts"]
    assert rows["public_ab"]["prompt_vs_unsteered"]["mean"] == pytest.approx(0.1)
    # prompt − A/B per item: 0.1 − 0.02·i, balanced over the matching answer's position (even / odd items)
    even, odd = [0.1 - 0.02 * i for i in (0, 2, 4)], [0.1 - 0.02 * i for i in (1, 3, 5)]
    assert rows["public_ab"]["prompt_vs_ab"]["mean"] == pytest.approx((sum(even) / 3 + sum(odd) / 3) / 2)
    assert rows["judged"]["prompt_vs_ab"]["mean"] == pytest.approx(5 - (2 + 2))  # 5 − (2 + mean of 0..4)
    assert rows["margin"]["prompt_vs_unsteered"]["mean"] == pytest.approx(0.05)
    assert rows["public_ab"]["unsteered_mean"] == 0.5  # the balanced both-orders mean, not the raw one
    # the family: 4 test sets × 3 contrasts and the 2 null tests; Holm's adjustment by hand for the
    # smallest p (0.01 × 14, unless a contrast's p is smaller)
    contrasts = [c for row in rows.values() for key, c in row.items() if key.endswith(("_unsteered", "_vs_ab"))]
    nulls = list(report["traits"][trait]["similarity"]["null_random"].values())
    assert len(contrasts) == 12 and "14 tests" in report["multiplicity"]
    smallest = min([c["p"] for c in contrasts] + [c["p_two_sided"] for c in nulls])
    assert min(c["p_holm"] for c in contrasts + nulls) == pytest.approx(min(1.0, 14 * smallest))
    assert all(c["p_holm"] >= c["p"] for c in contrasts) and all(c["p_holm"] >= c["p_two_sided"] for c in nulls)


def test_a_run_of_other_diffs_or_in_the_other_order_is_refused(tmp_path):
    table_runs(tmp_path, diffs=("ab.pt", "prompt.pt"))
    code, _, err = run_main("scripts/cross_source", "summarize", "--output_dir", tmp_path, "--traits", "sycophancy")
    message = err.strip().splitlines()
    assert code == 2 and len(message) == 1 and "not the prompt-derived and A/B-derived diffs" in message[0]


def test_a_run_without_the_two_diff_grid_is_refused(tmp_path):
    trait = "sycophancy"
    (tmp_path / f"similarity_{trait}.json").write_text(json.dumps(similarity_report()))
    (tmp_path / f"public_ab_{trait}.summary.json").write_text(json.dumps({"conditions": [{"coefs": {"t": 0, "t_2": 0}}]}))
    (tmp_path / f"public_ab_{trait}.manifest.json").write_text(json.dumps({"arguments": {"lora_diff_path": ["prompt.pt", "ab.pt"]}}))
    code, _, err = run_main("scripts/cross_source", "summarize", "--output_dir", tmp_path, "--traits", trait)
    message = err.strip().splitlines()
    assert code == 2
    assert len(message) == 1 and "lacks the condition(s) prompt, ab" in message[0] and "--lora_coef 0 0 1 0 0 1" in message[0]


def test_an_old_similarity_report_is_refused_in_one_line(tmp_path):
    (tmp_path / "similarity_sycophancy.json").write_text(json.dumps({"weighted_cosine": 0.1}))
    code, _, err = run_main("scripts/cross_source", "summarize", "--output_dir", tmp_path, "--traits", "sycophancy")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "lacks" in err


@pytest.fixture
def pair(tmp_path):
    """A prompt-derived and an A/B-derived diff of the embedded model's shapes (one module), with the
    A/B diff's held-out items beside it."""
    import shutil

    from model_loading import model_config

    config = model_config(None)
    name = "model.layers.0.mlp.down_proj.weight"

    def diff(kind, seed, folder):
        generator = torch.Generator().manual_seed(seed)
        metadata = {"trait": "sycophancy", "init": {"seed": seed}, **({"source": {"kind": "ab"}} if kind == "ab" else {})}
        factors = {name: (torch.randn(config.hidden_size, 2, generator=generator) * 1e-3,
                          torch.randn(2, config.intermediate_size, generator=generator))}
        (tmp_path / folder).mkdir()
        return lu.PersonaLoRADiff(factors, metadata).save(tmp_path / folder / "sycophancy_lora_diff.pt", safetensors_twin=False)

    prompt, ab = diff("prompts", 1, "prompt"), diff("ab", 2, "ab")
    source = ROOT / "dataset/external/caa/generate/sycophancy/generate_dataset.json"
    (tmp_path / "ab" / "ab_evaluation.jsonl").write_text("\n".join(json.dumps(item) for item in json.loads(source.read_text())[:8]))
    shutil.copy(tmp_path / "ab" / "ab_evaluation.jsonl", tmp_path / "copy.jsonl")
    (tmp_path / "other.jsonl").write_text("\n".join(json.dumps(item) for item in json.loads(source.read_text())[8:16]))
    (tmp_path / "answers.csv").write_text("question_id,question,answer,coef\nq0,Hi?,Hello.,0\n")
    return prompt, ab, diff


@pytest.mark.parametrize("case, message", [
    ("same_file", "are the same file"),
    ("swapped", "pass the prompt-derived diff and the one from extract_persona_lora.py --ab_source"),
    ("shared_init", "start from the same initialisation"),
    ("other_items", "is not the A/B diff's held-out file"),
])
def test_a_pair_that_cannot_be_compared_is_refused_before_a_model_loads(pair, tmp_path, monkeypatch, case, message):
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("a model was loaded")))
    prompt, ab, make = pair
    items = tmp_path / ("other.jsonl" if case == "other_items" else "copy.jsonl")
    if case == "shared_init":
        ab = make("ab", 1, "ab_shared")
        (tmp_path / "ab_shared" / "ab_evaluation.jsonl").write_text((tmp_path / "copy.jsonl").read_text())
        items = tmp_path / "ab_shared" / "ab_evaluation.jsonl"
    first, second = {"same_file": (prompt, prompt), "swapped": (ab, prompt)}.get(case, (prompt, ab))
    code, _, err = run_main("scripts/cross_source", "similarity", "--trait", "sycophancy", "--prompt_diff", first,
                            "--ab_diff", second, "--ab_items", items, "--answers", tmp_path / "answers.csv",
                            "--output", tmp_path / "out.json")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "out.json").exists()


def test_comparators_of_one_trait_from_both_sources_are_told_apart(pair, tmp_path, monkeypatch):
    """Another trait's prompt-derived and A/B-derived diffs may both be comparators (the A/B one
    is the null for the answer format the A/B-derived diff learns); two of one trait and source are
    refused. Checked up to the next refusal (held-out items of another file), before any model loads."""
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("a model was loaded")))
    prompt, ab, make = pair
    by_prompts, by_ab, again = make("prompts", 5, "c1"), make("ab", 6, "c2"), make("ab", 7, "c3")
    flags = ["similarity", "--trait", "sycophancy", "--prompt_diff", prompt, "--ab_diff", ab, "--ab_items", tmp_path / "other.jsonl",
             "--answers", tmp_path / "answers.csv", "--output", tmp_path / "out.json"]
    code, _, err = run_main("scripts/cross_source", *flags, "--comparators", by_prompts, by_ab)
    assert code == 2 and "is not the A/B diff's held-out file" in err, err
    code, _, err = run_main("scripts/cross_source", *flags, "--comparators", by_ab, again)
    assert code == 2 and "two diffs are both other:sycophancy (A/B)" in err, err
