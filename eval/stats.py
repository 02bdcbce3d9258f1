"""Statistics that respect the design of the experiments.

Samples of one question are not independent (they share the question's difficulty and, across
conditions, its sampling seed), so errors are clustered by question: a condition's mean is the
mean of its per-question means, and its standard error the spread of those over questions.
Conditions measured on the same questions are compared pairwise (per-question differences),
so what every condition shares cancels. A difference of independent measurements carries both
errors. Small samples get permutation p-values, not the t approximation: a correlation's are exact
(every ordering enumerated) for n ≤ 8, a sign-flip test's for n ≤ 16 units; beyond, they come
from 100,000 seeded random orderings (patterns) counted with the observed one, so the smallest
such p is 1/100,001. A null is matched to its statistic (a maximum is compared with maxima).
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Hashable, Iterable, Sequence

from io_utils import PersonaLoRAError

EXACT_PERMUTATION_LIMIT = 8  # n! ≤ 40,320 orderings are enumerated; beyond, a seeded random sample
RANDOM_PERMUTATIONS = 100_000
EXACT_SIGN_FLIP_LIMIT = 16  # 2^16 = 65,536 sign patterns are enumerated; beyond, a seeded random sample


def finite(values: Iterable) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(v)]


def mean_and_sem(values: Iterable) -> tuple[float, float, int]:
    """Mean, standard error and count of independent values (None and NaN left out)."""
    values = finite(values)
    if not values:
        return float("nan"), float("nan"), 0
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan"), len(values)
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values)), len(values)


def cluster_means(values: Iterable, clusters: Iterable[Hashable]) -> dict[Hashable, float]:
    """The mean of each cluster's finite values (clusters with none are left out)."""
    grouped: dict[Hashable, list[float]] = {}
    for value, cluster in zip(values, clusters):
        if value is not None and not math.isnan(value):
            grouped.setdefault(cluster, []).append(float(value))
    return {cluster: sum(v) / len(v) for cluster, v in grouped.items()}


def clustered_mean_and_sem(values: Iterable, clusters: Iterable[Hashable]) -> tuple[float, float, int]:
    """Mean and standard error over clusters (questions): each cluster's mean counts once.
    Returns (mean, sem, number of clusters)."""
    return mean_and_sem(cluster_means(values, clusters).values())


def item_mean_clustered(values: list[float], clusters: list) -> tuple[float, float]:
    """The mean over items (each item weighs the same) with its cluster-robust error (the sandwich
    over clusters, with the small-sample factor G/(G−1)): clustered_mean_and_sem weighs a 29-item
    cluster as one item, this weighs it 29 times, and its error still counts a cluster's items as
    one unit. Returns (mean, sem)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    sums: dict = {}
    for value, cluster in zip(values, clusters):
        sums[cluster] = sums.get(cluster, 0.0) + value - mean
    g = len(sums)
    if g < 2:
        return mean, float("nan")
    return mean, math.sqrt(g / (g - 1) * sum(v * v for v in sums.values())) / n


def paired_difference(treated: dict[Hashable, float], control: dict[Hashable, float]) -> tuple[float, float, int]:
    """Mean and standard error of treated − control over the clusters both measured."""
    shared = [key for key in treated if key in control]
    return mean_and_sem(treated[key] - control[key] for key in shared)


def _sign_patterns(n: int, seed: int) -> tuple[list, str]:
    """Chunks of rows of ±1, one row per sign pattern of n paired units: all 2^n for n ≤
    EXACT_SIGN_FLIP_LIMIT, else the identity pattern and RANDOM_PERMUTATIONS seeded random ones
    (chunked, so a 500-item test never holds them all). Returns (chunk generator, method)."""
    import numpy as np

    chunk = max(1, 2 ** 22 // max(n, 1))  # about 32 MB of float64 per chunk

    def exact():
        for start in range(0, 2 ** n, chunk):
            codes = np.arange(start, min(start + chunk, 2 ** n))[:, None] >> np.arange(n)[None, :] & 1
            yield 1.0 - 2.0 * codes

    def sampled():
        rng = np.random.default_rng(seed)
        yield np.ones((1, n))
        for start in range(0, RANDOM_PERMUTATIONS, chunk):
            yield rng.choice([-1.0, 1.0], size=(min(chunk, RANDOM_PERMUTATIONS - start), n))

    if n <= EXACT_SIGN_FLIP_LIMIT:
        return exact(), f"exact sign-flip test over all {2 ** n} sign patterns"
    return sampled(), f"sign-flip test, {RANDOM_PERMUTATIONS} random sign patterns and the observed one (seed {seed})"


def sign_flip_test(differences: Sequence[float], weights: Sequence[float] | None = None, seed: int = 0) -> dict:
    """Two-sided p-value of a paired contrast: under the null that each unit's (question's, item's)
    difference is as likely negative as positive, every sign pattern is equally likely; p is the share
    of patterns whose |Σ wᵢ·±dᵢ| reaches the observed one (the observed pattern included, so never 0).
    Weights default to 1/n (the mean); a balanced mean passes its own weights. It is the one-contrast
    case of sign_flip_max_test (each unit's term scaled by n so that test's mean is this weighted sum)."""
    import numpy as np

    d = np.array([float(v) for v in differences])
    w = np.full(len(d), 1.0 / max(len(d), 1)) if weights is None else np.array([float(v) for v in weights])
    if len(d) != len(w) or len(d) < 1 or not np.isfinite(d).all():
        return {"statistic": float("nan"), "p": float("nan"), "n": len(d), "p_method": "undefined: no finite paired differences"}
    test = sign_flip_max_test((len(d) * w * d)[:, None], seed, minimum_units=1)
    return {"statistic": float(w @ d), "p": test["p"], "n": len(d), "p_method": test["p_method"].split(", maximum")[0]}


def sign_flip_max_test(per_unit: Sequence[Sequence[float]], seed: int = 0, minimum_units: int = 2) -> dict:
    """The largest |mean| over several contrasts measured on the same units (rows: units such as
    questions, columns: contrasts), against the maximum over the same contrasts under sign flips
    of whole units: a maximum compared with maxima, and each unit's contrasts flipped together
    keep their correlation. Also each contrast's mean and clustered standard error."""
    import numpy as np

    values = np.array(per_unit, dtype=float)
    if values.ndim != 2 or values.shape[0] < minimum_units or values.shape[1] < 1 or not np.isfinite(values).all():
        return {"max_abs_mean": float("nan"), "p": float("nan"), "units": int(values.shape[0]) if values.ndim else 0,
                "p_method": "undefined: needs at least 2 units with finite values"}
    n = values.shape[0]
    observed = float(np.abs(values.mean(axis=0)).max())
    chunks, method = _sign_patterns(n, seed)
    extreme = total = 0
    for patterns in chunks:
        extreme += int((np.abs(patterns @ values / n).max(axis=1) >= observed - 1e-12).sum())
        total += len(patterns)
    return {"max_abs_mean": observed, "p": extreme / total, "units": n,
            "means": values.mean(axis=0).tolist(), "sems": clustered_sems(values) if n > 1 else [float("nan")] * values.shape[1],
            "p_method": method + ", maximum over contrasts against maxima"}


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict:
    """Least squares y = slope·x + intercept, with R² (NaN where undefined)."""
    pairs = [(x, y) for x, y in zip(xs, ys) if y is not None and not math.isnan(y)]
    if len(pairs) < 2 or len({x for x, _ in pairs}) < 2:
        return {"slope": float("nan"), "intercept": float("nan"), "r2": float("nan"), "points": len(pairs)}
    n = len(pairs)
    mean_x, mean_y = sum(x for x, _ in pairs) / n, sum(y for _, y in pairs) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in pairs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in pairs)
    syy = sum((y - mean_y) ** 2 for _, y in pairs)
    slope = sxy / sxx
    r2 = (sxy * sxy) / (sxx * syy) if syy > 0 else float("nan")
    return {"slope": slope, "intercept": mean_y - slope * mean_x, "r2": r2, "points": n}


def paired_slope(coefficients: Sequence[float], by_cluster: Sequence[dict[Hashable, float]]) -> dict:
    """The slope of a measure against the coefficient, fit per cluster (question) over the
    conditions, then averaged over clusters: its error is the clusters' spread, so question
    difficulty, which every condition shares, cancels. `by_cluster[i]` holds condition i's
    per-cluster means."""
    slopes = finite(cluster_slopes(coefficients, by_cluster).values())
    mean, sem, n = mean_and_sem(slopes)
    test = sign_flip_test(slopes)
    return {"slope": mean, "slope_sem": sem, "clusters": n, "slope_sem_kind": "paired by question (per-question slopes)",
            "p": test["p"], "p_method": f"{test['p_method']} of the per-question slopes"}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values, in the given order: the i-th smallest of
    m is multiplied by m − i + 1 (i from 1), kept at least as large as the one before it, and capped
    at 1. Rejecting where the adjusted p ≤ α keeps the chance of any false rejection in the family
    ≤ α. NaN (an undefined test) stays NaN and is not counted in m."""
    order = sorted((i for i, p in enumerate(p_values) if not math.isnan(p)), key=lambda i: p_values[i])
    adjusted, running = [float("nan")] * len(p_values), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def cluster_slopes(coefficients: Sequence[float], by_cluster: Sequence[dict[Hashable, float]]) -> dict[Hashable, float]:
    """{cluster: its least-squares slope over the conditions}, for the clusters every condition measured."""
    shared = [key for key in by_cluster[0] if all(key in c for c in by_cluster)]
    return {key: linear_fit(coefficients, [c[key] for c in by_cluster])["slope"] for key in shared}


def _pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    sxx = sum((x - mean_x) ** 2 for x in xs)
    syy = sum((y - mean_y) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def ranks(values: Sequence[float]) -> list[float]:
    """Average ranks (ties share the mean of their ranks), as Spearman's ρ needs."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            result[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return result


def permutation_correlation(xs: Sequence[float], ys: Sequence[float], method: str = "pearson", seed: int = 0) -> dict:
    """Pearson r or Spearman ρ with a two-sided permutation p-value: the share of orderings of y
    whose |correlation| is at least the observed one. Exact (every ordering) for n ≤ 8, else
    100,000 seeded random orderings (p counted with the observed ordering, so never 0)."""
    if method not in ("pearson", "spearman"):
        raise ValueError(f"method {method!r} is not pearson or spearman")
    xs, ys = list(map(float, xs)), list(map(float, ys))
    if len(xs) != len(ys) or len(xs) < 3 or any(math.isnan(v) for v in xs + ys):
        return {"statistic": float("nan"), "p": float("nan"), "n": len(xs),
                "p_method": "undefined: a correlation needs at least 3 finite pairs"}
    if method == "spearman":
        xs, ys = ranks(xs), ranks(ys)
    observed = _pearson(xs, ys)
    n = len(xs)
    if math.isnan(observed):
        return {"statistic": observed, "p": float("nan"), "n": n, "p_method": "undefined (a constant variable)"}
    threshold = abs(observed) - 1e-12
    if n <= EXACT_PERMUTATION_LIMIT:
        orderings = list(itertools.permutations(ys))
        extreme = sum(abs(_pearson(xs, list(order))) >= threshold for order in orderings)
        return {"statistic": observed, "p": extreme / len(orderings), "n": n,
                "p_method": f"exact permutation test over all {len(orderings)} orderings"}
    rng = random.Random(seed)
    shuffled, extreme = list(ys), 1
    for _ in range(RANDOM_PERMUTATIONS):
        rng.shuffle(shuffled)
        extreme += abs(_pearson(xs, shuffled)) >= threshold
    return {"statistic": observed, "p": extreme / (RANDOM_PERMUTATIONS + 1), "n": n,
            "p_method": f"permutation test, {RANDOM_PERMUTATIONS} random orderings (seed {seed})"}


def correlations(xs: Sequence[float], ys: Sequence[float]) -> dict:
    """Pearson and Spearman with permutation p-values, in the form the reports use."""
    pearson, spearman = permutation_correlation(xs, ys, "pearson"), permutation_correlation(xs, ys, "spearman")
    return {"n": pearson["n"], "pearson_r": pearson["statistic"], "pearson_p": pearson["p"],
            "spearman_rho": spearman["statistic"], "spearman_p": spearman["p"], "p_method": pearson["p_method"]}


def partial_correlation(xs: Sequence[float], ys: Sequence[float], covariate: Sequence[float], seed: int = 0) -> dict:
    """The partial correlation of x and y given a covariate (Pearson r of their residuals after a
    least-squares line on the covariate each), with a two-sided permutation p by Freedman and Lane
    (1983): the residuals e_y of y on the covariate are permuted, residualised on the covariate
    again, and correlated with e_x.

    Why residuals and not y: in Exp 2's mixture series the mixing fraction drives both the
    behaviour and the projection, so permuting y itself would break the behaviour–fraction link
    too and test the wrong null (no relation at all), rejecting whenever the fraction works. Under
    the null that behaviour depends on the fraction alone, y's residuals on the fraction are
    (approximately) exchangeable, and permuting them keeps the fraction's part intact. Permuting
    within levels of the fraction would be exact, but a series with one finetune per level has no
    such permutation but the identity. Every ordering for n ≤ 8 (exhaustive, but the test stays
    approximate), else 100,000 seeded ones (the observed ordering counted, so p ≥ 1/100,001)."""
    import numpy as np

    x, y, z = (np.asarray(list(map(float, v)), dtype=np.float64) for v in (xs, ys, covariate))
    n = len(x)
    if not len(y) == len(z) == n or n < 4 or not np.isfinite(np.concatenate([x, y, z])).all():
        return {"statistic": float("nan"), "p": float("nan"), "n": n,
                "p_method": "undefined: a partial correlation needs at least 4 finite triples"}
    design = np.column_stack([np.ones(n), z])
    residualise = np.eye(n) - design @ np.linalg.pinv(design)  # R = I − H, symmetric
    ex, ey = residualise @ x, residualise @ y
    if ex @ ex <= 1e-24 or ey @ ey <= 1e-24:
        return {"statistic": float("nan"), "p": float("nan"), "n": n, "p_method": "undefined (x or y is a line in the covariate)"}
    observed = float(ex @ ey / math.sqrt((ex @ ex) * (ey @ ey)))

    def statistics(orderings: "np.ndarray") -> "np.ndarray":
        permuted = ey[orderings] @ residualise  # each row: R·P·e_y
        return permuted @ ex / np.sqrt((permuted * permuted).sum(1) * (ex @ ex)).clip(1e-300)

    threshold = abs(observed) - 1e-12
    if n <= EXACT_PERMUTATION_LIMIT:
        orderings = np.array(list(itertools.permutations(range(n))))
        extreme = int((np.abs(statistics(orderings)) >= threshold).sum())
        return {"statistic": observed, "p": extreme / len(orderings), "n": n,
                "p_method": f"Freedman-Lane permutation of the residuals on the covariate, all {len(orderings)} orderings "
                          "(exhaustive; the test is approximate, the residuals being only nearly exchangeable)"}
    rng, extreme = np.random.default_rng(seed), 1
    for start in range(0, RANDOM_PERMUTATIONS, 10_000):
        orderings = np.argsort(rng.random((min(10_000, RANDOM_PERMUTATIONS - start), n)), axis=1)
        extreme += int((np.abs(statistics(orderings)) >= threshold).sum())
    return {"statistic": observed, "p": extreme / (RANDOM_PERMUTATIONS + 1), "n": n,
            "p_method": f"Freedman-Lane permutation of the residuals on the covariate, {RANDOM_PERMUTATIONS} random orderings (seed {seed})"}


def additive_fit(points: list[dict], names: list[str], metric: str) -> dict:
    """Least squares metric_mean = β₀ + Σ βⱼ·coef_j over the combinations, with each β's standard
    error propagated from the combinations' own standard errors (independent samples per
    combination; per_question_additive_fit gives the paired errors when the combinations share
    questions). In a two-level factorial the residual is exactly the interactions; with more
    levels it also holds each coefficient's own curvature."""
    import numpy as np

    design = np.array([[1.0] + [p["coefs"][n] for n in names] for p in points])
    y = np.array([p[f"{metric}_mean"] for p in points])
    sem = np.array([p[f"{metric}_sem"] for p in points])
    if np.linalg.matrix_rank(design) < design.shape[1]:
        raise PersonaLoRAError(f"the combinations do not separate the {len(names)} coefficients: "
                               "evaluate a grid where each diff's coefficient varies on its own (composition.py grid)")
    pseudo_inverse = np.linalg.pinv(design)
    beta = pseudo_inverse @ y
    covariance = pseudo_inverse @ np.diag(sem ** 2) @ pseudo_inverse.T
    residual = y - design @ beta
    total = ((y - y.mean()) ** 2).sum()
    return {"intercept": float(beta[0]),
            "slope": {n: float(b) for n, b in zip(names, beta[1:])},
            "slope_sem": {n: float(s) for n, s in zip(names, np.sqrt(np.diag(covariance))[1:])},
            "additive_r2": float(1 - (residual ** 2).sum() / total) if total > 0 else float("nan"),
            "slope_sem_kind": "propagated from each combination's standard error (independent samples)"}


def per_question_additive_fit(points: list[dict], names: list[str], by_cluster: str) -> dict:
    """The additive model fit question by question when every combination measured the same
    clusters (questions): each question's slopes (rows: questions, columns: names) and its residuals
    (rows: questions, columns: combinations). Their spread over questions gives paired errors, in
    which what every combination shares (a question's difficulty) cancels."""
    import numpy as np

    clusters = sorted(set.intersection(*(set(p[by_cluster]) for p in points)))
    design = np.array([[1.0] + [p["coefs"][n] for n in names] for p in points])
    values = np.array([[p[by_cluster][q] for q in clusters] for p in points])  # combinations × questions
    beta = np.linalg.pinv(design) @ values
    return {"clusters": clusters, "slopes": beta[1:].T, "residuals": (values - design @ beta).T}


def clustered_sems(per_cluster) -> list[float]:
    """Each column's standard error over the rows (clusters)."""
    import numpy as np

    per_cluster = np.asarray(per_cluster, dtype=float)
    return (per_cluster.std(axis=0, ddof=1) / np.sqrt(per_cluster.shape[0])).tolist()


def ratio_interval(numerators: Sequence[float], denominators: Sequence[float], confidence: float = 0.95) -> dict:
    """Σ numerators / Σ denominators over independent units (each question's sums), with Fieller's
    interval: the ratios R whose residuals numeratorᵢ − R·denominatorᵢ have a mean that a t-test with
    n − 1 degrees of freedom does not reject. Unlike a percentile bootstrap over a dozen units it
    does not take the sample's spread for the population's; it is unbounded (±inf) when the
    denominators' mean is not itself distinguishable from 0. `sem` is the delta-method error."""
    from scipy.stats import t as student_t

    pairs = [(float(a), float(b)) for a, b in zip(numerators, denominators) if math.isfinite(a) and math.isfinite(b)]
    n = len(pairs)
    total = sum(b for _, b in pairs)
    if n < 2 or total <= 0:
        return {"ratio": float("nan"), "sem": float("nan"), "ci": [float("nan"), float("nan")], "units": n,
                "method": "undefined: needs at least 2 units and a positive denominator"}
    ratio = sum(a for a, _ in pairs) / total
    mean_a, mean_b = sum(a for a, _ in pairs) / n, total / n
    var_a = sum((a - mean_a) ** 2 for a, _ in pairs) / (n - 1)
    var_b = sum((b - mean_b) ** 2 for _, b in pairs) / (n - 1)
    cov = sum((a - mean_a) * (b - mean_b) for a, b in pairs) / (n - 1)
    sem = math.sqrt(max(var_a - 2 * ratio * cov + ratio ** 2 * var_b, 0.0) / n) / mean_b
    q = float(student_t.ppf(0.5 + confidence / 2, n - 1)) ** 2 / n
    # (mean_a − R·mean_b)² ≤ q·(var_a − 2R·cov + R²·var_b), a quadratic in R: a·R² + b·R + c ≤ 0.
    a, b, c = mean_b ** 2 - q * var_b, -2 * (mean_a * mean_b - q * cov), mean_a ** 2 - q * var_a
    discriminant = b * b - 4 * a * c
    if a > 0 and discriminant >= 0:
        ci = sorted([(-b - math.sqrt(discriminant)) / (2 * a), (-b + math.sqrt(discriminant)) / (2 * a)])
    else:
        ci = [-math.inf, math.inf]
    return {"ratio": ratio, "sem": sem, "ci": ci, "units": n,
            "method": f"Fieller's {confidence:.0%} interval over {n} units (t, {n - 1} df)"}


def mean_covariance(a: dict[Hashable, float], b: dict[Hashable, float]) -> float:
    """Cov(ā, b̄) of two means over units: ā over a's units, b̄ over b's. Units both measured (the
    same question, the same item) carry the covariance; estimates on disjoint units are independent
    (0). With the same units it is the sample covariance / n, so a = b gives the squared s.e."""
    shared = [key for key in a if key in b]
    if len(shared) < 2:
        return 0.0
    mean_a, mean_b = sum(a[k] for k in shared) / len(shared), sum(b[k] for k in shared) / len(shared)
    covariance = sum((a[k] - mean_a) * (b[k] - mean_b) for k in shared) / (len(shared) - 1)
    return covariance * len(shared) / (len(a) * len(b))


def calibrated_contrast(numerators: dict[str, dict[Hashable, float]], denominators: dict[str, dict[Hashable, float]],
                        same_units: bool, confidence: float = 0.95) -> dict:
    """Two methods compared in calibrated units: each method's effect on one measure per unit of its
    effect on another (numerator mean / denominator mean, e.g. the A/B slope per nat of margin
    slope: what a method buys at an equal change of the calibrating measure), and their difference.
    `numerators` and `denominators` map each of the two methods to per-unit values (per-item or
    per-question slopes); the methods share units, so their estimates are paired. same_units: the
    numerators and denominators are measured on the same units (judged and margin slopes per
    question), so they are paired too; otherwise (A/B items against margin questions) they are
    independent whatever their keys. Errors by the delta method over the four means' covariance;
    each ratio also gets Fieller's interval, unbounded when its denominator is not distinguishable
    from 0, and then the difference is left undefined (p NaN) rather than read off a linearisation
    that does not hold. Quantiles and p from Student's t with (fewest units − 1) degrees of freedom,
    as ratio_interval's (a normal one rejects too often with ~20 questions)."""
    from scipy.stats import t as student_t

    methods = list(numerators)
    if len(methods) != 2 or set(methods) != set(denominators):
        raise PersonaLoRAError(f"calibrated_contrast compares two methods with a numerator and a denominator each, got {methods}")
    series = [numerators[m] for m in methods] + [denominators[m] for m in methods]
    series = [{k: float(v) for k, v in s.items() if v is not None and math.isfinite(v)} for s in series]
    means = [sum(s.values()) / len(s) if s else float("nan") for s in series]
    cov = [[mean_covariance(x, y) if same_units or (i < 2) == (j < 2) else 0.0 for j, y in enumerate(series)]
           for i, x in enumerate(series)]
    dof = max(min(len(x) for x in series) - 1, 1)
    z = float(student_t.ppf(0.5 + confidence / 2, dof))
    result, bounded = {}, True
    for i, method in enumerate(methods):
        a, m = means[i], means[2 + i]
        v_aa, v_am, v_mm = cov[i][i], cov[i][2 + i], cov[2 + i][2 + i]
        ratio = a / m if m else float("nan")
        sem = math.sqrt(max(v_aa - 2 * ratio * v_am + ratio ** 2 * v_mm, 0.0)) / abs(m) if m else float("nan")
        # (a − R·m)² ≤ z²·(v_aa − 2R·v_am + R²·v_mm), a quadratic in R.
        qa, qb, qc = m * m - z * z * v_mm, -2 * (a * m - z * z * v_am), a * a - z * z * v_aa
        discriminant = qb * qb - 4 * qa * qc
        if qa > 0 and discriminant >= 0:
            ci = sorted([(-qb - math.sqrt(discriminant)) / (2 * qa), (-qb + math.sqrt(discriminant)) / (2 * qa)])
        else:
            ci, bounded = [-math.inf, math.inf], False
        result[method] = {"ratio": ratio, "sem": sem, "ci": ci, "numerator": a, "denominator": m,
                          "units": [len(series[i]), len(series[2 + i])]}
    first, second = (result[m]["ratio"] for m in methods)
    difference = first - second
    if means[2] and means[3]:
        gradient = [1 / means[2], -1 / means[3], -first / means[2], second / means[3]]
        sem = math.sqrt(max(sum(gradient[i] * cov[i][j] * gradient[j] for i in range(4) for j in range(4)), 0.0))
    else:  # a denominator of exactly 0: no ratio, no linearisation (Fieller already marked it unbounded)
        sem = float("nan")
    p = float(2 * student_t.sf(abs(difference) / sem, dof)) if bounded and sem > 0 else float("nan")
    result["difference"] = {"contrast": f"{methods[0]} − {methods[1]}", "mean": difference, "sem": sem, "p": p,
                            "p_method": (f"delta method, two-sided t with {dof} df" if bounded else
                                         "undefined: a denominator is not distinguishable from 0 (Fieller interval unbounded)")}
    result["method"] = (f"ratio of means with delta-method errors over the paired units; Fieller's {confidence:.0%} interval "
                        f"per ratio (t, {dof} df)")
    return result
