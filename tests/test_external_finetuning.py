"""Experiment 2 on external data: the finetuning sets drawn from CAA's public items and MMLU
(eval/external_finetuning.py, scripts/make_external_finetuning_data.py), the projection's random
and other-trait nulls (lora_utils.project_finetune_null) against dense computations, and the
partial correlation given the mixing fraction against a hand computation."""

import itertools
import json
import math
import re

import pytest
import torch

import lora_utils as lu
from conftest import make_adapter, make_tiny_llama, run_main
from eval import external_finetuning as ef
from eval.ab import load_ab_items
from eval.ab_source import question_key, split_ab_items
from eval.stats import partial_correlation
from eval.traits import measured_questions, normalize_question
from io_utils import file_identity

N = 40


def write_ab_extraction(folder, used=64, seed=0, fraction=0.25):
    """An A/B extraction folder as extract_persona_lora.py --ab_source public records it (its
    summary.json's source), without training anything."""
    path = ef.behaviour_file("sycophancy")
    split = split_ab_items(load_ab_items(path), fraction, seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps({"source": {"kind": "ab", "ab_source": file_identity(path),
                                                                "split": split.as_record(used)}}))
    return split


@pytest.fixture(scope="module")
def external_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("external")
    split = write_ab_extraction(root / "sycophancy_caa")
    code, _, err = run_main("scripts/make_external_finetuning_data", "--ab_extraction", root / "sycophancy_caa",
                            "--output_dir", root / "data", "--n", N, "--seed", 3)
    assert code == 0, err
    return root / "data", split


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_pool_never_holds_what_the_ab_diff_trained_on_what_its_evaluation_scores_or_any_measured_question(external_sets):
    data, split = external_sets
    measured = measured_questions()
    manifest = json.loads((data / "external_finetuning.manifest.json").read_text())
    for behaviour in ("sycophancy", *ef.OTHER_BEHAVIOURS):
        items = {item.index: item for item in load_ab_items(ef.behaviour_file(behaviour))}
        own = split if behaviour == "sycophancy" else split_ab_items(list(items.values()), 0.25, 0)
        forbidden = set(own.extraction[:64]) | set(own.evaluation)
        forbidden_questions = {question_key(items[i]) for i in forbidden}
        for side in ("pos", "neg") if behaviour == "sycophancy" else ("pos",):
            records = read(data / behaviour / f"{side}.jsonl")
            assert len(records) == N
            indices = [r["source"]["item_index"] for r in records]
            assert not set(indices) & forbidden and set(indices) <= set(own.extraction)
            assert not {question_key(items[i]) for i in indices} & forbidden_questions
            assert indices == [e["item_index"] for e in manifest["sets"][behaviour]["examples"][side]]
            for record in records:  # the question trained on is the item's (its choices perhaps swapped for the letters)
                stem = normalize_question(items[record["source"]["item_index"]].stem)
                assert normalize_question(record["messages"][0]["content"]).startswith(stem)
                assert question_key(items[record["source"]["item_index"]]) not in measured
    for record in read(data / "mmlu" / "correct.jsonl"):
        assert normalize_question(record["messages"][0]["content"].split("\n\nChoices:")[0]) not in measured


def test_letters_are_balanced_and_answers_carry_the_choice_text(external_sets):
    data, _ = external_sets
    for behaviour in ("sycophancy", *ef.OTHER_BEHAVIOURS):
        for side in ("pos", "neg") if behaviour == "sycophancy" else ("pos",):
            records = read(data / behaviour / f"{side}.jsonl")
            with_text = 0
            for record in records:
                question, answer = record["messages"][0]["content"], record["messages"][1]["content"]
                match = re.match(r"^\((?P<letter>[A-Z])\)(?P<text>.*)$", answer)
                assert match, answer
                option = re.search(rf"^\s*\({match['letter']}\)(?P<text>.*)$", question, re.MULTILINE)
                if option:  # a question that writes its choices out: the answer repeats the chosen one
                    assert match["text"].strip() == option["text"].strip() != ""
                    with_text += 1
            if behaviour == "sycophancy":
                assert with_text == N
                letters = [r["messages"][1]["content"][:3] for r in records]
                assert abs(letters.count("(A)") - N / 2) <= 1, (side, letters.count("(A)"))
    pos, neg = read(data / "sycophancy" / "pos.jsonl"), read(data / "sycophancy" / "neg.jsonl")
    assert [r["messages"][0] for r in pos] == [r["messages"][0] for r in neg]  # each item both ways
    assert all(p["messages"][1] != n["messages"][1] for p, n in zip(pos, neg))


def test_mmlu_answers_are_the_correct_ones_and_never_the_capability_checks_questions(external_sets):
    from eval.mmlu import LETTERS, load_questions, seeded_subset

    data, _ = external_sets
    rows, _ = load_questions("packaged")
    scored = {normalize_question(r["question"]) for r in seeded_subset(rows, 500, 0)}
    # a smaller check with the same seed scores a prefix of the same sample, so it is excluded too
    assert {normalize_question(r["question"]) for r in seeded_subset(rows, 100, 0)} <= scored
    records = read(data / "mmlu" / "correct.jsonl")
    assert len(records) == N
    for record in records:
        row = rows[record["source"]["item_index"]]
        assert record["messages"][1]["content"] == f"({LETTERS[row['answer']]}) {row['choices'][row['answer']]}"
        assert record["messages"][0]["content"].startswith(row["question"])
        assert normalize_question(row["question"]) not in scored


@pytest.mark.parametrize("case, message", [
    ("missing", "holds no summary.json"),
    ("unsplit", "records no A/B split"),
    ("too_many", "is more than the 236 examples of sycophancy's finetuning pool"),
    ("unknown", "unknown behaviour 'flattery'"),
])
def test_bad_input_is_refused_in_one_line_before_anything_is_written(tmp_path, case, message):
    folder = tmp_path / "ab"
    if case == "unsplit":
        folder.mkdir()
        (folder / "summary.json").write_text(json.dumps({"source": {"kind": "prompts"}}))
    elif case != "missing":
        write_ab_extraction(folder)
    flags = {"too_many": ["--n", 300], "unknown": ["--behaviours", "hallucination", "flattery"]}.get(case, [])
    code, _, err = run_main("scripts/make_external_finetuning_data", "--ab_extraction", folder, "--output_dir", tmp_path / "out", *flags)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "out").exists()


def test_a_recorded_split_that_is_not_the_split_functions_is_refused(tmp_path):
    split = write_ab_extraction(tmp_path / "ab")
    summary = json.loads((tmp_path / "ab" / "summary.json").read_text())
    summary["source"]["split"]["evaluation_items"] = split.evaluation[1:] + split.extraction[:1]
    (tmp_path / "ab" / "summary.json").write_text(json.dumps(summary))
    code, _, err = run_main("scripts/make_external_finetuning_data", "--ab_extraction", tmp_path / "ab", "--output_dir", tmp_path / "out")
    assert code == 2 and "recorded split is not what" in err


# ---------------------------------------------------------------------------------------------
# The projection's nulls
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def projection_pair(tmp_path_factory):
    """The tiny original model, a persona diff, another trait's diff, and one LoRA finetune saved
    both as an adapter and merged as a full (sharded) checkpoint."""
    from peft import PeftModel

    root = tmp_path_factory.mktemp("null_projection")
    make_tiny_llama().save_pretrained(root / "original")
    diffs = []
    for name, seeds in (("persona", (1, 2)), ("other", (3, 4))):
        for side, seed in zip(("pos", "neg"), seeds):
            make_adapter(make_tiny_llama(), root / f"{name}_{side}", seed=seed, r=2, alpha=4)
        diffs.append(lu.compute_persona_lora_diff(root / f"{name}_pos", root / f"{name}_neg"))
    adapter, _ = make_adapter(make_tiny_llama(), root / "finetune_adapter", seed=7, r=4, alpha=8)
    PeftModel.from_pretrained(make_tiny_llama(), str(adapter)).merge_and_unload().save_pretrained(
        root / "finetune_checkpoint", max_shard_size="200KB")
    return root, diffs[0], diffs[1]


def test_null_projections_equal_a_dense_computation_for_adapters_and_checkpoints(projection_pair):
    root, persona, other = projection_pair
    draws, seed = 6, 11
    update = lu.load_adapter_update(root / "finetune_adapter")
    change = {name: update.delta(name, torch.float64) for name in update}
    expected = []
    for draw in range(draws):
        total = 0.0
        for module in persona.module_names:
            shape, rank = persona.shape(module), persona.rank(module)
            up = lu.null_up(shape, rank, draws, seed, module, "persona", lu.PROJECTION_NULL_STREAM)
            down = lu.null_down(shape, rank, draws, seed, module, "persona", lu.PROJECTION_NULL_STREAM)
            dense = up[draw].double() @ down[draw].double()
            dense *= persona.module_norm(module) / float(dense.norm())  # matched module norm, by hand
            total += float((change[module] * dense).sum()) if module in change else 0.0
        expected.append(total / persona.norm())
    for folder in ("finetune_adapter", "finetune_checkpoint"):
        result = lu.project_finetune_null(root / "original", root / folder, {"persona": persona}, {"other": other}, draws, seed)["persona"]
        assert result["null_draws"] == pytest.approx(expected, rel=1e-4, abs=1e-9), folder
        assert result["projection"] == pytest.approx(lu.WeightProjector.project(update, persona)["projection"], rel=1e-4)
        assert result["null_diffs"]["other"] == pytest.approx(lu.WeightProjector.project(update, other)["projection"], rel=1e-4)
        assert result["null_diffs_reaching"] == int(abs(result["null_diffs"]["other"]) >= abs(result["projection"]))
        values = torch.tensor(expected, dtype=torch.float64)
        assert result["null"]["z"] == pytest.approx((result["projection"] - float(values.mean())) / float(values.std()), rel=1e-3)


def test_the_null_of_several_finetunes_at_once_equals_each_alone(projection_pair):
    """project_finetunes_null generates each module's draws once for every finetune: an adapter and a
    checkpoint projected together get the reports each gets alone."""
    root, persona, other = projection_pair
    folders = [root / "finetune_adapter", root / "finetune_checkpoint"]
    together = lu.project_finetunes_null(root / "original", folders, {"persona": persona}, {"other": other}, 5, 3)
    for folder, report in zip(folders, together):
        alone = lu.project_finetune_null(root / "original", folder, {"persona": persona}, {"other": other}, 5, 3)["persona"]
        assert report["persona"]["null_draws"] == pytest.approx(alone["null_draws"], rel=1e-6)
        assert report["persona"]["projection"] == pytest.approx(alone["projection"], rel=1e-6)
        assert report["persona"]["null_diffs"] == pytest.approx(alone["null_diffs"], rel=1e-6)
    assert [r["persona"]["kind"] for r in together] == ["adapter", "checkpoint"]
    assert together[0]["persona"]["null_draws"] == pytest.approx(together[1]["persona"]["null_draws"], rel=1e-3, abs=1e-9)  # one update, two forms


def test_an_other_traits_diff_reaches_a_projection_in_absolute_value(projection_pair):
    """The draws' p is two-sided, so the count of other traits' diffs reaching a projection must be
    too: a diff the finetune projects onto at −p reaches +p (a one-sided count missed it)."""
    root, persona, _ = projection_pair
    projected = lu.project_finetune_null(root / "original", root / "finetune_adapter", {"persona": persona}, {}, 2, 0)
    toward = persona * (1.0 if projected["persona"]["projection"] > 0 else -1.0)  # a diff it projects on positively
    result = lu.project_finetune_null(root / "original", root / "finetune_adapter", {"persona": toward},
                                      {"opposite": toward * -1.0, "weaker": toward * 0.5}, 2, 0)["persona"]
    assert result["projection"] > 0 and result["null_diffs"]["opposite"] == pytest.approx(-result["projection"])
    assert result["null_diffs_reaching"] == 2  # the opposite diff in size, and the scaled one (a projection is scale-free)


def test_the_null_reports_arithmetic():
    report = lu.against_null(0.5, [0.0, 0.1, -0.6, 0.6])
    values = torch.tensor([0.0, 0.1, -0.6, 0.6], dtype=torch.float64)
    assert report["z"] == pytest.approx((0.5 - float(values.mean())) / float(values.std()))
    assert report["p"] == pytest.approx(2 / 5) and report["p_two_sided"] == pytest.approx(3 / 5)


def test_cal_weight_projection_reports_both_diffs_and_the_nulls(projection_pair, tmp_path):
    root, persona, other = projection_pair
    paths = [persona.save(tmp_path / "a" / "syco_lora_diff.pt"), persona.__mul__(-1.0).save(tmp_path / "b" / "syco_lora_diff.pt"),
             other.save(tmp_path / "c" / "other_lora_diff.pt")]
    out = tmp_path / "p.json"
    code, _, err = run_main("cal_weight_projection", "--original_model", root / "original", "--finetuned_model", root / "finetune_adapter",
                            "--lora_diff_path", paths[0], paths[1], "--null_draws", 5, "--null_diffs", paths[2], "--output_path", out)
    assert code == 0, err
    model = json.loads(out.read_text())
    assert set(model["by_diff"]) == {"a/syco_lora_diff", "b/syco_lora_diff"}
    assert model["by_diff"]["b/syco_lora_diff"]["projection"] == pytest.approx(-model["projection"])
    assert model["null"]["a/syco_lora_diff"]["null"]["draws"] == 5 and "c/other_lora_diff" in model["null"]["a/syco_lora_diff"]["null_diffs"]


# ---------------------------------------------------------------------------------------------
# The partial correlation given the mixing fraction
# ---------------------------------------------------------------------------------------------


def pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    return sum((x - ma) * (y - mb) for x, y in zip(a, b)) / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def residuals(values, covariate):
    """Least-squares residuals on a line in the covariate, by the textbook formulas."""
    mc, mv = sum(covariate) / len(covariate), sum(values) / len(values)
    slope = sum((c - mc) * (v - mv) for c, v in zip(covariate, values)) / sum((c - mc) ** 2 for c in covariate)
    return [v - mv - slope * (c - mc) for c, v in zip(covariate, values)]


def test_partial_correlation_against_a_hand_computation():
    fraction = [0.0, 0.25, 0.5, 0.75, 1.0, 0.5]
    projection = [0.1, 0.4, 0.35, 0.9, 1.1, 0.6]
    behaviour = [0.2, 0.3, 0.55, 0.6, 0.95, 0.7]
    r_xy, r_xz, r_yz = pearson(projection, behaviour), pearson(projection, fraction), pearson(behaviour, fraction)
    by_formula = (r_xy - r_xz * r_yz) / math.sqrt((1 - r_xz ** 2) * (1 - r_yz ** 2))
    result = partial_correlation(projection, behaviour, fraction)
    assert result["statistic"] == pytest.approx(by_formula)
    # Freedman-Lane by hand: every ordering of behaviour's residuals, residualised again
    ex, ey = residuals(projection, fraction), residuals(behaviour, fraction)
    extreme = orderings = 0
    for order in itertools.permutations(range(6)):
        permuted = residuals([ey[i] for i in order], fraction)
        extreme += abs(pearson(ex, permuted)) >= abs(by_formula) - 1e-12
        orderings += 1
    assert result["p"] == pytest.approx(extreme / orderings) and result["n"] == 6
    # behaviour that the fraction explains entirely has nothing left to correlate
    assert math.isnan(partial_correlation(projection, [2 * f for f in fraction], fraction)["statistic"])


def test_correlations_per_diff_keep_lora_and_dense_apart_and_are_adjusted_for_multiplicity():
    """Each diff's correlations come per group (LoRA one point per dataset, dense apart), the partial
    correlation runs over the LoRA mixture series only (a dense finetune shares its fraction with
    the LoRA one of the same data, on another scale: its residual would tell dense from LoRA), and
    Holm runs over every test the run reports."""
    import cal_weight_projection as cwp
    from eval.stats import correlations, holm

    fractions = {"mix_0": 0.0, "mix_25": 0.25, "mix_50": 0.5, "mix_75": 0.75, "mix_100": 1.0}
    projection = {"mix_0": -0.2, "mix_25": 0.1, "mix_50": 0.05, "mix_75": 0.4, "mix_100": 0.5, "mix_100_replicate": 0.7,
                  "dense_mix_0": -3.0, "dense_mix_100": 6.0, "other_benign": 0.0}
    behaviour = {"mix_0": 0.40, "mix_25": 0.47, "mix_50": 0.49, "mix_75": 0.58, "mix_100": 0.61, "mix_100_replicate": 0.65,
                 "dense_mix_0": 0.30, "dense_mix_100": 0.90, "other_benign": 0.5}
    models = []
    for name in projection:
        dense = name.startswith("dense")
        models.append({"name": name, "path": f"/ckpt/{name}", "kind": "checkpoint" if dense else "adapter",
                       "dataset": name.removesuffix("_replicate"), "ab": behaviour[name],
                       "by_diff": {"d": {"projection": projection[name]}}})
    result = cwp.correlate_by_diff(models, ["d"])["d"]["ab"]
    partial = result["partial_correlation_given_fraction"]
    averaged = {**projection, "mix_100": (0.5 + 0.7) / 2}, {**behaviour, "mix_100": (0.61 + 0.65) / 2}
    expected = partial_correlation([averaged[0][n] for n in fractions], [averaged[1][n] for n in fractions], list(fractions.values()))
    assert partial["series"] == list(fractions) and partial["n"] == 5
    assert partial["statistic"] == pytest.approx(expected["statistic"]) and partial["p"] == pytest.approx(expected["p"])
    lora_names = [*fractions, "other_benign"]
    assert result["lora_by_dataset"]["n"] == 6 and result["lora_by_dataset"]["pearson_r"] == pytest.approx(
        correlations([averaged[0][n] for n in lora_names], [averaged[1][n] for n in lora_names])["pearson_r"])
    assert result["all_finetunes"]["n"] == 9 and "dense" not in result  # two dense points: no correlation
    output = {"models": models, "correlations_by_diff": {"d": {"ab": result}}}
    models[0]["null"] = {"d": {"null": {"p_two_sided": 0.01}}}
    cwp.adjust_for_multiplicity(output)
    raw = [result["all_finetunes"]["pearson_p"], result["all_finetunes"]["spearman_p"], result["lora_by_dataset"]["pearson_p"],
           result["lora_by_dataset"]["spearman_p"], partial["p"], 0.01]
    adjusted = [result["all_finetunes"]["pearson_p_holm"], result["all_finetunes"]["spearman_p_holm"],
                result["lora_by_dataset"]["pearson_p_holm"], result["lora_by_dataset"]["spearman_p_holm"], partial["p_holm"],
                models[0]["null"]["d"]["null"]["p_two_sided_holm"]]
    assert adjusted == pytest.approx(holm(raw)) and "6 tests" in output["multiplicity"]
    # the description names the family's parts with their counts, and only the parts it holds
    assert "4 correlation p-values" in output["multiplicity"] and "1 partial correlation," in output["multiplicity"]
    assert "1 random-null test (" in output["multiplicity"]
    del models[0]["null"]
    cwp.adjust_for_multiplicity(output)
    assert "5 tests" in output["multiplicity"] and "random-null" not in output["multiplicity"]


# ---------------------------------------------------------------------------------------------
# The experiment's summary (eval/experiments/external_prediction.py)
# ---------------------------------------------------------------------------------------------


def test_stems_cluster_the_public_sycophancy_items_by_the_claim_they_ask_about():
    """CAA's sycophancy set asks three NLP-survey claims of 260 users: each claim is one cluster,
    and every other item (asked of one user) its own."""
    from eval.experiments.external_prediction import item_groups, stem_clusters

    items = load_ab_items(ef.behaviour_file("sycophancy"))
    clusters = stem_clusters(items)
    claims = {str(item.index): m.group(1) for item in items if (m := re.search(r"as of 2022\?\s*(.*?)\s*\n", item.question))}
    assert len(set(claims.values())) == 3
    for claim in set(claims.values()):
        assert len({clusters[k] for k, c in claims.items() if c == claim}) == 1
    assert len(set(clusters.values())) == 3 + len(items) - len(claims)
    assert sum(g == "asked of several users" for g in item_groups(items)["stem"].values()) == len(claims)


def write_summary(path, by_item, sha="abc", ab_data=None, log_mass=-1.0):
    path.write_text(json.dumps({"mode": "ab", "ab_data": str(ab_data), "ab_data_sha256": sha,
                                "conditions": [{"both_orders_by_item": {str(k): v for k, v in by_item.items()},
                                                "choice_log_mass": log_mass}]}))


def test_the_heldout_change_is_a_mean_over_stems_with_the_stems_error(tmp_path):
    from eval.experiments.external_prediction import MIN_SHARED_STEM, heldout_changes
    from eval.stats import mean_and_sem

    claim = " Do you agree with this claim: " + "x" * MIN_SHARED_STEM + "?\n (A) Agree\n (B) Disagree"
    questions = [f"I am user {i}, I think so." + claim for i in range(3)] + [f"Lone question {i}? " + "y" * i + "\n (A) Yes\n (B) No"
                                                                         for i in range(3)]
    items = [{"question": q, "answer_matching_behavior": "(A)", "answer_not_matching_behavior": "(B)"} for q in questions]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    base = {i: 0.5 for i in range(6)}
    finetune = {0: 0.9, 1: 0.8, 2: 0.7, 3: 0.6, 4: 0.4, 5: 0.5}
    write_summary(tmp_path / "public_ab_base.summary.json", base, ab_data=tmp_path / "items.jsonl")
    write_summary(tmp_path / "public_ab_ft.summary.json", finetune, ab_data=tmp_path / "items.jsonl")
    report = heldout_changes(tmp_path, ["ft"])
    assert report["stems"] == 4 and report["items"] == 6
    mean, sem, _ = mean_and_sem([0.3, 0.1, -0.1, 0.0])  # the claim's three items count once, as their mean
    row = report["finetunes"]["ft"]["changes"]
    assert row["all"]["mean"] == pytest.approx(mean) and row["all"]["sem"] == pytest.approx(sem) and row["all"]["stems"] == 4
    assert row["stem: asked of several users"]["items"] == 3 and row["stem: asked of one user"]["mean"] == pytest.approx(0.0)
    # per item: (0.4 + 0.3 + 0.2 + 0.1 − 0.1 + 0) / 6, its error by hand from the four stems' sums of deviations
    item_mean = 0.9 / 6
    deviations = [0.4 + 0.3 + 0.2 - 3 * item_mean, 0.1 - item_mean, -0.1 - item_mean, 0.0 - item_mean]
    assert row["all"]["item_mean"] == pytest.approx(item_mean)
    assert row["all"]["item_sem"] == pytest.approx(math.sqrt(4 / 3 * sum(d * d for d in deviations)) / 6)
    write_summary(tmp_path / "public_ab_other.summary.json", finetune, sha="another file", ab_data=tmp_path / "items.jsonl")
    with pytest.raises(Exception, match="other items"):
        heldout_changes(tmp_path, ["other"])


def test_the_experiments_family_counts_each_test_once():
    """The judged score and margin are the same in both projection runs: one family holds them
    once, both runs' A/B correlations, and every finetune's null tests; Holm over all of it. The
    pooled LoRA+dense correlations stay out (descriptive)."""
    from eval.experiments.external_prediction import experiment_tests
    from eval.stats import holm

    def run(ab_p):
        stats = {"lora_by_dataset": {"n": 5, "pearson_r": 0.5, "pearson_p": ab_p, "spearman_rho": 0.4, "spearman_p": ab_p},
                 "all_finetunes": {"n": 7, "pearson_r": 0.9, "pearson_p": 0.001, "spearman_rho": 0.9, "spearman_p": 0.001}}
        judged = {"lora_by_dataset": {"n": 5, "pearson_r": 0.1, "pearson_p": 0.5, "spearman_rho": 0.1, "spearman_p": 0.6},
                  "partial_correlation_given_fraction": {"statistic": 0.2, "p": 0.7, "n": 5}}
        return {"correlations_by_diff": {"d": {"ab": stats, "behavior_score": judged}},
                "models": [{"name": "mix_0", "null": {"d": {"null": {"z": 3.0, "draws": 100, "p_two_sided": 0.0099}}}}]}
    tests = experiment_tests(run(0.01), run(0.02))
    assert len(tests) == 2 + 3 + 2 + 1  # public A/B, judged (once, with its partial), own A/B, one null test; pooled: out
    assert [t["p_holm"] for t in tests] == pytest.approx(holm([t["p"] for t in tests]))
    assert sum("own A/B" in t["test"] for t in tests) == 2 and sum("evaluation questions" in t["test"] for t in tests) == 3


def test_the_summary_reads_both_projection_runs_into_one_row_per_finetune(tmp_path):
    """scripts/external_prediction.py end to end on the files the driver writes (made by hand
    here): one row per finetune with its projections, null z and measures, the figure, and the
    refusal of a projection run without null tests."""
    from eval.experiments.external_prediction import MIN_SHARED_STEM

    questions = [f"User {i} thinks so. Do you agree: " + "c" * MIN_SHARED_STEM + "?\n (A) Agree\n (B) Disagree" for i in range(3)]
    questions += [f"Alone {i}? " + "q" * i + "\n (A) Yes\n (B) No" for i in range(3)]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps({"question": q, "answer_matching_behavior": "(A)",
                                                              "answer_not_matching_behavior": "(B)"}) + "\n" for q in questions))
    names = ["mix_0", "mix_50", "mix_100", "other_benign", "dense_mix_100"]
    write_summary(tmp_path / "public_ab_base.summary.json", {i: 0.5 for i in range(6)}, ab_data=tmp_path / "items.jsonl")
    models = []
    for rank, name in enumerate(names):
        write_summary(tmp_path / f"public_ab_{name}.summary.json", {i: 0.5 + 0.01 * rank * (i % 2) for i in range(6)},
                      ab_data=tmp_path / "items.jsonl", log_mass=-0.1 * rank)
        null = {"projection": 0.1 * rank, "null": {"z": rank - 2.0, "draws": 10, "p_two_sided": 0.5},
                "null_diffs": {"other": 0.0}, "null_diffs_reaching": 0}
        models.append({"name": name, "path": str(tmp_path / name), "kind": "checkpoint" if "dense" in name else "adapter",
                       "behavior_score": 10.0 + rank, "margin": 0.01 * rank, "ab": 0.5 + 0.01 * rank,
                       "null": {"prompt/d": null, "ab/d": {**null, "projection": -0.1 * rank}}})
    public = {"models": models, "inputs": {"lora_diff_path": "d"}, "correlations_by_diff": {}}
    own = {"models": [{**m, "ab": 0.4} for m in models], "correlations_by_diff": {}}
    (tmp_path / "projection_public.json").write_text(json.dumps(public))
    (tmp_path / "projection.json").write_text(json.dumps(own))
    (tmp_path / "eval_base.summary.json").write_text(json.dumps({"judge_description": "OFFLINE PROXY judge",
                                                                 "judge_quality": {"held_out_auroc": 0.9}}))
    code, out, err = run_main("scripts/external_prediction", "--output_dir", tmp_path)
    assert code == 0, err
    assert "judge: OFFLINE PROXY judge" in out
    report = json.loads((tmp_path / "summary.json").read_text())
    assert [row["name"] for row in report["finetunes"]] == names and (tmp_path / "summary.png").stat().st_size > 0
    row = report["finetunes"][2]
    assert row["by_diff"]["ab/d"]["projection"] == pytest.approx(-0.2) and row["by_diff"]["prompt/d"]["z"] == 0.0
    assert row["own_ab"] == 0.4 and row["public_ab"] == pytest.approx(0.52) and row["judged"] == 12.0
    assert row["public_log_mass"] == pytest.approx(-0.2) and row["base_public_log_mass"] == pytest.approx(-1.0)
    assert report["judge_quality"]["held_out_auroc"] == 0.9
    assert row["public_ab_change"]["all"]["stems"] == 4 and len(report["tests"]) == 2 * len(names)  # the null tests only
    assert set(report["heldout_change_by_group_vs_projection"]["prompt/d"]) >= {"all", "stem: asked of one user"}
    (tmp_path / "projection_public.json").write_text(json.dumps({**public, "models": [{k: v for k, v in m.items() if k != "null"}
                                                                                      for m in models]}))
    code, _, err = run_main("scripts/external_prediction", "--output_dir", tmp_path)
    assert code == 2 and "no null tests" in err and len(err.strip().splitlines()) == 1
