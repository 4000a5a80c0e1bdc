"""Statistics over seeds: mean with a 95% t-interval, and one-sided tests of trait > control."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

from sublearn.errors import SublearnError


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """{"per_seed", "mean", "ci95"}: a two-sided 95% Student-t interval for the mean. One value
    or no spread gives the degenerate interval [mean, mean] (JSON has no NaN)."""
    from scipy import stats

    vals = [float(v) for v in values]
    if not vals:
        raise SublearnError("cannot summarise an empty list of values")
    n = len(vals)
    mean = math.fsum(vals) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n) if sd > 0 else 0.0
    return {"per_seed": vals, "mean": mean, "ci95": [mean - half, mean + half]}


def _two_samples(a: Sequence[float], b: Sequence[float], test: str) -> tuple[list, list]:
    a, b = [float(v) for v in a], [float(v) for v in b]
    if len(a) < 2 or len(b) < 2:
        raise SublearnError(f"{test} needs at least 2 values per group, got {len(a)} and {len(b)}")
    return a, b


def welch_one_sided(a: Sequence[float], b: Sequence[float]) -> float:
    """p-value of Welch's t-test, H1: mean(a) > mean(b).

    Zero variance in both groups leaves the t statistic undefined; the data then carry no
    noise, so we return 0.0 when mean(a) > mean(b) (the difference is certain) and 1.0
    otherwise (no evidence for H1). Zero variance on one side only is fine for Welch."""
    from scipy import stats

    a, b = _two_samples(a, b, "Welch's t-test")
    if max(a) == min(a) and max(b) == min(b):
        return 0.0 if a[0] > b[0] else 1.0
    with warnings.catch_warnings():
        # A constant group (deterministic runs) trips scipy's "nearly identical" warning even
        # though its zero variance is exact and Welch handles it.
        warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False, alternative="greater").pvalue)


def permutation_one_sided(a: Sequence[float], b: Sequence[float], n_resamples: int = 100_000,
                          seed: int = 0) -> float:
    """p-value of a permutation test of the difference in means, H1: mean(a) > mean(b). Exact
    (all C(n_a + n_b, n_a) splits) when there are at most n_resamples of them -- e.g. 252 for 5
    vs 5 seeds -- otherwise Monte Carlo with `seed`."""
    import numpy as np
    from scipy import stats

    a, b = _two_samples(a, b, "the permutation test")

    def diff(x: Any, y: Any, axis: int) -> Any:
        return np.mean(x, axis=axis) - np.mean(y, axis=axis)

    res = stats.permutation_test((a, b), diff, permutation_type="independent", vectorized=True,
                                 alternative="greater", n_resamples=n_resamples,
                                 rng=np.random.default_rng(seed))
    return float(res.pvalue)
