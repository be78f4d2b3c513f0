"""Uncertainty for scores: bootstrap intervals, paired tests, multiple-test correction, rank correlation, kappa.

The paper reports 0-3 averages over 100 questions without uncertainty; these functions say how much of a
difference such averages can support. Resampling and tests come from scipy; only Cohen's kappa, which scipy
lacks, is written out (a few lines of numpy over the confusion matrix).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import polars as pl
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 9999
SIGNIFICANCE_LEVEL = 0.05
SCORE_LEVELS: tuple[int, ...] = (0, 1, 2, 3)


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    method: str


@dataclass(frozen=True)
class PairedTest:
    pairs: int
    mean_delta: float
    ci_low: float
    ci_high: float
    statistic: float
    p_value: float
    nonzero_pairs: int
    test: str
    # How the p-value was computed: "exact" (every one of the 2^k sign assignments of the k non-zero
    # differences), "monte carlo" (``sign_flips`` seeded random assignments, when 2^k exceeds the resamples)
    # or "none" (no pairs).
    p_method: str = "none"
    sign_flips: int = 0

    @property
    def significant(self) -> bool:
        return not math.isnan(self.p_value) and self.p_value < SIGNIFICANCE_LEVEL


@dataclass(frozen=True)
class Correlation:
    pairs: int
    rho: float
    p_value: float


@dataclass(frozen=True)
class Agreement:
    pairs: int
    exact_agreement: float
    kappa: float
    kappa_linear: float
    kappa_quadratic: float


def _as_array(values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"expected a flat sequence of numbers, got shape {array.shape}")
    if np.isnan(array).any():
        raise ValueError("values contain NaN/NULL: drop unparsed judgements before computing statistics")
    return array


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Bootstrap confidence interval of the mean (BCa; percentile when BCa is undefined).

    A sample whose values are all equal has a zero-width interval at that value: every resample has the
    same mean. No values gives NaN bounds.
    """
    array = _as_array(values)
    if array.size == 0:
        return Interval(math.nan, math.nan, "empty")
    if np.all(array == array[0]):
        return Interval(float(array[0]), float(array[0]), "degenerate")
    return _bootstrap_interval((array,), np.mean, confidence, resamples, seed)


def _bootstrap_interval(
    data: tuple[np.ndarray, ...],
    statistic: Any,
    confidence: float,
    resamples: int,
    seed: int,
    **options: Any,
) -> Interval:
    """scipy's bootstrap interval of ``statistic``: BCa, the percentile method where BCa is undefined."""
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            # BCa warns and returns NaN when the jackknife is degenerate; the percentile method then applies.
            warnings.simplefilter("ignore", category=stats.DegenerateDataWarning)
            result = stats.bootstrap(
                data,
                statistic,
                confidence_level=confidence,
                n_resamples=resamples,
                method=method,
                rng=np.random.default_rng(seed),
                **options,
            )
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        if not (math.isnan(low) or math.isnan(high)):
            return Interval(low, high, method)
    return Interval(math.nan, math.nan, "undefined")


def paired_difference_test(
    baseline: Sequence[float] | np.ndarray,
    candidate: Sequence[float] | np.ndarray,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> PairedTest:
    """Wilcoxon signed-rank test of candidate - baseline on paired questions, with a bootstrap CI.

    Zero differences (the same score in both formats) are dropped before ranking, as Wilcoxon defined it;
    when every pair is tied there is no evidence of a difference and the p-value is 1. The interval is a
    bootstrap of the mean paired difference (all pairs, ties included).
    """
    a, b = _as_array(baseline), _as_array(candidate)
    if a.size != b.size:
        raise ValueError(f"paired samples differ in length: {a.size} baseline vs {b.size} candidate scores")
    delta = b - a
    if delta.size == 0:
        return PairedTest(0, math.nan, math.nan, math.nan, math.nan, math.nan, 0, "none")
    interval = bootstrap_mean_ci(delta, confidence=confidence, resamples=resamples, seed=seed)
    nonzero = int(np.count_nonzero(delta))
    if nonzero == 0:
        return PairedTest(
            int(delta.size),
            0.0,
            interval.low,
            interval.high,
            0.0,
            1.0,
            0,
            "wilcoxon signed-rank (permutation)",
            p_method="exact",  # every assignment of no signs gives the same statistic
            sign_flips=1,
        )
    # Scores are 0-3, so differences are few distinct values with many ties: the normal approximation
    # scipy falls back to then is poor for small samples. The permutation distribution of the signed-rank
    # statistic is exact with ties (all 2^k sign flips when they fit in `resamples`, else a seeded sample).
    # A single non-zero pair has no permutation distribution to sample; its exact test (p = 1) is the same.
    method = (
        "exact"
        if nonzero == 1
        else stats.PermutationMethod(n_resamples=resamples, rng=np.random.default_rng(seed))
    )
    result = stats.wilcoxon(delta[delta != 0], alternative="two-sided", method=method)
    # scipy enumerates every sign assignment when there are no more of them than resamples, else samples.
    exact = 2**nonzero <= resamples or nonzero == 1
    return PairedTest(
        pairs=int(delta.size),
        mean_delta=float(delta.mean()),
        ci_low=interval.low,
        ci_high=interval.high,
        statistic=float(result.statistic),
        p_value=float(result.pvalue),
        nonzero_pairs=nonzero,
        test="wilcoxon signed-rank (permutation)",
        p_method="exact" if exact else "monte carlo",
        sign_flips=2**nonzero if exact else resamples,
    )


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> Correlation:
    """Spearman rank correlation; NaN when either side is constant or fewer than 3 pairs exist."""
    a, b = _as_array(x), _as_array(y)
    if a.size != b.size:
        raise ValueError(f"correlation needs paired values: {a.size} vs {b.size}")
    if a.size < 3 or np.all(a == a[0]) or np.all(b == b[0]):
        return Correlation(int(a.size), math.nan, math.nan)
    result = stats.spearmanr(a, b)
    return Correlation(int(a.size), float(result.statistic), float(result.pvalue))


def cohen_kappa(
    rater_a: Sequence[int] | np.ndarray,
    rater_b: Sequence[int] | np.ndarray,
    levels: Sequence[int] = SCORE_LEVELS,
    weights: Literal["linear", "quadratic"] | None = None,
) -> float:
    """Cohen's kappa between two raters over ordered levels, optionally weighted by level distance.

    kappa = 1 - sum(w * observed) / sum(w * expected), with w the disagreement weight (0 on the diagonal;
    |i-j| for linear, (i-j)^2 for quadratic, 1 off the diagonal when unweighted). NaN when the raters'
    marginals leave no room for disagreement (both always give the same single level).
    """
    a, b = np.asarray(rater_a), np.asarray(rater_b)
    if a.size != b.size:
        raise ValueError(f"kappa needs paired ratings: {a.size} vs {b.size}")
    if a.size == 0:
        return math.nan
    index = {level: position for position, level in enumerate(levels)}
    unknown = sorted({int(v) for v in np.concatenate([a, b]) if int(v) not in index})
    if unknown:
        raise ValueError(f"ratings {unknown} are outside the levels {list(levels)}")
    k = len(levels)
    observed = np.zeros((k, k))
    np.add.at(observed, ([index[int(v)] for v in a], [index[int(v)] for v in b]), 1.0)
    observed /= observed.sum()
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0))
    distance = np.abs(np.subtract.outer(np.arange(k), np.arange(k))).astype(float)
    if weights is None:
        weight = (distance > 0).astype(float)
    elif weights == "linear":
        weight = distance
    elif weights == "quadratic":
        weight = distance**2
    else:
        raise ValueError(f"weights must be None, 'linear' or 'quadratic', not {weights!r}")
    denominator = float((weight * expected).sum())
    if denominator == 0.0:
        return math.nan
    return 1.0 - float((weight * observed).sum()) / denominator


def agreement(
    rater_a: Sequence[int] | np.ndarray,
    rater_b: Sequence[int] | np.ndarray,
    levels: Sequence[int] = SCORE_LEVELS,
) -> Agreement:
    """Exact agreement and unweighted, linear and quadratic Cohen's kappa between two judges."""
    a, b = np.asarray(rater_a), np.asarray(rater_b)
    if a.size != b.size:
        raise ValueError(f"agreement needs paired ratings: {a.size} vs {b.size}")
    exact = float(np.mean(a == b)) if a.size else math.nan
    return Agreement(
        pairs=int(a.size),
        exact_agreement=exact,
        kappa=cohen_kappa(a, b, levels),
        kappa_linear=cohen_kappa(a, b, levels, "linear"),
        kappa_quadratic=cohen_kappa(a, b, levels, "quadratic"),
    )


def paired_ratio_difference_ci(
    sums_a: Sequence[float] | np.ndarray,
    counts_a: Sequence[float] | np.ndarray,
    sums_b: Sequence[float] | np.ndarray,
    counts_b: Sequence[float] | np.ndarray,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, Interval]:
    """``sum(sums_a)/sum(counts_a) - sum(sums_b)/sum(counts_b)`` and its paired bootstrap interval.

    The four arrays are aligned by item (one entry per question): each resample draws questions with
    replacement and keeps each question's four values together, so both ratios see the same questions.
    This is the interval of a difference of token-weighted mean NLLs between two models scored on the same
    questions (sums: per-question loss sums, counts: answer tokens). BCa, percentile when BCa is undefined.
    """
    arrays = [_as_array(values) for values in (sums_a, counts_a, sums_b, counts_b)]
    sizes = {array.size for array in arrays}
    if len(sizes) != 1:
        raise ValueError(f"paired arrays differ in length: {[array.size for array in arrays]}")
    if arrays[0].size == 0:
        return math.nan, Interval(math.nan, math.nan, "empty")
    if (arrays[1] <= 0).any() or (arrays[3] <= 0).any():
        raise ValueError("every paired item needs at least one counted token on both sides")

    def difference(
        la: np.ndarray, ca: np.ndarray, lb: np.ndarray, cb: np.ndarray, axis: int = -1
    ) -> np.ndarray:
        return la.sum(axis=axis) / ca.sum(axis=axis) - lb.sum(axis=axis) / cb.sum(axis=axis)

    point = float(difference(arrays[0], arrays[1], arrays[2], arrays[3]))
    if arrays[0].size == 1 or all(np.allclose(a, a[0]) for a in arrays):
        return point, Interval(point, point, "degenerate")
    interval = _bootstrap_interval(
        tuple(arrays), difference, confidence, resamples, seed, paired=True, vectorized=True
    )
    return point, interval


def holm_adjust(p_values: Sequence[float] | np.ndarray) -> list[float]:
    """Holm's step-down adjustment of p-values tested together (family-wise error rate); NaN stays NaN.

    Reject where the adjusted p-value is below the level: this controls the chance of any false rejection in
    the family at that level, under any dependence between the tests.
    """
    from statsmodels.stats.multitest import multipletests

    array = np.asarray(p_values, dtype=float)
    adjusted = np.full(array.shape, np.nan)
    present = ~np.isnan(array)
    if present.any():
        adjusted[present] = multipletests(array[present], method="holm")[1]
    return adjusted.tolist()


def with_holm(frame: pl.DataFrame, family: Sequence[str], p_column: str = "p_value") -> pl.DataFrame:
    """``frame`` with ``p_value_holm``, ``significant_holm`` and ``family_size`` added: Holm's adjustment over
    the rows that share the ``family`` columns (the tests read together), raw p-values left as they are."""
    if frame.is_empty():
        return frame.with_columns(
            pl.lit(None, pl.Float64).alias("p_value_holm"),
            pl.lit(None, pl.Boolean).alias("significant_holm"),
            pl.lit(None, pl.Int64).alias("family_size"),
        )
    parts = []
    for _, group in frame.with_row_index("_row").group_by(list(family), maintain_order=True):
        adjusted = holm_adjust(group.get_column(p_column).fill_null(math.nan).to_numpy())
        tested = int(group.get_column(p_column).fill_nan(None).drop_nulls().len())
        parts.append(
            group.with_columns(
                pl.Series("p_value_holm", adjusted, dtype=pl.Float64).fill_nan(None),
                pl.lit(tested, pl.Int64).alias("family_size"),
            )
        )
    return (
        pl.concat(parts)
        .sort("_row")
        .drop("_row")
        .with_columns(
            pl.when(pl.col("p_value_holm").is_null())
            .then(None)
            .otherwise(pl.col("p_value_holm") < SIGNIFICANCE_LEVEL)
            .alias("significant_holm")
        )
    )
