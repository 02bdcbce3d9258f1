"""eval/stats.py on synthetic data whose answers are known: errors clustered by question, paired
differences and slopes, errors in quadrature, exact and permutation p-values for few points.
(additive_fit and per_question_additive_fit are tested in test_composition.py.)"""

import itertools
import math
import random

import numpy as np
import pytest
from scipy import stats as scipy_stats

from eval import stats
from eval.stats import (
    clustered_mean_and_sem,
    correlations,
    mean_and_sem,
    paired_difference,
    paired_slope,
    permutation_correlation,
    ranks,
)


def sem_of(values) -> float:
    values = np.asarray(values, dtype=float)
    return float(values.std(ddof=1) / math.sqrt(len(values)))


def offsets_and_samples(questions=12, samples=5, offset_scale=10.0, noise=0.5, seed=0):
    """k samples per question around a large per-question offset (the question's difficulty)."""
    rng = np.random.default_rng(seed)
    offsets = rng.normal(0, offset_scale, questions)
    values, clusters = [], []
    for q in range(questions):
        for _ in range(samples):
            values.append(float(offsets[q] + rng.normal(0, noise)))
            clusters.append(f"q{q}")
    return offsets, values, clusters


# ------------------------------------------------------------------------------------------------
# Clustered errors
# ------------------------------------------------------------------------------------------------


def test_mean_and_sem_of_independent_values():
    mean, sem, n = mean_and_sem([1.0, 2.0, 3.0, 4.0, None, float("nan")])
    assert (mean, n) == (2.5, 4) and sem == pytest.approx(math.sqrt(5 / 3 / 4))
    mean, sem, n = mean_and_sem([7.0])
    assert mean == 7.0 and math.isnan(sem) and n == 1
    mean, sem, n = mean_and_sem([])
    assert math.isnan(mean) and math.isnan(sem) and n == 0


def test_clustered_sem_is_the_sem_of_question_means_and_exceeds_the_naive_one():
    _, values, clusters = offsets_and_samples()
    question_means = [np.mean([v for v, c in zip(values, clusters) if c == q]) for q in dict.fromkeys(clusters)]
    mean, sem, n = clustered_mean_and_sem(values, clusters)
    assert n == 12
    assert mean == pytest.approx(np.mean(question_means), abs=1e-12)
    assert sem == pytest.approx(sem_of(question_means), rel=1e-12)
    _, naive_sem, naive_n = mean_and_sem(values)
    assert naive_n == 60 and naive_sem == pytest.approx(sem_of(values), rel=1e-12)
    # Five samples of one question are nearly one observation: the naive error is about √5 too small.
    assert sem > 2 * naive_sem


def test_clusters_with_unequal_counts_weigh_once():
    values = [0.0] + [10.0] * 9 + [4.0, 6.0]
    clusters = ["a"] + ["b"] * 9 + ["c", "c"]
    mean, sem, n = clustered_mean_and_sem(values, clusters)
    assert n == 3
    assert mean == pytest.approx(5.0)  # (0 + 10 + 5) / 3, not the sample mean 7.9
    assert sem == pytest.approx(sem_of([0.0, 10.0, 5.0]))
    # A cluster whose values are all missing is left out; missing values inside a cluster too.
    mean, sem, n = clustered_mean_and_sem([1.0, None, float("nan"), 3.0, float("nan")], ["a", "a", "a", "b", "z"])
    assert n == 2 and mean == pytest.approx(2.0) and sem == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------
# Differences
# ------------------------------------------------------------------------------------------------


def test_paired_difference_cancels_shared_offsets():
    rng = np.random.default_rng(1)
    offsets = rng.normal(0, 10, 15)
    control = {f"q{i}": float(o) for i, o in enumerate(offsets)}
    effects = 0.3 + rng.normal(0, 0.05, 15)
    treated = {f"q{i}": float(o + e) for i, (o, e) in enumerate(zip(offsets, effects))}
    mean, sem, n = paired_difference(treated, control)
    assert n == 15
    assert mean == pytest.approx(float(np.mean(effects)), abs=1e-12)
    assert sem == pytest.approx(sem_of(effects), rel=1e-9)
    unpaired_sem = math.hypot(mean_and_sem(treated.values())[1], mean_and_sem(control.values())[1])  # as if independent
    assert sem < unpaired_sem / 20


def test_paired_difference_counts_only_shared_clusters():
    control = {"a": 1.0, "b": 2.0, "c": 3.0, "only_control": -100.0}
    treated = {"a": 1.5, "b": 2.0, "c": 4.0, "only_treated": 500.0}
    mean, sem, n = paired_difference(treated, control)
    assert n == 3
    assert mean == pytest.approx(0.5)
    assert sem == pytest.approx(sem_of([0.5, 0.0, 1.0]))


# ------------------------------------------------------------------------------------------------
# Slopes
# ------------------------------------------------------------------------------------------------


def test_paired_slope_averages_per_question_slopes():
    coefficients = [-2.0, -1.0, 0.0, 2.0]
    slopes = {"q0": 0.10, "q1": 0.30, "q2": 0.20, "q3": 0.00, "q4": 0.15}
    intercepts = {"q0": 1.0, "q1": -3.0, "q2": 40.0, "q3": 7.0, "q4": -12.0}
    by_cluster = [{q: intercepts[q] + slopes[q] * c for q in slopes} for c in coefficients]
    result = paired_slope(coefficients, by_cluster)
    assert result["clusters"] == 5
    assert result["slope"] == pytest.approx(np.mean(list(slopes.values())), abs=1e-12)
    assert result["slope_sem"] == pytest.approx(sem_of(list(slopes.values())), rel=1e-9)
    # Offsets every condition shares cancel: the same slopes without them give the same answer.
    flat = paired_slope(coefficients, [{q: slopes[q] * c for q in slopes} for c in coefficients])
    assert flat["slope"] == pytest.approx(result["slope"], abs=1e-12)
    assert flat["slope_sem"] == pytest.approx(result["slope_sem"], rel=1e-9)
    # A question missing from one condition is left out of every condition.
    by_cluster[1] = {q: v for q, v in by_cluster[1].items() if q != "q2"}
    without = paired_slope(coefficients, by_cluster)
    rest = [slopes[q] for q in slopes if q != "q2"]
    assert without["clusters"] == 4 and without["slope"] == pytest.approx(np.mean(rest))
    assert without["slope_sem"] == pytest.approx(sem_of(rest), rel=1e-9)


def test_paired_slope_error_is_far_below_the_unpaired_one():
    rng = np.random.default_rng(2)
    coefficients = [-1.0, 0.0, 1.0]
    offsets, per_question_slope = rng.normal(0, 5, 20), 0.2 + rng.normal(0, 0.01, 20)
    by_cluster = [{i: float(o + s * c) for i, (o, s) in enumerate(zip(offsets, per_question_slope))} for c in coefficients]
    result = paired_slope(coefficients, by_cluster)
    assert result["slope"] == pytest.approx(float(per_question_slope.mean()), abs=1e-12)
    # The unpaired slope error: (mean at +1 − mean at −1)/2 with independent errors.
    unpaired = math.hypot(mean_and_sem(by_cluster[2].values())[1], mean_and_sem(by_cluster[0].values())[1])
    assert result["slope_sem"] < unpaired / 2 / 50


# ------------------------------------------------------------------------------------------------
# Correlations over few points
# ------------------------------------------------------------------------------------------------


def test_ranks_average_ties():
    assert ranks([10, 20, 20, 30]) == [1.0, 2.5, 2.5, 4.0]
    assert ranks([3, 1, 3, 3, 0]) == [4.0, 2.0, 4.0, 4.0, 1.0]


@pytest.mark.parametrize("y, rho, exact_p, t_p", [
    ([2, 1, 3, 5, 4], 0.8, 0.133, 0.104),
    ([1, 2, 3, 5, 6, 7, 4], 0.786, 0.048, 0.036),
])
def test_spearman_exact_p_values_of_the_issue(y, rho, exact_p, t_p):
    x = list(range(1, len(y) + 1))
    result = permutation_correlation(x, y, "spearman")
    assert result["n"] == len(y) and "exact" in result["p_method"]
    assert round(result["statistic"], 3) == rho
    assert round(result["p"], 3) == exact_p
    # The t approximation (scipy's default) is what the issue replaced: it is too small here.
    reference = scipy_stats.spearmanr(x, y)
    assert reference.statistic == pytest.approx(result["statistic"])
    assert round(reference.pvalue, 3) == t_p
    # Reversing y flips the sign; the two-sided p stays.
    reverse = permutation_correlation(x, [-v for v in y], "spearman")
    assert reverse["statistic"] == pytest.approx(-result["statistic"]) and reverse["p"] == pytest.approx(result["p"])
    assert correlations(x, y)["spearman_p"] == pytest.approx(result["p"])


def brute_force_pearson_p(xs, ys):
    """Two-sided exact permutation p of Pearson's r, by enumerating every ordering with numpy."""
    x = np.asarray(xs, dtype=float)
    orderings = np.array(list(itertools.permutations(ys)), dtype=float)
    xc = x - x.mean()
    yc = orderings - orderings.mean(axis=1, keepdims=True)
    r = (yc @ xc) / np.sqrt((xc ** 2).sum() * (yc ** 2).sum(axis=1))
    observed = np.corrcoef(x, ys)[0, 1]
    return float(np.mean(np.abs(r) >= abs(observed) - 1e-12)), float(observed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pearson_exact_p_matches_brute_force(seed):
    rng = random.Random(seed)
    xs = [rng.uniform(0, 1) for _ in range(6)]
    ys = [x + rng.gauss(0, 0.4) for x in xs]
    expected_p, expected_r = brute_force_pearson_p(xs, ys)
    result = permutation_correlation(xs, ys, "pearson")
    assert result["statistic"] == pytest.approx(expected_r, abs=1e-12)
    assert result["p"] == pytest.approx(expected_p, abs=1e-12)
    assert result["p_method"] == "exact permutation test over all 720 orderings"
    both = correlations(xs, ys)
    assert both["n"] == 6 and both["pearson_r"] == pytest.approx(expected_r) and both["pearson_p"] == pytest.approx(expected_p)


def test_exact_enumeration_up_to_the_limit_then_random_permutations():
    assert stats.EXACT_PERMUTATION_LIMIT == 8
    xs = list(range(8))
    ys = [0, 2, 1, 3, 5, 4, 7, 6]
    exact = permutation_correlation(xs, ys, "spearman")
    assert exact["p_method"] == "exact permutation test over all 40320 orderings"
    assert exact["p"] == pytest.approx(brute_force_pearson_p(ranks(xs), ranks(ys))[0], abs=1e-12)


def test_random_permutation_p_for_n_above_8_is_seeded_and_close_to_exact():
    rng = random.Random(5)
    xs = [rng.uniform(0, 1) for _ in range(9)]
    ys = [x + rng.gauss(0, 0.6) for x in xs]
    exact_p, _ = brute_force_pearson_p(xs, ys)  # all 362,880 orderings
    assert 0.01 < exact_p < 0.5  # a p-value where Monte-Carlo error is visible
    first = permutation_correlation(xs, ys, "pearson", seed=0)
    assert "random orderings (seed 0)" in first["p_method"] and "exact" not in first["p_method"]
    mc_error = math.sqrt(exact_p * (1 - exact_p) / stats.RANDOM_PERMUTATIONS)
    assert abs(first["p"] - exact_p) < 5 * mc_error
    again = permutation_correlation(xs, ys, "pearson", seed=0)
    assert again == first  # deterministic for a fixed seed
    other = permutation_correlation(xs, ys, "pearson", seed=1)
    assert other["p"] != first["p"] and abs(other["p"] - exact_p) < 5 * mc_error


def test_random_permutation_p_is_never_zero():
    xs = list(range(10))
    result = permutation_correlation(xs, xs, "spearman", seed=3)
    assert result["statistic"] == pytest.approx(1.0)
    # The observed ordering counts: p ≥ 1/(permutations + 1), although the exact p is 2/10!.
    assert result["p"] >= 1 / (stats.RANDOM_PERMUTATIONS + 1)
    assert result["p"] < 1e-4


def test_spearman_with_ties_matches_scipy():
    xs = [1, 2, 2, 3, 4, 4, 4, 5]
    ys = [2.0, 1.0, 3.0, 3.0, 5.0, 4.0, 6.0, 6.0]
    result = permutation_correlation(xs, ys, "spearman")
    assert result["statistic"] == pytest.approx(scipy_stats.spearmanr(xs, ys).statistic, abs=1e-12)
    assert result["p"] == pytest.approx(brute_force_pearson_p(ranks(xs), ranks(ys))[0], abs=1e-12)


def test_constant_variable_has_no_correlation():
    result = permutation_correlation([1, 2, 3, 4], [5, 5, 5, 5])
    assert math.isnan(result["statistic"]) and math.isnan(result["p"])
    with pytest.raises(ValueError):
        permutation_correlation([1, 2, 3], [1, 2, 3], "kendall")


# --- sign-flip tests of paired contrasts ------------------------------------------------------------


def brute_force_sign_flip(differences, weights):
    observed = abs(sum(w * d for w, d in zip(weights, differences)))
    patterns = list(itertools.product([-1, 1], repeat=len(differences)))
    hits = sum(abs(sum(s * w * d for s, w, d in zip(signs, weights, differences))) >= observed - 1e-12 for signs in patterns)
    return hits / len(patterns)


@pytest.mark.parametrize("seed", range(4))
def test_sign_flip_p_matches_brute_force_enumeration(seed):
    rng = random.Random(seed)
    differences = [rng.gauss(0.4, 1.0) for _ in range(9)]
    weights = [rng.choice([1 / 8, 1 / 10]) for _ in differences]  # a balanced mean's unequal weights
    plain = stats.sign_flip_test(differences)
    assert plain["statistic"] == pytest.approx(sum(differences) / 9)
    assert plain["p"] == pytest.approx(brute_force_sign_flip(differences, [1 / 9] * 9)) and "exact" in plain["p_method"]
    assert stats.sign_flip_test(differences, weights)["p"] == pytest.approx(brute_force_sign_flip(differences, weights))


def test_sign_flip_p_of_a_consistent_shift_and_of_noise():
    assert stats.sign_flip_test([1.0] * 10)["p"] == pytest.approx(2 / 2 ** 10)  # only the observed pattern and its mirror
    assert stats.sign_flip_test([0.0] * 5)["p"] == 1.0  # no difference at all: every pattern reaches it
    rng = np.random.default_rng(1)
    null_ps = [stats.sign_flip_test(rng.normal(0, 1, 12))["p"] for _ in range(200)]
    assert 0.02 < np.mean(np.array(null_ps) < 0.05) < 0.10  # calibrated under the null


def test_sign_flip_beyond_the_exact_limit_is_seeded_and_close_to_exact():
    rng = np.random.default_rng(2)
    differences = rng.normal(0.25, 1.0, stats.EXACT_SIGN_FLIP_LIMIT + 1)
    first, again = stats.sign_flip_test(differences, seed=3), stats.sign_flip_test(differences, seed=3)
    assert first == again and "random" in first["p_method"]
    assert first["p"] == pytest.approx(brute_force_sign_flip(differences, [1 / len(differences)] * len(differences)), abs=0.01)
    many = stats.sign_flip_test(rng.integers(-1, 2, 500))  # an MMLU-sized paired 0/1 contrast stays cheap
    assert 0 < many["p"] <= 1 and many["n"] == 500


def test_sign_flip_max_compares_a_maximum_with_maxima():
    rng = np.random.default_rng(4)
    values = rng.normal(0, 1, (8, 3))
    test = stats.sign_flip_max_test(values)
    observed = np.abs(values.mean(axis=0)).max()
    hits = sum(np.abs((np.array(signs)[:, None] * values).mean(axis=0)).max() >= observed - 1e-12
               for signs in itertools.product([-1, 1], repeat=8))
    assert test["max_abs_mean"] == pytest.approx(observed) and test["p"] == pytest.approx(hits / 2 ** 8)
    # The maximum of three contrasts needs a larger mean than one contrast alone to reach the same p.
    single = stats.sign_flip_test(values[:, int(np.abs(values.mean(axis=0)).argmax())])
    assert test["p"] >= single["p"]
    shifted = values + np.array([0.0, 3.0, 0.0])  # one real contrast among three
    assert stats.sign_flip_max_test(shifted)["p"] == pytest.approx(2 / 2 ** 8)
    assert test["sems"] == pytest.approx(list(values.std(axis=0, ddof=1) / math.sqrt(8)))


def test_ratio_interval_ends_where_the_t_test_of_the_residuals_stops_rejecting():
    """Fieller's interval by its definition: at each end R, the residuals aᵢ − R·bᵢ have a t
    statistic of exactly the t quantile (n − 1 df); the ratio is Σa/Σb; no bound when the
    denominators' mean is indistinguishable from 0."""
    from scipy.stats import t as student_t

    from eval.stats import ratio_interval

    a, b = [1.0, 2.5, 0.7, 1.9, 1.1, 3.0], [2.0, 4.0, 2.5, 3.1, 2.2, 5.5]
    result = ratio_interval(a, b)
    assert result["ratio"] == pytest.approx(sum(a) / sum(b)) and result["units"] == 6
    low, high = result["ci"]
    assert low < result["ratio"] < high
    for end in (low, high):
        residuals = [x - end * y for x, y in zip(a, b)]
        mean, sem, _ = mean_and_sem(residuals)
        assert abs(mean) / sem == pytest.approx(student_t.ppf(0.975, 5), rel=1e-9)
    assert ratio_interval([1.0, -1.0, 2.0], [1.0, -1.2, 0.3])["ci"] == [-math.inf, math.inf]


def test_ratio_interval_covers_at_its_nominal_rate_with_a_dozen_units():
    """The distillation's fraction reproduced is 1 − Σ distilled KL / Σ plain KL over 13 held-out
    questions. Simulated 4,000 times with 13 normal units and a known ratio of means, Fieller's 95 %
    interval covers it 0.95 ± 0.0035 (binomial s.e.; 0.947 here); a z quantile in place of t covers 0.92,
    the percentile bootstrap it replaced 0.91 (1,000 such draws), and the check fails on both."""
    import numpy as np

    from eval.stats import ratio_interval

    rng = np.random.default_rng(7)
    true_ratio, covered, trials = 0.04, 0, 4000
    for _ in range(trials):
        plain = rng.normal(10.0, 2.5, 13)  # each question's KL(steered ‖ plain) sum
        distilled = true_ratio * plain + rng.normal(0.0, 0.15, 13)  # what the student leaves, mean ratio 0.04
        low, high = ratio_interval(distilled, plain)["ci"]
        covered += low <= true_ratio <= high
    assert 0.94 <= covered / trials <= 0.96


def test_holm_adjusts_a_hand_computed_family():
    """p = (0.01, 0.04, 0.03, 0.005) sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06,
    0.04·1 = 0.04 → kept monotone 0.06; back in the given order; NaN is left out of m."""
    from eval.stats import holm

    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([0.2, float("nan"), 0.5, 0.9])
    assert adjusted[0] == pytest.approx(0.6) and math.isnan(adjusted[1]) and adjusted[2:] == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_a_slope_has_the_sign_flip_p_of_its_per_question_slopes():
    coefficients = [0.0, 1.0, 2.0]
    slopes = {"a": 0.5, "b": 0.4, "c": 0.7, "d": 0.45, "e": 0.6}
    result = paired_slope(coefficients, [{q: s * c for q, s in slopes.items()} for c in coefficients])
    assert result["p"] == pytest.approx(2 / 2 ** 5) and "exact sign-flip" in result["p_method"]  # all five positive


def test_calibrated_ratio_on_shared_units_has_the_paired_ratio_error():
    """A numerator and a denominator on the same questions: each method's ratio and its error are
    ratio_interval's (the paired delta method), and the difference of two methods carries both."""
    from eval.stats import calibrated_contrast, ratio_interval

    rng = np.random.default_rng(3)
    questions = [f"q{i}" for i in range(22)]
    margin_a, margin_b = rng.normal(0.2, 0.05, 22), rng.normal(0.1, 0.04, 22)
    judged_a, judged_b = 60 * margin_a + rng.normal(0, 2, 22), 90 * margin_b + rng.normal(0, 2, 22)
    result = calibrated_contrast({"lora": dict(zip(questions, judged_a)), "vector": dict(zip(questions, judged_b))},
                                 {"lora": dict(zip(questions, margin_a)), "vector": dict(zip(questions, margin_b))}, same_units=True)
    for method, (num, den) in {"lora": (judged_a, margin_a), "vector": (judged_b, margin_b)}.items():
        reference = ratio_interval(num, den)
        assert result[method]["ratio"] == pytest.approx(reference["ratio"])
        assert result[method]["sem"] == pytest.approx(reference["sem"])
        assert result[method]["ci"][0] < result[method]["ratio"] < result[method]["ci"][1]
    assert result["difference"]["mean"] == pytest.approx(result["lora"]["ratio"] - result["vector"]["ratio"])
    assert result["difference"]["sem"] > max(result["lora"]["sem"], result["vector"]["sem"])


def test_calibrated_contrast_error_matches_simulation_and_its_p_is_calibrated():
    """A/B slopes per item over margin slopes per question (different units, so independent; each
    paired across the two methods). Over simulated experiments the delta-method s.e. of the
    difference of ratios is the spread of the estimate, and under equal true ratios p < 0.05 about
    5 % of the time; the A/B keys and the question keys overlap on purpose and must not be paired."""
    from eval.stats import calibrated_contrast

    rng = np.random.default_rng(0)
    differences, sems, nulls = [], [], []
    for _ in range(400):
        shared_item = rng.normal(0, 0.004, 64)  # item difficulty both methods share
        shared_question = rng.normal(0, 0.05, 22)
        ab = {"lora": 0.005 + shared_item + rng.normal(0, 0.004, 64), "vector": 0.002 + shared_item + rng.normal(0, 0.002, 64)}
        margin = {"lora": 0.2 + shared_question + rng.normal(0, 0.03, 22), "vector": 0.1 + shared_question + rng.normal(0, 0.02, 22)}
        result = calibrated_contrast({m: dict(enumerate(v)) for m, v in ab.items()}, {m: dict(enumerate(v)) for m, v in margin.items()}, same_units=False)
        differences.append(result["difference"]["mean"])
        sems.append(result["difference"]["sem"])
        null_ab = {"lora": 0.004 + shared_item + rng.normal(0, 0.004, 64), "vector": 0.002 + shared_item + rng.normal(0, 0.002, 64)}
        nulls.append(calibrated_contrast({m: dict(enumerate(v)) for m, v in null_ab.items()},
                                         {m: dict(enumerate(v)) for m, v in margin.items()}, same_units=False)["difference"]["p"])
    assert np.mean(sems) == pytest.approx(np.std(differences, ddof=1), rel=0.15)
    assert 0.02 < np.mean(np.array(nulls) < 0.05) < 0.09
    assert np.mean(differences) == pytest.approx(0.005 / 0.2 - 0.002 / 0.1, abs=0.002)


def test_calibrated_contrast_with_weak_margins_is_not_anticonservative():
    """Where the margin slopes are barely shown (t ≈ 3 on 22 questions) the ratios are skewed: the
    difference is then often undefined, and where defined its p must not reject a true null more than
    its level says."""
    from eval.stats import calibrated_contrast

    rng = np.random.default_rng(5)
    rejections = defined = 0
    for _ in range(400):
        shared = rng.normal(0, 0.004, 64)
        ab = {"lora": 0.004 + shared + rng.normal(0, 0.004, 64), "vector": 0.002 + shared + rng.normal(0, 0.002, 64)}
        margin = {"lora": rng.normal(0.2, 0.2 * 22 ** 0.5 / 3, 22), "vector": rng.normal(0.1, 0.1 * 22 ** 0.5 / 3, 22)}
        p = calibrated_contrast({m: dict(enumerate(v)) for m, v in ab.items()}, {m: dict(enumerate(v)) for m, v in margin.items()},
                                same_units=False)["difference"]["p"]
        if p == p:
            defined += 1
            rejections += p < 0.05
    assert defined > 100 and rejections / defined < 0.07


def test_calibrated_contrast_is_undefined_where_a_denominator_is_not_shown():
    from eval.stats import calibrated_contrast

    rng = np.random.default_rng(1)
    flat = dict(enumerate(rng.normal(0.0, 0.05, 22)))
    result = calibrated_contrast({"lora": dict(enumerate(rng.normal(0.005, 0.004, 64))), "vector": dict(enumerate(rng.normal(0.002, 0.002, 64)))},
                                 {"lora": dict(enumerate(rng.normal(0.2, 0.03, 22))), "vector": flat}, same_units=False)
    assert result["vector"]["ci"] == [-math.inf, math.inf]
    assert math.isnan(result["difference"]["p"])
    assert math.isfinite(result["lora"]["ci"][0])
    # A margin that did not move at all (every slope exactly 0): undefined, not a division error.
    still = calibrated_contrast({"lora": {0: 0.01, 1: 0.02}, "vector": {0: 0.01, 1: 0.03}},
                                {"lora": {0: 0.1, 1: 0.2}, "vector": {0: 0.0, 1: 0.0}}, same_units=False)
    assert math.isnan(still["vector"]["ratio"]) and math.isnan(still["difference"]["p"])
