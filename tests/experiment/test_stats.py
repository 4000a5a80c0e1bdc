"""Seed statistics against hand-computed values and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from sublearn.errors import SublearnError
from sublearn.experiment.stats import permutation_one_sided, summarize, welch_one_sided


def test_summarize_hand_computed() -> None:
    s = summarize([1, 2, 3])  # mean 2, sd 1, t(0.975, df=2) = 4.302653
    half = 4.302652729911275 / math.sqrt(3)
    assert s["values"] == [1.0, 2.0, 3.0] and s["mean"] == 2.0
    assert s["ci95"] == pytest.approx([2 - half, 2 + half], abs=1e-9)
    assert summarize([0.25]) == {"values": [0.25], "mean": 0.25, "ci95": [0.25, 0.25]}
    assert summarize([0.1, 0.1, 0.1])["ci95"] == [pytest.approx(0.1)] * 2


def test_summarize_matches_scipy_interval() -> None:
    x = np.random.default_rng(0).normal(0.3, 0.05, size=7)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert summarize(x.tolist())["ci95"] == pytest.approx([lo, hi], rel=1e-9)
    with pytest.raises(SublearnError):
        summarize([])


def test_welch_hand_computed_and_scipy() -> None:
    # a=[3,4,5], b=[0,1,2]: t = 3 / sqrt(1/3 + 1/3) = 3.6742, Welch df = 4.
    t = 3 / math.sqrt(2 / 3)
    assert welch_one_sided([3, 4, 5], [0, 1, 2]) == pytest.approx(stats.t.sf(t, 4), rel=1e-9)
    assert welch_one_sided([3, 4, 5], [0, 1, 2]) == pytest.approx(0.010656, abs=1e-6)
    rng = np.random.default_rng(1)
    a, b = rng.normal(1, 1, 5).tolist(), rng.normal(0, 3, 6).tolist()
    want = stats.ttest_ind(a, b, equal_var=False, alternative="greater").pvalue
    assert welch_one_sided(a, b) == pytest.approx(want, rel=1e-12)
    assert welch_one_sided(b, a) == pytest.approx(1 - want, rel=1e-9)  # the other direction


def test_welch_zero_variance() -> None:
    assert welch_one_sided([0.2, 0.2], [0.1, 0.1]) == 0.0
    assert welch_one_sided([0.1, 0.1], [0.2, 0.2]) == 1.0
    assert welch_one_sided([0.1, 0.1], [0.1, 0.1]) == 1.0
    p = welch_one_sided([0.3, 0.3, 0.3], [0.1, 0.2, 0.15])  # one side constant: still defined
    assert 0 < p < 0.05
    with pytest.raises(SublearnError, match="at least 2 values"):
        welch_one_sided([1.0], [0.0, 1.0])


def test_permutation_exact_hand_computed() -> None:
    # Only the observed split of C(6,3) = 20 reaches a mean difference of 3.
    assert permutation_one_sided([3, 4, 5], [0, 1, 2]) == pytest.approx(1 / 20)
    # Splits of {1,2,3,4}: differences -2,-1,0,0,1,2; observed [2,4] vs [1,3] = 1 -> 2/6.
    assert permutation_one_sided([2, 4], [1, 3]) == pytest.approx(1 / 3)
    assert permutation_one_sided([1, 2], [3, 4]) == pytest.approx(1.0)


def test_permutation_monte_carlo_is_seeded_and_close_to_exact() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(0.5, 1, 8).tolist(), rng.normal(0, 1, 8).tolist()
    exact = permutation_one_sided(a, b, n_resamples=20_000)  # C(16,8) = 12870 splits: exact
    mc = permutation_one_sided(a, b, n_resamples=2000, seed=3)
    assert mc == permutation_one_sided(a, b, n_resamples=2000, seed=3)
    assert mc == pytest.approx(exact, abs=0.03)
    assert 0 < exact < 1


def test_difference_ci_matches_scipy_welch_interval() -> None:
    from scipy import stats

    from sublearn.experiment.stats import difference_ci

    a, b = [0.021, 0.018, 0.025, 0.03, 0.019], [0.008, 0.009, 0.007, 0.011]
    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    d = difference_ci(a, b)
    assert d["estimate"] == pytest.approx(np.mean(a) - np.mean(b))
    assert d["ci95"] == pytest.approx([ref.low, ref.high], rel=1e-9)


def test_ratio_ci_on_the_log_scale() -> None:
    from sublearn.experiment.stats import ratio_ci

    a, b = [0.03, 0.02, 0.025, 0.035, 0.04], [0.01, 0.012, 0.008, 0.011, 0.009]
    r = ratio_ci(a, b)
    assert r["estimate"] == pytest.approx(np.mean(a) / np.mean(b))
    lo, hi = r["ci95"]
    assert lo < r["estimate"] < hi
    assert np.log(r["estimate"]) - np.log(lo) == pytest.approx(np.log(hi) - np.log(r["estimate"]))
    # scale-free: the same ratio and interval for shares in percent
    r100 = ratio_ci([100 * x for x in a], [100 * x for x in b])
    assert r100["ci95"] == pytest.approx(r["ci95"])
    # no spread: a degenerate interval; a zero mean: no ratio
    assert ratio_ci([2.0, 2.0], [1.0, 1.0]) == {"estimate": 2.0, "ci95": [2.0, 2.0]}
    assert ratio_ci([1.0, 2.0], [0.0, 0.0])["estimate"] is None


def test_effect_over_runs_exact_permutation() -> None:
    from sublearn.experiment.stats import effect

    trait, control = [5.0, 6.0, 7.0, 8.0, 9.0], [1.0, 2.0, 3.0, 4.0, 4.5]
    e = effect(trait, control)
    assert e["p_permutation"] == pytest.approx(1 / 252)  # the one most extreme of C(10, 5)
    assert e["p_welch"] < 0.01 and e["n"] == [5, 5]
    assert effect(control, trait)["p_permutation"] == pytest.approx(1.0)


def test_remaining_share_estimate_interval_and_null() -> None:
    from sublearn.experiment.stats import remaining_share

    r = remaining_share([2.0, 2.2, 2.1], [1.0, 1.1, 1.0], [3.0, 3.2, 3.1], [1.0, 1.1, 1.0])
    assert r["estimate"] == pytest.approx((2.1 - 1.0333333) / (3.1 - 1.0333333))
    assert r["ci95"][0] <= r["estimate"] <= r["ci95"][1]
    # Fieller's ends: the ratios at which a - r b is exactly significant at 5% (two-sided)
    from statistics import covariance, fmean, variance

    td, cd, t, c = [2.0, 2.2, 2.1], [1.0, 1.1, 1.0], [3.0, 3.2, 3.1], [1.0, 1.1, 1.0]
    a, b = fmean(td) - fmean(cd), fmean(t) - fmean(c)
    vaa, vbb = variance(td) / 3 + variance(cd) / 3, variance(t) / 3 + variance(c) / 3
    vab = covariance(td, t) / 3 + covariance(cd, c) / 3
    df = vbb**2 / ((variance(t) / 3) ** 2 / 2 + (variance(c) / 3) ** 2 / 2)
    for end in r["ci95"]:
        tstat = abs(a - end * b) / (vaa - 2 * end * vab + end * end * vbb) ** 0.5
        assert tstat == pytest.approx(stats.t.ppf(0.975, df))
    full = remaining_share([3.0, 3.2, 3.1], [1.0, 1.1, 1.0], [3.0, 3.2, 3.1], [1.0, 1.1, 1.0])
    assert full["estimate"] == pytest.approx(1.0) and full["ci95"] == pytest.approx([1.0, 1.0])
    none = remaining_share([2.0, 2.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0])
    assert none["estimate"] is None


def test_remaining_share_is_unbounded_without_a_clear_effect_and_covers() -> None:
    from sublearn.experiment.stats import difference_ci, remaining_share

    # an undefended effect whose own interval reaches 0: no bounded share (a bootstrap that
    # dropped the resamples without an effect reported 100% [0%, 400%] here)
    t, c = [1.30, 1.10, 1.25, 1.05, 1.20], [1.20, 1.15, 1.10, 1.25, 1.05]
    td, cd = [1.25, 1.15, 1.20, 1.10, 1.20], [1.10, 1.20, 1.15, 1.20, 1.10]
    assert difference_ci(t, c)["ci95"][0] < 0
    r = remaining_share(td, cd, t, c)
    assert r["estimate"] == pytest.approx(1.0) and r["ci95"] == [None, None]
    # coverage at 5 + 5 runs, defended values correlated with undefended ones, half remaining
    rng = np.random.default_rng(5)
    hits = 0
    for _ in range(1000):
        t, c = 1.3 + 0.1 * rng.normal(size=5), 1 + 0.1 * rng.normal(size=5)
        td = 1.15 + 0.8 * (t - 1.3) + 0.06 * rng.normal(size=5)
        cd = 1 + 0.8 * (c - 1) + 0.06 * rng.normal(size=5)
        lo, hi = remaining_share(td, cd, t, c)["ci95"]
        hits += lo is None or lo <= 0.5 <= hi
    assert 0.93 <= hits / 1000 <= 0.97  # 0.953; the percentile bootstrap used before: 0.87


def test_one_sample_tests_against_scipy() -> None:
    from sublearn.experiment.stats import sign_flip_one_sided, t_one_sided

    vals = [0.3, -0.1, 0.5, 0.2, 0.05]
    assert t_one_sided(vals) == pytest.approx(
        stats.ttest_1samp(vals, 0.0, alternative="greater").pvalue)
    want = stats.permutation_test((np.array(vals),), np.mean, permutation_type="samples",
                                  alternative="greater").pvalue
    assert sign_flip_one_sided(vals) == pytest.approx(want)
    assert sign_flip_one_sided([1.0] * 5) == 1 / 32  # every run positive: the smallest p
    assert t_one_sided([2.0, 2.0]) == 0.0 and t_one_sided([-1.0, -1.0]) == 1.0


@pytest.mark.parametrize(("a", "b", "hits", "splits"), [
    ([0.1, 0.2, 0.3], [0.1, 0.2, 0.3], 14, 20),
    ([0.1, 0.2, 0.7, 0.3, 0.3], [0.3, 0.2, 0.1, 0.7, 0.3], 150, 252),
    ([0.902, 0.903, 0.902, 0.901, 0.903], [0.902, 0.9, 0.901, 0.901, 0.901], 13, 252),
])
def test_permutation_counts_ties_between_repeated_values(a: list[float], b: list[float],
                                                         hits: int, splits: int) -> None:
    # Splits whose sums equal the observed one but for float rounding are ties; scipy's
    # permutation_test scales its tie tolerance with the observed difference and dropped some
    # (0.65, 0.44 and 0.0079 for these). Counts from exact rational enumeration:
    from fractions import Fraction
    from itertools import combinations

    pooled = [Fraction(str(v)) for v in a + b]
    obs = sum(pooled[: len(a)])
    want = sum(sum(pooled[i] for i in c) >= obs for c in combinations(range(len(pooled)), len(a)))
    assert want == hits
    assert permutation_one_sided(a, b) == pytest.approx(hits / splits, abs=1e-15)


def test_permutation_refuses_non_finite_values() -> None:
    with pytest.raises(SublearnError, match="finite"):
        permutation_one_sided([1.0, 2.0, float("nan")], [0.0, 1.0, 2.0])


def test_permutation_uneven_groups_either_way_round() -> None:
    # the smaller group is enumerated: the same p whichever group is larger, and p(a > b)
    # plus p(b > a) is 1 + P(tie) for an exact test
    from math import comb

    rng = np.random.default_rng(4)
    big, small = rng.normal(0, 1, 30).tolist(), rng.normal(1, 1, 2).tolist()
    p_small = permutation_one_sided(small, big)
    p_big = permutation_one_sided(big, small)
    assert p_small + p_big == pytest.approx(1 + 1 / comb(32, 2))  # the observed split ties
    assert 0 < p_small < 0.2
