"""Multi-persona composition: eval_lora_persona.py with several diffs and grouped coefficients,
and scripts/composition.py's factorial grid and additive fit."""

import json
import math

import pandas as pd
import numpy as np
import pytest
import torch

import lora_utils as lu
from conftest import ROOT, make_adapter, run_main, run_script
from eval.stats import additive_fit
from eval.traits import load_trait
from io_utils import PersonaLoRAError, write_json
from model_loading import load_model_and_tokenizer


@pytest.fixture(autouse=True)
def private_judge_cache(tmp_path, monkeypatch):
    monkeypatch.setattr("eval.judge.cache_dir", lambda: tmp_path / "judge-cache")


@pytest.fixture
def two_diffs(tiny_model_dir, tiny_persona, tmp_path):
    """The tiny model's evil diff and a second, independent one labelled sycophancy."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    make_adapter(model, tmp_path / "pos", seed=3, r=2, alpha=4)
    make_adapter(model, tmp_path / "neg", seed=4, r=2, alpha=4)
    second = lu.compute_persona_lora_diff(tmp_path / "pos", tmp_path / "neg", trait="sycophancy").save(tmp_path / "syco.pt")
    return tiny_persona[0], second


def flags(tiny_model_dir, judge_data, trait="evil"):
    return ["--model", tiny_model_dir, "--trait", trait, "--n_per_question", "1", "--max_new_tokens", "5", "--temperature", "1.0",
            "--judge", "offline", "--judge_data", judge_data, "--dtype", "float32"]


def answers(frame, **coefs):
    rows = frame
    for name, value in coefs.items():
        rows = rows[rows[name] == value]
    return list(rows.answer.fillna(""))


@pytest.mark.judge
def test_grid_of_compositions_matches_single_diff_runs(tiny_model_dir, judge_data, two_diffs, tmp_path):
    evil, syco = two_diffs
    grid = tmp_path / "eval_evil.csv"
    assert run_script("eval_lora_persona", *flags(tiny_model_dir, judge_data), "--lora_diff_path", evil, syco,
                      "--lora_coef", "0", "0", "8", "0", "0", "8", "8", "8", "--output_path", grid) == 0
    single = tmp_path / "single.csv"
    assert run_script("eval_lora_persona", *flags(tiny_model_dir, judge_data), "--lora_diff_path", evil,
                      "--lora_coef", "0", "8", "--output_path", single) == 0

    frame, alone = pd.read_csv(grid), pd.read_csv(single)
    questions = len(load_trait("evil").evaluation_questions)
    assert list(frame.columns)[-2:] == ["coef_evil", "coef_sycophancy"] and len(frame) == 4 * questions
    assert set(frame.method) == {"lora_composed"}
    summary = json.loads(grid.with_suffix(".summary.json").read_text())
    assert [c["coefs"] for c in summary["conditions"]] == [{"evil": 0, "sycophancy": 0}, {"evil": 8, "sycophancy": 0},
                                                           {"evil": 0, "sycophancy": 8}, {"evil": 8, "sycophancy": 8}]
    # A zero coefficient merges nothing: those combinations are the single-diff runs, answer for answer.
    assert answers(frame, coef_evil=0, coef_sycophancy=0) == answers(alone, coef=0)
    assert answers(frame, coef_evil=8, coef_sycophancy=0) == answers(alone, coef=8)
    # ... and the second diff really is merged when its coefficient is not zero.
    assert answers(frame, coef_evil=0, coef_sycophancy=8) != answers(alone, coef=0)
    assert answers(frame, coef_evil=8, coef_sycophancy=8) != answers(alone, coef=8)

    # The same grid judged for the second trait, then the composition summary over both.
    assert run_script("eval_lora_persona", *flags(tiny_model_dir, judge_data, "sycophancy"), "--lora_diff_path", evil, syco,
                      "--lora_coef", "0", "0", "8", "0", "0", "8", "8", "8",
                      "--output_path", tmp_path / "eval_sycophancy.csv") == 0
    assert run_script("scripts.composition", "summarize", "--traits", "evil", "sycophancy", "--output_dir", tmp_path,
                      "--model", tiny_model_dir) == 0
    report = json.loads((tmp_path / "summary.json").read_text())
    for trait in ("evil", "sycophancy"):
        points = {(c["coefs"]["evil"], c["coefs"]["sycophancy"]): c[f"{trait}_mean"]
                  for c in json.loads((tmp_path / f"eval_{trait}.summary.json").read_text())["conditions"]}
        # In a 2 × 2 factorial the additive fit's slope is the main effect: the mean change per unit.
        main_effect = (points[8, 0] + points[8, 8] - points[0, 0] - points[0, 8]) / 2 / 8
        assert report["fits"][trait]["trait_score"]["slope"]["evil"] == pytest.approx(main_effect, abs=1e-9)
        assert report["headline"][trait]["trait_score"]["own_slope"] == report["fits"][trait]["trait_score"]["slope"][trait]
        # Every combination answered the same questions: the judge-free margin was measured under each of them.
        assert set(report["fits"][trait]) == {"trait_score", "coherence", "likelihood_margin"}
    assert (tmp_path / "composition.png").stat().st_size > 10_000 and (tmp_path / "slopes.png").stat().st_size > 5_000


def test_coefficients_must_come_in_groups_of_one_per_diff(tiny_model_dir, judge_data, two_diffs, tmp_path):
    evil, syco = two_diffs
    code, _, stderr = run_main("eval_lora_persona", *flags(tiny_model_dir, judge_data), "--lora_diff_path", evil, syco,
                              "--lora_coef", "1", "2", "3", "--output_path", tmp_path / "bad.csv")
    assert code != 0 and "groups of 2" in stderr and not (tmp_path / "bad.csv").exists()


def test_grid_is_the_full_factorial():
    code, stdout, _ = run_main("scripts/composition", "grid", "--n_diffs", "3", "--levels", "0", "2")
    groups = [tuple(float(x) for x in stdout.split()[i:i + 3]) for i in range(0, 24, 3)]
    assert code == 0 and len(stdout.split()) == 24 and len(set(groups)) == 8 and set(groups[-1]) == {2.0}
    assert run_main("scripts/composition", "grid", "--n_diffs", "2", "--levels", "1")[0] != 0


def test_additive_fit_recovers_slopes_and_propagates_standard_errors():
    truth = {"a": 3.0, "b": -1.5, "c": 0.25}
    sigma, level = 2.0, 2.0
    points = [{"coefs": dict(zip(truth, combo)), "x_mean": 40 + sum(truth[n] * c for n, c in zip(truth, combo)), "x_sem": sigma}
              for combo in __import__("itertools").product([0.0, level], repeat=3)]
    fit = additive_fit(points, list(truth), "x")
    assert fit["intercept"] == pytest.approx(40) and fit["additive_r2"] == pytest.approx(1)
    for name, slope in truth.items():
        assert fit["slope"][name] == pytest.approx(slope)
        # Two-level factorial, n runs, equal errors σ: s.e.(β) = 2σ / (level·√n).
        assert fit["slope_sem"][name] == pytest.approx(2 * sigma / (level * math.sqrt(8)))
    interacting = [dict(p, x_mean=p["x_mean"] + 5 * p["coefs"]["a"] * p["coefs"]["b"]) for p in points]
    assert additive_fit(interacting, list(truth), "x")["additive_r2"] < 0.99
    together = [p for p in points if p["coefs"]["a"] == p["coefs"]["b"]]  # a and b never vary apart
    with pytest.raises(PersonaLoRAError, match="do not separate"):
        additive_fit(together, list(truth), "x")


def test_summarize_refuses_results_of_other_diffs(tmp_path):
    write_json(tmp_path / "eval_evil.summary.json", {"conditions": [{"coefs": {"evil": 1.0, "other": 0.0}}]})
    code, _, stderr = run_main("scripts/composition", "summarize", "--traits", "evil", "sycophancy", "--output_dir", tmp_path,
                              cwd=ROOT)
    assert code != 0 and "eval_evil.summary.json" in stderr and len(stderr.strip().splitlines()) == 1


def test_response_log_likelihoods_match_one_sequence_at_a_time(tiny_model_dir):
    """Batched, padded teacher forcing equals one unpadded sequence at a time, over the answer's own
    tokens (the chat template's end-of-turn tokens are not part of the answer)."""
    from eval.generation import response_log_likelihoods

    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), dtype="float32")
    conversations = [[{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
                     for question, answer in [("Hi?", "Hello there, friend."), ("What is 2+2? Explain.", "4"),
                                              ("Tell me a long story about a cat.", "Once upon a time a cat sat on a very long mat.")]]
    batched = response_log_likelihoods(model, tokenizer, conversations, batch_size=3)
    for conversation, score in zip(conversations, batched):
        prompt = tokenizer.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(prompt + conversation[1]["content"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            log_probs = model(torch.tensor([ids], device=model.device)).logits[0].log_softmax(-1)
        reference = sum(float(log_probs[t - 1, ids[t]]) for t in range(len(prompt_ids), len(ids))) / (len(ids) - len(prompt_ids))
        assert score == pytest.approx(reference, abs=1e-4)


@pytest.mark.judge
def test_margins_of_every_combination_equal_a_direct_computation_and_are_kept(tiny_model_dir, judge_data, two_diffs, tmp_path):
    """The judge-free margin of each combination: the unsteered model's pos- minus neg-prompted
    reference answers, scored under the combination; recomputed here for the unsteered one, and
    reused (not recomputed) by a rerun."""
    from eval.evaluate import question_margins
    from io_utils import read_jsonl

    evil, syco = two_diffs
    output = tmp_path / "eval_evil.csv"
    arguments = [*flags(tiny_model_dir, judge_data), "--lora_diff_path", evil, syco, "--lora_coef", "0", "0", "0", "8", "8", "0",
                 "--output_path", output]
    assert run_script("eval_lora_persona", *arguments) == 0
    conditions = json.loads(output.with_suffix(".summary.json").read_text())["conditions"]
    references = {side: read_jsonl(next((tmp_path / ".references").glob(f"evil_prompted_{side}-*.jsonl"))) for side in ("pos", "neg")}
    assert all(r["system"] and r["demonstrations"] == [] for r in references["pos"])  # prompted, --fewshot 0 for a non-embedded model
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir), dtype="float32")
    direct = question_margins(model, tokenizer, references)
    assert conditions[0]["margin_by_question"] == pytest.approx(direct, abs=1e-5)
    assert conditions[0]["questions"] == len(load_trait("evil").evaluation_questions)
    assert all(abs(c["margin_mean"] - conditions[0]["margin_mean"]) > 1e-4 for c in conditions[1:])  # each merge moves it
    assert conditions[1]["change_vs_baseline"]["margin"] == pytest.approx(conditions[1]["margin_mean"] - conditions[0]["margin_mean"])
    # A finished combination's margins are kept and reused by a rerun (marked here to see that).
    finished = sorted((tmp_path / ".eval_evil.work").glob("margins-lora_evil+8*.json"))
    assert len(finished) == 1
    marked = json.loads(finished[0].read_text())
    marked = {question: 123.0 for question in marked}
    finished[0].write_text(json.dumps(marked))
    assert run_script("eval_lora_persona", *arguments) == 0
    rerun = json.loads(output.with_suffix(".summary.json").read_text())["conditions"]
    assert rerun[2]["margin_mean"] == 123.0


def test_paired_slope_errors_ignore_what_every_combination_shares():
    import itertools
    import statistics

    from eval.experiments.composition import metric_fit

    offsets = {"q0": -3.0, "q1": 0.5, "q2": 7.0, "q3": 1.0}  # big, question-specific, the same under every merge
    slopes = {"q0": 0.10, "q1": 0.12, "q2": 0.07, "q3": 0.11}  # each question's own response to coefficient a
    points = [{"coefs": {"a": a, "b": b}, "margin_mean": sum(offsets[q] + slopes[q] * a for q in offsets) / 4, "margin_sem": 1.0,
               "margin_by_question": {q: offsets[q] + slopes[q] * a for q in offsets}}
              for a, b in itertools.product([0.0, 2.0], repeat=2)]
    fit = metric_fit(points, ["a", "b"], "margin")
    assert fit["slope_sem"]["a"] == pytest.approx(statistics.stdev(slopes.values()) / 2)  # √4 questions
    assert fit["slope_sem"]["b"] == pytest.approx(0, abs=1e-12)  # b changes nothing for any question
    assert fit["non_additivity"]["max_abs_mean_residual"] == pytest.approx(0, abs=1e-12)
    assert fit["non_additivity"]["residual_holds"] == "the interactions"


def test_interactions_and_cross_talk_are_tested_question_by_question():
    """A consistent interaction (a·b, the same sign on every question) is found against the maxima
    of sign-flipped questions; question noise of the same size with no interaction is not; the
    cross slope of b on a's measure is tested as a maximum likewise."""
    import itertools

    from eval.experiments.composition import cross_talk, metric_fit

    rng = np.random.default_rng(0)
    questions = [f"q{i}" for i in range(12)]
    offsets, noise = rng.normal(0, 5, len(questions)), rng.normal(0, 0.3, (4, len(questions)))

    def points(interaction: float, cross: float) -> list[dict]:
        result = []
        for k, (a, b) in enumerate(itertools.product([0.0, 1.0], repeat=2)):
            by_question = {q: offsets[i] + 2.0 * a + cross * b + interaction * a * b + noise[k, i] for i, q in enumerate(questions)}
            result.append({"coefs": {"a": a, "b": b}, "x_mean": float(np.mean(list(by_question.values()))), "x_sem": 1.0,
                           "x_by_question": by_question})
        return result

    interacting, additive = metric_fit(points(2.0, 0.0), ["a", "b"], "x"), metric_fit(points(0.0, 0.0), ["a", "b"], "x")
    assert interacting["non_additivity"]["p"] < 0.001 < additive["non_additivity"]["p"]
    assert interacting["non_additivity"]["max_abs_mean_residual"] == pytest.approx(0.5, abs=0.1)  # |±interaction/4|
    leaky, clean = metric_fit(points(0.0, 1.5), ["a", "b"], "x"), additive
    assert cross_talk(leaky, ["a", "b"], "a")["p"] < 0.001 < cross_talk(clean, ["a", "b"], "a")["p"]
    assert cross_talk(leaky, ["a", "b"], "a")["largest_cross_slope"] == pytest.approx(1.5, abs=0.3)
    three_levels = [dict(p, coefs={"a": p["coefs"]["a"] * 1.5 - 0.5, "b": p["coefs"]["b"]}) for p in points(0.0, 0.0)]
    three_levels += [dict(p, coefs={"a": 0.0, "b": p["coefs"]["b"]}) for p in points(0.0, 0.0)[:2]]
    assert "curvature" in metric_fit(three_levels, ["a", "b"], "x")["non_additivity"]["residual_holds"]


def _two_by_two(cells: dict[tuple[float, float], list[float]], metric: str) -> list[dict]:
    """Conditions of a 2 × 2 grid of diffs a and b from each cell's per-question values."""
    return [{"coefs": {"a": a, "b": b}, f"{metric}_mean": float(np.mean(values)), f"{metric}_sem": 1.0,
             f"{metric}_by_question": {f"q{i}": v for i, v in enumerate(values)}} for (a, b), values in cells.items()]


def test_simple_effects_and_the_interaction_of_a_two_by_two_by_hand():
    """Each diff's effect at the other's 0 and at +2 and the interaction, paired by question, against
    the arithmetic done by hand on six questions with large question offsets (which cancel)."""
    from eval.experiments.composition import simple_effects

    offsets = [40.0, 55.0, 30.0, 61.0, 47.0, 52.0]
    noise = [1.0, -1.0, 2.0, -2.0, 0.0, 0.0]  # in a's effect alone: mean 0, standard deviation √2
    cells = {(0.0, 0.0): offsets,
             (2.0, 0.0): [o + 10 + e for o, e in zip(offsets, noise)],  # a alone: +10
             (0.0, 2.0): [o + 1 for o in offsets],                       # b alone: +1
             (2.0, 2.0): [o + 5 for o in offsets]}                       # both: +5, not 11 (sub-additive)
    result = simple_effects(_two_by_two(cells, "m"), ["a", "b"], "m")
    effects = {(e["diff"], tuple(e["at"].values())): e for e in result["simple_effects"]}
    assert set(effects) == {("a", (0.0,)), ("a", (2.0,)), ("b", (0.0,)), ("b", (2.0,))}
    assert effects["a", (0.0,)]["mean"] == pytest.approx(10.0) and effects["a", (0.0,)]["sem"] == pytest.approx(math.sqrt(2 / 6))
    assert effects["a", (2.0,)]["mean"] == pytest.approx(4.0) and effects["a", (2.0,)]["sem"] == pytest.approx(0.0, abs=1e-12)
    assert effects["b", (0.0,)]["mean"] == pytest.approx(1.0)
    assert effects["b", (2.0,)]["mean"] == pytest.approx(-5.0) and effects["b", (2.0,)]["sem"] == pytest.approx(math.sqrt(2 / 6))
    assert all(e["from"] == 0.0 and e["to"] == 2.0 and e["questions"] == 6 for e in effects.values())
    [interaction] = result["interactions"]
    # m(2,2) − m(0,2) − m(2,0) + m(0,0) = 4 − (10 + e) per question: −6 on average, negative on every question,
    # so exactly 2 of the 2⁶ sign patterns reach it.
    assert interaction["diffs"] == ["a", "b"] and interaction["mean"] == pytest.approx(-6.0)
    assert interaction["sem"] == pytest.approx(math.sqrt(2 / 6)) and interaction["p"] == pytest.approx(2 / 64)
    assert result["interaction_significant"] is True and result["read_by"].startswith("the simple effects")
    # The same cells with b's effect unchanged by a: no interaction, and the slopes are the reading.
    additive = {**cells, (2.0, 2.0): [o + 11 + e for o, e in zip(offsets, noise)]}
    result = simple_effects(_two_by_two(additive, "m"), ["a", "b"], "m")
    assert result["interactions"][0]["mean"] == pytest.approx(0.0, abs=1e-12) and result["interaction_significant"] is False


def test_the_summary_reads_an_interacting_grid_by_its_simple_effects_on_judge_and_margin(tmp_path):
    """With a significant interaction the headline carries simple effects for the judged score and
    the judge-free margin alike, and no main-effect cross-talk."""
    offsets = [40.0, 55.0, 30.0, 61.0, 47.0, 52.0]
    noise = [0.5, -0.5, 1.0, -1.0, 0.2, -0.2]
    interacting = {(0.0, 0.0): offsets, (2.0, 0.0): [o + 10 + e for o, e in zip(offsets, noise)],
                   (0.0, 2.0): [o + 1 + e for o, e in zip(offsets, noise)], (2.0, 2.0): [o + 4 - e for o, e in zip(offsets, noise)]}
    for trait in ("a", "b"):
        conditions = []
        for (ca, cb), values in interacting.items():
            condition = {"coefs": {"a": ca, "b": cb}}
            for metric, scale in ((trait, 1.0), ("coherence", 0.0), ("margin", 0.01)):
                by_question = {f"q{i}": v * scale + (0.0 if scale else 90.0 + i) for i, v in enumerate(values)}
                condition.update({f"{metric}_mean": float(np.mean(list(by_question.values()))), f"{metric}_sem": 1.0,
                                  f"{metric}_by_question": by_question})
            conditions.append(condition)
        write_json(tmp_path / f"eval_{trait}.summary.json", {"trait": trait, "conditions": conditions})
    assert run_script("scripts.composition", "summarize", "--traits", "a", "b", "--output_dir", tmp_path) == 0
    report = json.loads((tmp_path / "summary.json").read_text())
    for metric, scale in (("trait_score", 1.0), ("likelihood_margin", 0.01)):
        entry = report["headline"]["a"][metric]
        assert entry["read_by"].startswith("the simple effects") and entry["cross_talk"] is None
        effects = {(e["diff"], e["at"][next(iter(e["at"]))]): e["mean"] for e in entry["simple_effects"]}
        assert effects["a", 0.0] == pytest.approx(10 * scale) and effects["a", 2.0] == pytest.approx(3 * scale)
        assert effects["b", 0.0] == pytest.approx(1 * scale) and effects["b", 2.0] == pytest.approx(-6 * scale)
        assert entry["interactions"][0]["mean"] == pytest.approx(-7 * scale) and entry["interactions"][0]["p"] < 0.05
    coherence = report["headline"]["a"]["coherence"]  # identical under every combination: nothing interacts
    assert coherence["read_by"].startswith("the additive slopes") and coherence["cross_talk"] is not None
