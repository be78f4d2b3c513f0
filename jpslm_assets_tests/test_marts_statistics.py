"""The statistics behind the marts, checked against values worked out independently of the code."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from jpslm_assets.common import statistics


def test_bootstrap_interval_brackets_the_mean_and_is_reproducible() -> None:
    scores = [3] * 84 + [2] * 15 + [0]  # the paper's Swallow F16 distribution
    first = statistics.bootstrap_mean_ci(scores, seed=1)
    again = statistics.bootstrap_mean_ci(scores, seed=1)
    assert first == again
    assert first.low < 2.82 < first.high
    # Standard error of the mean is about 0.045 here, so a 95% interval spans roughly +-0.09.
    assert 0.12 < first.high - first.low < 0.25
    assert first.method == "BCa"


def test_bootstrap_interval_narrows_with_more_questions() -> None:
    rng = np.random.default_rng(0)
    small = statistics.bootstrap_mean_ci(rng.integers(0, 4, 30), resamples=2000)
    large = statistics.bootstrap_mean_ci(rng.integers(0, 4, 600), resamples=2000)
    assert (large.high - large.low) < (small.high - small.low) / 3


def test_bootstrap_edge_cases() -> None:
    assert statistics.bootstrap_mean_ci([3, 3, 3]) == statistics.Interval(3.0, 3.0, "degenerate")
    empty = statistics.bootstrap_mean_ci([])
    assert math.isnan(empty.low) and math.isnan(empty.high)
    with pytest.raises(ValueError, match="NaN/NULL"):
        statistics.bootstrap_mean_ci([1.0, float("nan")])


def test_wilcoxon_matches_the_exact_sign_distribution() -> None:
    # Ten questions, each one point better: the exact two-sided p-value is 2 / 2**10.
    test = statistics.paired_difference_test([2] * 10, [3] * 10)
    assert test.p_value == pytest.approx(2 / 2**10)
    assert test.mean_delta == 1.0 and test.significant
    assert test.ci_low == test.ci_high == 1.0


def test_paired_test_with_all_ties_finds_nothing() -> None:
    test = statistics.paired_difference_test([3, 2, 1], [3, 2, 1])
    assert test.p_value == 1.0 and not test.significant and test.nonzero_pairs == 0


def test_paired_test_drops_zero_differences_like_wilcoxon() -> None:
    # 95 ties and 5 one-point gains: the test sees 5 pairs, two-sided exact p = 2 / 2**5 = 0.0625.
    baseline = [3] * 95 + [2] * 5
    candidate = [3] * 100
    test = statistics.paired_difference_test(baseline, candidate)
    assert test.pairs == 100 and test.nonzero_pairs == 5
    assert test.p_value == pytest.approx(0.0625, rel=0.05)
    assert not test.significant
    assert test.mean_delta == pytest.approx(0.05)


def test_paired_test_with_one_or_two_changed_answers() -> None:
    one = statistics.paired_difference_test([3, 2], [3, 3])
    assert one.nonzero_pairs == 1 and one.p_value == 1.0 and not one.significant
    two = statistics.paired_difference_test([1, 1], [2, 3])
    assert two.p_value == pytest.approx(0.5)  # 2 of 4 sign patterns are as extreme


def test_paired_test_says_whether_its_p_value_is_exact_or_monte_carlo() -> None:
    rng = np.random.default_rng(3)
    small_a, small_b = rng.integers(0, 4, 13), rng.integers(0, 4, 13)
    small_b[small_a == small_b] = (small_a[small_a == small_b] + 1) % 4  # 13 non-zero pairs: 8192 flips
    exact = statistics.paired_difference_test(small_a, small_b)
    assert exact.nonzero_pairs == 13 and exact.p_method == "exact" and exact.sign_flips == 2**13
    # Exact means the seed does not matter.
    assert statistics.paired_difference_test(small_a, small_b, seed=7).p_value == exact.p_value
    large_a, large_b = np.tile(small_a, 2), np.tile(small_b, 2)  # 26 pairs: 2^26 > 9999, sampled
    sampled = statistics.paired_difference_test(large_a, large_b)
    assert sampled.p_method == "monte carlo" and sampled.sign_flips == statistics.RESAMPLES
    assert statistics.paired_difference_test(large_a, large_b, seed=0).p_value == sampled.p_value
    assert statistics.paired_difference_test([3, 2], [3, 3]).p_method == "exact"
    assert statistics.paired_difference_test([3], [3]).p_method == "exact"


def test_holm_adjustment_matches_the_step_down_worked_by_hand() -> None:
    # Sorted p: 0.01, 0.02, 0.03, 0.5 -> 4*0.01, max(that, 3*0.02), max(that, 2*0.03), max(that, 0.5).
    raw = [0.03, 0.01, 0.5, 0.02, math.nan]
    adjusted = statistics.holm_adjust(raw)
    assert adjusted[:4] == pytest.approx([0.06, 0.04, 0.5, 0.06]) and math.isnan(adjusted[4])
    frame = pl.DataFrame({"judge": ["a", "a", "a", "a", "b"], "p_value": [0.03, 0.01, 0.5, 0.02, 0.03]})
    tested = statistics.with_holm(frame, ["judge"])
    assert tested["p_value"].to_list() == frame["p_value"].to_list()  # raw kept beside the adjusted
    assert tested["p_value_holm"].to_list() == pytest.approx([0.06, 0.04, 0.5, 0.06, 0.03])
    assert tested["family_size"].to_list() == [4, 4, 4, 4, 1]
    # 0.03 alone is significant; in a family of four it is not.
    assert tested["significant_holm"].to_list() == [False, True, False, False, True]
    empty = statistics.with_holm(frame.head(0), ["judge"])
    assert {"p_value_holm", "significant_holm", "family_size"} <= set(empty.columns)


def test_paired_test_rejects_unpaired_samples() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        statistics.paired_difference_test([1, 2], [1])


def test_unweighted_kappa_from_agreement_tables() -> None:
    # Observed agreement 0.5, chance agreement 0.5 -> kappa 0.
    assert statistics.cohen_kappa([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0)
    assert statistics.cohen_kappa([0, 1, 2, 3], [0, 1, 2, 3]) == pytest.approx(1.0)
    # Rater B says 0 four times in ten (marginals A 0.5/0.5, B 0.4/0.6), so chance agreement p_e = 0.5.
    a = [0] * 5 + [1] * 5
    b = [0, 0, 0, 0, 1] + [1] * 5  # p_o = 0.9 -> kappa = (0.9 - 0.5) / 0.5 = 0.8
    assert statistics.cohen_kappa(a, b) == pytest.approx(0.8)
    b = [0, 0, 0, 1, 1, 0, 1, 1, 1, 1]  # p_o = 0.7 -> kappa = 0.4
    assert statistics.cohen_kappa(a, b) == pytest.approx(0.4)


def test_quadratic_kappa_equals_its_moment_form() -> None:
    # With quadratic weights, kappa = 2 cov(a, b) / (var a + var b + (mean a - mean b)^2) (population moments).
    rng = np.random.default_rng(3)
    a = rng.integers(0, 4, 200)
    b = np.clip(a + rng.integers(-1, 2, 200), 0, 3)
    moment_form = 2 * np.cov(a, b, bias=True)[0, 1] / (a.var() + b.var() + (a.mean() - b.mean()) ** 2)
    assert statistics.cohen_kappa(a, b, weights="quadratic") == pytest.approx(moment_form)


def test_linear_kappa_on_two_levels_is_unweighted_kappa() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    assert statistics.cohen_kappa(a, b, levels=(0, 1), weights="linear") == pytest.approx(
        statistics.cohen_kappa(a, b, levels=(0, 1))
    )


def test_weighting_rewards_near_misses() -> None:
    a = [3, 3, 2, 2, 1, 1, 0, 0]
    near = [2, 3, 3, 2, 0, 1, 1, 0]  # every disagreement is one level
    agreement = statistics.agreement(a, near)
    assert agreement.exact_agreement == 0.5
    assert agreement.kappa < agreement.kappa_linear < agreement.kappa_quadratic


def test_kappa_edge_cases() -> None:
    assert math.isnan(statistics.cohen_kappa([3, 3], [3, 3]))  # no room for disagreement
    assert math.isnan(statistics.cohen_kappa([], []))
    with pytest.raises(ValueError, match=r"ratings \[5\] are outside the levels"):
        statistics.cohen_kappa([5, 3], [3, 3])


def test_spearman_detects_a_length_bias_and_nan_for_constant_scores() -> None:
    chars = [100, 200, 300, 400, 500, 600]
    scores = [3, 3, 2, 2, 1, 0]
    result = statistics.spearman(scores, chars)
    assert result.rho < -0.9 and result.p_value < 0.05
    assert math.isnan(statistics.spearman([3, 3, 3, 3], chars[:4]).rho)
