"""Statistics over independent units (runs in `sublearn run`, seeds in `sublearn mnist`): the
mean with a 95% t-interval, one-sided tests of trait > control (Welch; exact permutation), and
the effect as a difference and as a ratio, each with a 95% interval."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

from sublearn.errors import SublearnError


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """{"values", "mean", "ci95"}: a two-sided 95% Student-t interval for the mean. One value
    or no spread gives the degenerate interval [mean, mean] (JSON has no NaN)."""

    vals = [float(v) for v in values]
    if not vals:
        raise SublearnError("cannot summarise an empty list of values")
    n = len(vals)
    mean = math.fsum(vals) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    half = _t_half(sd / math.sqrt(n), n - 1)
    return {"values": vals, "mean": mean, "ci95": [mean - half, mean + half]}


def _t_half(se: float, df: float) -> float:
    """Half-width of a two-sided 95% t-interval; 0 for no spread (JSON has no NaN)."""
    from scipy import stats

    return float(stats.t.ppf(0.975, df)) * se if se > 0 else 0.0


def _two_samples(a: Sequence[float], b: Sequence[float], test: str) -> tuple[list, list]:
    a, b = [float(v) for v in a], [float(v) for v in b]
    if len(a) < 2 or len(b) < 2:
        raise SublearnError(f"{test} needs at least 2 values per group, got {len(a)} and {len(b)}")
    if not all(map(math.isfinite, a + b)):
        raise SublearnError(f"{test} needs finite values, got {a} and {b}")
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


PERMUTATIONS = 100_000  # exact test up to this many splits, Monte Carlo beyond


def permutation_exact(na: int, nb: int, n_resamples: int = PERMUTATIONS) -> bool:
    """Whether `permutation_one_sided` on groups of na and nb values enumerates every split."""
    return math.comb(na + nb, na) <= n_resamples


def permutation_one_sided(a: Sequence[float], b: Sequence[float],
                          n_resamples: int = PERMUTATIONS,
                          seed: int = 0) -> float:
    """p-value of a permutation test of the difference in means, H1: mean(a) > mean(b): the
    share of splits of the pooled values into groups of len(a) and len(b) whose difference is
    at least the observed one. Exact (all C(n_a + n_b, n_a) splits) when there are at most
    n_resamples of them -- e.g. 252 for 5 vs 5 runs -- otherwise Monte Carlo with `seed`
    (the observed split counted as one). A split whose difference equals the observed one but
    for float rounding is a tie and counts: repeated values (sampled rates, deterministic
    runs) make such ties, and scipy's `permutation_test`, whose tolerance scales with the
    observed difference rather than the values, missed some (p too small)."""
    import itertools

    import numpy as np

    a, b = _two_samples(a, b, "the permutation test")
    pooled = np.asarray(a + b)
    n, na = len(pooled), len(a)
    # the total is fixed, so mean(a') - mean(b') rises with sum(a'): compare the sums
    observed = math.fsum(a)
    tol = 1e-12 * math.fsum(abs(v) for v in pooled)
    total = math.comb(n, na)
    if permutation_exact(na, n - na, n_resamples):
        # enumerate the smaller group's members (memory: splits x its size); a split's a-sum
        # is the pooled total less the b-sum when b is the one enumerated
        k = min(na, n - na)
        picks = np.fromiter(itertools.chain.from_iterable(
            itertools.combinations(range(n), k)), dtype=np.intp, count=total * k)
        sums = pooled[picks.reshape(total, k)].sum(1)
        if k != na:
            sums = math.fsum(pooled) - sums
        hits = int((sums >= observed - tol).sum())
        return hits / total
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_resamples, 10_000):  # chunks: bounded memory
        perms = rng.permuted(np.tile(np.arange(n), (min(10_000, n_resamples - start), 1)),
                             axis=1)
        hits += int((pooled[perms[:, :na]].sum(1) >= observed - tol).sum())
    return (1 + hits) / (1 + n_resamples)


def t_one_sided(values: Sequence[float]) -> float:
    """p-value of a one-sample t-test, H1: mean > 0 (no spread: 0.0 if the mean is positive,
    else 1.0, as `welch_one_sided`)."""
    from scipy import stats

    vals = [float(v) for v in values]
    if len(vals) < 2 or not all(math.isfinite(v) for v in vals):
        raise SublearnError(f"a t-test needs at least 2 finite values, got {vals}")
    if max(vals) == min(vals):
        return 0.0 if vals[0] > 0 else 1.0
    with warnings.catch_warnings():  # nearly equal values: their spread is still exact
        warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
        return float(stats.ttest_1samp(vals, 0.0, alternative="greater").pvalue)


def sign_flip_one_sided(values: Sequence[float]) -> float:
    """p-value of the exact sign-flip permutation test, H1: mean > 0: the share of the 2^n
    sign assignments whose mean is at least the observed one (1/32 at best for 5 units)."""
    import itertools

    vals = [float(v) for v in values]
    if not 1 <= len(vals) <= 20 or not all(math.isfinite(v) for v in vals):
        raise SublearnError(f"the exact sign-flip test takes 1 to 20 finite values, got {vals}")
    observed = math.fsum(vals)
    tol = 1e-12 * math.fsum(abs(v) for v in vals)  # sums equal but for rounding count as ties
    hits = sum(math.fsum(s * v for s, v in zip(signs, vals, strict=True)) >= observed - tol
               for signs in itertools.product((1, -1), repeat=len(vals)))
    return hits / 2 ** len(vals)


def _welch_parts(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """(mean(a) - mean(b), its standard error, Welch-Satterthwaite degrees of freedom)."""
    import statistics

    na, nb = len(a), len(b)
    va, vb = statistics.variance(a) / na, statistics.variance(b) / nb
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1)) if se > 0 else math.inf
    return statistics.fmean(a) - statistics.fmean(b), se, df


def difference_ci(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """mean(a) - mean(b) with Welch's two-sided 95% interval."""

    a, b = _two_samples(a, b, "a difference interval")
    d, se, df = _welch_parts(a, b)
    half = _t_half(se, df)
    return {"estimate": d, "ci95": [d - half, d + half]}


def ratio_ci(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """mean(a) / mean(b) with a 95% interval from the delta method on the log scale
    (log mean(a) - log mean(b), Welch degrees of freedom); needs positive values, as shares
    and rates are. Null when a mean is not positive."""

    a, b = _two_samples(a, b, "a ratio interval")
    ma, mb = math.fsum(a) / len(a), math.fsum(b) / len(b)
    if ma <= 0 or mb <= 0:
        return {"estimate": None, "ci95": [None, None]}
    # the log of a mean: its standard error is sd / (sqrt(n) * mean)
    la = [v / ma for v in a]
    lb = [v / mb for v in b]
    _, se, df = _welch_parts(la, lb)
    half = _t_half(se, df)
    r = ma / mb
    return {"estimate": r, "ci95": [r * math.exp(-half), r * math.exp(half)]}


def effect(trait: Sequence[float], control: Sequence[float]) -> dict[str, Any]:
    """Everything `sublearn run` reports for one metric, trait runs against control runs."""
    return {
        "difference": difference_ci(trait, control),
        "ratio": ratio_ci(trait, control),
        "p_welch": welch_one_sided(trait, control),
        "p_permutation": permutation_one_sided(trait, control),
        "permutation_exact": permutation_exact(len(trait), len(control)),
        "n": [len(trait), len(control)],
    }


def remaining_share(trait_d: Sequence[float], control_d: Sequence[float],
                    trait: Sequence[float], control: Sequence[float]) -> dict[str, Any]:
    """The share of an effect that a defence leaves: (mean trait_d - mean control_d) /
    (mean trait - mean control), with Fieller's 95% interval for the ratio. A run's defended
    and undefended values come from the same teacher and data, so the two effects covary:
    their covariance is the runs' paired covariance within each condition. Degrees of
    freedom: Welch's, of the undefended effect. The interval is null (unbounded) when the
    undefended effect is not clearly above 0 (its own 95% interval reaches 0), the estimate
    when it is not positive. (A percentile bootstrap, used before, dropped the resamples
    whose undefended effect vanished and covered 86-88% at 5 + 5 runs in simulation.)"""
    import statistics

    td, cd, t, c = ([float(v) for v in x] for x in (trait_d, control_d, trait, control))
    if len(td) != len(t) or len(cd) != len(c):
        raise SublearnError("defended and undefended values must come from the same runs")
    t, c = _two_samples(t, c, "the share that remains")
    td, cd = _two_samples(td, cd, "the share that remains")
    a = statistics.fmean(td) - statistics.fmean(cd)
    b, se_b, df = _welch_parts(t, c)
    nt, nc = len(t), len(c)
    vaa = statistics.variance(td) / nt + statistics.variance(cd) / nc
    vab = statistics.covariance(td, t) / nt + statistics.covariance(cd, c) / nc
    return {"estimate": a / b if b > 0 else None,
            "ci95": fieller(a, b, vaa, se_b**2, vab, df),
            "method": "Fieller interval, covariance from the runs' paired values, Welch df"}


def fieller(a: float, b: float, vaa: float, vbb: float, vab: float,
            df: float) -> list[float | None]:
    """Fieller's 95% interval for a / b from estimates a, b with variances vaa, vbb and
    covariance vab on df degrees of freedom: the ratios r for which a - r b is not
    significantly different from 0. [None, None] (unbounded) unless b is clearly above 0."""
    from scipy import stats

    q = float(stats.t.ppf(0.975, df)) ** 2 if math.isfinite(df) else 1.959963984540054**2
    qa, qb, qc = b * b - q * vbb, a * b - q * vab, a * a - q * vaa
    if not (b > 0 and qa > 0):
        return [None, None]
    root = math.sqrt(max(qb * qb - qa * qc, 0.0))  # >= 0: the quadratic is <= 0 at a / b
    return [(qb - root) / qa, (qb + root) / qa]


def diagonal_effect(y: Sequence[Sequence[float]], labels: Sequence[int],
                    blocks: Sequence[int] | None = None, n_resamples: int = PERMUTATIONS,
                    seed: int = 0) -> dict[str, Any]:
    """The diagonal term of a trait x trait matrix. y[s][j]: run s's value on target j (e.g.
    the log share of target j); labels[s]: the target run s's teacher had. Fits, by OLS,
        y[s][j] = a_s + b_j + lam * [labels[s] == j] + e[s][j]
    (a run's overall shift, a target's overall popularity, and the pull toward the run's own
    target), with a two-sided 95% t-interval for lam. The fit is the Frisch-Waugh-Lovell one:
    with every cell observed, removing the row and column effects is double-centring.
    p_permutation: one-sided (lam > 0), the teachers' target labels shuffled over runs --
    within each block (runs that share seeds) when `blocks` is given; exact (every
    permutation) when there are at most n_resamples, else Monte Carlo with `seed` (the
    observed labelling counted as one)."""
    import itertools

    import numpy as np

    lab = np.asarray(labels, dtype=int)
    lam, resid, d, yc, df = _diagonal_fit(y, lab)
    s = yc.shape[0]
    groups = [np.flatnonzero(np.asarray(blocks) == b) for b in dict.fromkeys(blocks)] \
        if blocks is not None else [np.arange(s)]
    ss = float((d * d).sum())  # the same for every relabelling: group sizes are kept
    ci: list[float | None] = [None, None]
    if df > 0:
        se = math.sqrt(float((resid**2).sum()) / df / ss)
        half = _t_half(se, df)
        ci = [lam - half, lam + half]

    def null(perms: Any) -> Any:  # perms: [n, s] labellings
        # (D_perm * yc).sum() == sum_s yc[s, perm_s], as yc's rows and columns sum to zero
        return yc[np.arange(s), perms].sum(1) / ss

    total = math.prod(math.factorial(len(g)) for g in groups)
    exact = total <= n_resamples
    if exact:
        perms = np.empty((total, s), dtype=int)
        for i, combo in enumerate(itertools.product(
                *(itertools.permutations(lab[g].tolist()) for g in groups))):
            for g, p in zip(groups, combo, strict=True):
                perms[i, g] = p
        hits = int((null(perms) >= lam - 1e-12).sum())
        p_value, n = hits / total, total
    else:
        rng = np.random.default_rng(seed)
        hits = 0
        for start in range(0, n_resamples, 10_000):  # chunks: bounded memory
            perms = np.tile(lab, (min(10_000, n_resamples - start), 1))
            for g in groups:
                perms[:, g] = rng.permuted(perms[:, g], axis=1)
            hits += int((null(perms) >= lam - 1e-12).sum())
        p_value, n = (1 + hits) / (1 + n_resamples), n_resamples
    return {"estimate": lam, "ci95": ci, "df": df, "p_permutation": p_value,
            "permutation_exact": exact, "n_permutations": n, "n_as_large": hits,
            "n_runs": s, "n_targets": yc.shape[1]}


def _diagonal_fit(y: Sequence[Sequence[float]], lab: Any) -> tuple[float, Any, Any, Any, int]:
    """(lam, residuals, centred diagonal indicator, centred y, residual df) of
    `diagonal_effect`'s model: with every cell observed, removing the row and column effects
    is double-centring (Frisch-Waugh-Lovell)."""
    import numpy as np

    Y = np.asarray(y, dtype=float)
    if Y.ndim != 2 or len(lab) != Y.shape[0] or Y.shape[1] < 2 or len(set(lab.tolist())) < 2:
        raise SublearnError("the diagonal effect needs a runs x targets matrix with at least "
                            "two targets among the runs' labels")
    if lab.min() < 0 or lab.max() >= Y.shape[1]:
        raise SublearnError("every run's label must be one of the matrix's targets")
    if not np.isfinite(Y).all():
        raise SublearnError("the matrix has a value that is not finite (a share of 0?)")

    def centred(a: Any) -> Any:
        return a - a.mean(1, keepdims=True) - a.mean(0, keepdims=True) + a.mean()

    d = centred(np.eye(Y.shape[1])[lab])
    yc = centred(Y)
    lam = float((d * yc).sum()) / float((d * d).sum())
    return lam, yc - lam * d, d, yc, (Y.shape[0] - 1) * (Y.shape[1] - 1) - 1


def diagonal_remaining(y_defended: Sequence[Sequence[float]], y: Sequence[Sequence[float]],
                       labels: Sequence[int]) -> dict[str, Any]:
    """The share of a matrix's diagonal effect that a defence leaves: lam_defended / lam,
    both fitted as in `diagonal_effect` on the same runs (a run's defended student learns
    from its teacher's defended data). The 95% interval is Fieller's for a ratio of two
    estimates from one design, with their covariance from the paired residuals; it is
    null (unbounded) when lam itself is not clearly above 0. `difference`: lam_defended -
    lam with its t-interval (the same fit on the paired differences)."""
    import numpy as np

    if np.shape(y_defended) != np.shape(y):
        raise SublearnError("defended and undefended matrices must cover the same runs")
    lab = np.asarray(labels, dtype=int)
    a, ra, d, _, df = _diagonal_fit(y_defended, lab)
    b, rb, _, _, _ = _diagonal_fit(y, lab)
    if df <= 0:
        raise SublearnError("the diagonal effect's interval needs more runs or targets")
    ss = float((d * d).sum())
    vaa, vbb, vab = (float((u * v).sum()) / df / ss for u, v in ((ra, ra), (rb, rb), (ra, rb)))
    diff_se = math.sqrt(max(0.0, vaa + vbb - 2 * vab))
    diff_half = _t_half(diff_se, df)
    out: dict[str, Any] = {
        "estimate": a / b if b > 0 else None, "ci95": [None, None],
        "method": "Fieller interval, covariance from paired residuals",
        "difference": {"estimate": a - b, "ci95": [a - b - diff_half, a - b + diff_half]}}
    out["ci95"] = fieller(a, b, vaa, vbb, vab, df)
    return out
