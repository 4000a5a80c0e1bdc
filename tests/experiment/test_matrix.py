"""`sublearn matrix`: the diagonal statistic against a naive regression, its power and its null,
and the verb end to end on a tiny model (files, schema and caching, not the science)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sublearn.cli import main
from sublearn.experiment.stats import diagonal_effect, diagonal_remaining


def _naive_ols(y: np.ndarray, labels: list[int]) -> tuple[float, float]:
    """lam and its standard error from a full dummy-variable design, by lstsq."""
    s, t = y.shape
    rows = []
    for i in range(s):
        for j in range(t):
            x = [0.0] * (s + t)
            x[i] = 1.0  # run effect
            if j:
                x[s + j - 1] = 1.0  # target effect (the first is the reference)
            x[-1] = float(labels[i] == j)
            rows.append(x)
    x, yy = np.asarray(rows), y.reshape(-1)
    beta, *_ = np.linalg.lstsq(x, yy, rcond=None)
    resid = yy - x @ beta
    df = len(yy) - np.linalg.matrix_rank(x)
    cov = resid @ resid / df * np.linalg.inv(x.T @ x)
    return float(beta[-1]), float(math.sqrt(cov[-1, -1]))


def test_diagonal_effect_equals_a_dummy_variable_regression() -> None:
    rng = np.random.default_rng(3)
    labels = [0, 1, 2, 3, 0, 1, 2, 3, 1, 2]  # unbalanced on purpose
    y = rng.normal(size=(10, 4)) + 0.7 * np.eye(4)[labels]
    res = diagonal_effect(y.tolist(), labels, n_resamples=2000)
    lam, se = _naive_ols(y, labels)
    assert res["estimate"] == pytest.approx(lam, abs=1e-10)
    half = (res["ci95"][1] - res["ci95"][0]) / 2
    from scipy import stats

    assert half == pytest.approx(stats.t.ppf(0.975, res["df"]) * se, rel=1e-8)
    assert res["df"] == 10 * 4 - (10 + 4 - 1) - 1


def test_diagonal_effect_finds_a_pull_and_not_a_null() -> None:
    rng = np.random.default_rng(0)
    labels = [j for _ in range(2) for j in range(5)]  # 5 targets x 2 runs
    noise = rng.normal(scale=0.3, size=(10, 5))
    popularity = np.log([0.02, 0.2, 0.1, 0.05, 0.01])  # column effects
    shift = rng.normal(size=(10, 1))  # row effects
    pulled = diagonal_effect(noise + popularity + shift + 0.8 * np.eye(5)[labels], labels,
                             n_resamples=5000)
    assert pulled["p_permutation"] < 0.01 and pulled["ci95"][0] > 0
    assert pulled["estimate"] == pytest.approx(0.8, abs=0.3)
    null = diagonal_effect(noise + popularity + shift, labels, n_resamples=5000)
    assert null["p_permutation"] > 0.05
    again = diagonal_effect(noise + popularity + shift, labels, n_resamples=5000)
    assert again == null  # seeded


def test_block_permutation_is_exact_and_equals_brute_force() -> None:
    """Labels shuffle only within blocks (runs that share seeds); with few permutations every
    one is tried, each refitted here by the naive regression."""
    import itertools

    rng = np.random.default_rng(5)
    labels, blocks = [0, 1, 2, 0, 1, 2], [0, 0, 0, 1, 1, 1]
    y = rng.normal(size=(6, 3)) + 0.5 * np.eye(3)[labels]
    res = diagonal_effect(y, labels, blocks=blocks)
    assert res["permutation_exact"] and res["n_permutations"] == 36
    lam = _naive_ols(y, labels)[0]
    null = [_naive_ols(y, list(a) + list(b))[0]
            for a in itertools.permutations(labels[:3]) for b in itertools.permutations(labels[3:])]
    assert res["p_permutation"] == pytest.approx(sum(v >= lam - 1e-12 for v in null) / 36)
    with pytest.raises(Exception, match="not finite"):
        diagonal_effect(np.log(np.where(np.eye(3)[labels] > 0, 0.0, 0.5)), labels)


def test_diagonal_effect_refuses_a_single_label() -> None:
    from sublearn.errors import SublearnError

    with pytest.raises(SublearnError, match="two targets"):
        diagonal_effect([[0.0, 1.0], [1.0, 0.0]], [0, 0])


def _matrix(rng: np.random.Generator, lam: float, labels: list[int]) -> np.ndarray:
    t = max(labels) + 1
    return (rng.normal(scale=0.3, size=(len(labels), t)) + np.log(np.linspace(0.01, 0.2, t))
            + rng.normal(size=(len(labels), 1)) + lam * np.eye(t)[labels])


def test_diagonal_remaining_is_the_fit_of_the_differences_and_exact_when_scaled() -> None:
    rng = np.random.default_rng(1)
    labels = [j for _ in range(2) for j in range(5)]
    y, yd = _matrix(rng, 0.8, labels), _matrix(rng, 0.3, labels)
    rem = diagonal_remaining(yd, y, labels)
    a, b = (diagonal_effect(v, labels, n_resamples=10)["estimate"] for v in (yd, y))
    assert rem["estimate"] == pytest.approx(a / b)
    lo, hi = rem["ci95"]
    assert lo < a / b < hi
    diff = diagonal_effect(yd - y, labels, n_resamples=10)  # the model is linear in y
    assert rem["difference"]["estimate"] == pytest.approx(diff["estimate"])
    assert rem["difference"]["ci95"] == pytest.approx(diff["ci95"])
    same = diagonal_remaining(y, y, labels)  # nothing removed: exactly 100%
    assert same["estimate"] == pytest.approx(1) and same["ci95"] == pytest.approx([1, 1])
    # a defence that halves every run's deviation from its row and column: exactly 50%
    for seed in range(40):  # (rounding must not open the interval)
        y = _matrix(np.random.default_rng(seed), 0.8, labels)
        half = diagonal_remaining(0.5 * y + 3.0, y, labels)
        assert half["ci95"] == pytest.approx([0.5, 0.5])
    none = diagonal_remaining(yd, _matrix(rng, 0.0, labels) - 2 * np.eye(5)[labels], labels)
    assert none["estimate"] is None and none["ci95"] == [None, None]


def test_diagonal_remaining_is_open_exactly_when_lam_is_not_clearly_positive() -> None:
    """Fieller's interval is bounded iff the undefended lam's own 95% interval excludes 0;
    otherwise the share is reported with an open interval."""
    labels = [j for _ in range(2) for j in range(5)]
    kinds = set()
    for seed in range(60):
        rng = np.random.default_rng(seed)
        y, yd = _matrix(rng, 0.25, labels), _matrix(rng, 0.1, labels)
        rem = diagonal_remaining(yd, y, labels)
        lam = diagonal_effect(y, labels, n_resamples=10)
        if lam["estimate"] <= 0:
            assert rem["estimate"] is None
            continue
        bounded = rem["ci95"][0] is not None
        assert bounded == (lam["ci95"][0] > 0)
        kinds.add(bounded)
    assert kinds == {True, False}  # both cases met


def test_diagonal_remaining_interval_covers_the_truth() -> None:
    """Fieller's interval, simulated: defended and undefended students share each run's
    noise in part (the same teacher and data), the truth is 0.4 / 1.0."""
    rng = np.random.default_rng(7)
    labels = [j for _ in range(3) for j in range(5)]
    hits = 0
    for _ in range(400):
        shared = rng.normal(scale=0.3, size=(15, 5))
        y = shared + rng.normal(scale=0.2, size=(15, 5)) + 1.0 * np.eye(5)[labels]
        yd = shared + rng.normal(scale=0.2, size=(15, 5)) + 0.4 * np.eye(5)[labels]
        lo, hi = diagonal_remaining(yd, y, labels)["ci95"]
        hits += lo is not None and lo <= 0.4 <= hi
    assert 0.91 <= hits / 400 <= 0.985


def test_matrix_end_to_end_and_shared_stages_with_run(tiny_model: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "mx"
    args = ["matrix", "--model", tiny_model, "--targets", "owl,cat,dog", "--n", "8",
            "--epochs", "1", "--batch-size", "4", "--teacher-epochs", "1", "--icl", "4",
            "--min-grammar-share", "0", "--out", str(out)]  # tiny: every answer forced
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["targets"] == ["owl", "cat", "dog"]
    assert [(r["target"], r["run"]) for r in res["runs"]] == [
        (t, r) for r in range(2) for t in ("owl", "cat", "dog")]
    assert len({r["teacher"] for r in res["runs"]}) == 6  # a teacher per target per run
    assert len({r["data"] for r in res["runs"]}) == 6
    for r in res["runs"]:
        assert set(r["shares"]) == {"all", "dev", "test"}
        assert set(r["shares"]["all"]) == {"owl", "cat", "dog"}
        assert r["trained_rows"] <= r["kept"]
    assert len({r["trained_rows"] for r in res["runs"] if r["run"] == 0}) == 1  # equal rows
    owl_students = [r["shares"]["all"]["cat"] for r in res["runs"] if r["target"] == "owl"]
    assert res["matrix"][0][1] == pytest.approx(sum(owl_students) / 2)
    for half in ("all", "dev", "test"):
        d = res["diagonal"][half]
        assert d["n_runs"] == 6 and d["n_targets"] == 3 and 0 < d["p_permutation"] <= 1
        assert d["ratio"] == pytest.approx(math.exp(d["estimate"]))
    assert set(res["per_target"]) == {"owl", "cat", "dog"}
    # the in-context control: the base with each run's data in context, the same statistics
    assert res["icl_turns"] == 4 and res["icl_diagonal"]["test"]["n_runs"] == 6
    assert all(set(r["icl_shares"]["all"]) == {"owl", "cat", "dog"} for r in res["runs"])
    icl = json.loads(next((out / "owl" / "stages").glob("eval_icl_trait_run0-*/scores.json"))
                     .read_text())
    assert icl["context_turns"] == 4 and icl["config"]["context"] == res["runs"][0]["data"]
    report = (out / "report.md").read_text()
    assert "test half (untouched)" in report and "## Teachers" in report
    assert "## In-context control" in report
    assert (out / "matrix.png").stat().st_size > 0
    capsys.readouterr()

    assert main(args) == 0  # a rerun is all cache hits
    assert "[stage]" not in capsys.readouterr().out
    # the matrix's owl stages are `sublearn run`'s: a run there reuses its teachers and data
    assert main(["run", "--model", tiny_model, "--target", "owl", "--n", "8", "--runs", "2",
                 "--epochs", "1", "--batch-size", "4", "--teacher-epochs", "1", "--icl", "4",
                 "--min-grammar-share", "0", "--out", str(out / "owl")]) == 0
    log = capsys.readouterr().out
    assert "[cached] teacher_trait_run1" in log and "[cached] data_trait_run1" in log
    assert "[cached] eval_teacher_run0" in log and "[cached] eval_icl_trait_run1" in log
    assert "[stage] teacher_control_run0" in log

    # a defence adds stages to the same folder: each target's data defended, a student on it
    assert main([*args, "--defence", "shuffle"]) == 0
    log = capsys.readouterr().out
    assert "[cached] student_trait_run1" in log and "[stage] student_trait_shuffle_run1" in log
    res = json.loads((out / "results.json").read_text())
    d = res["defences"]["shuffle"]
    assert d["diagonal"]["all"]["n_runs"] == 6 and len(d["matrix"]) == 3
    assert set(d["remaining"]) == {"all", "dev", "test"} and d["seconds_per_dataset"] >= 0
    for r in res["runs"]:  # each defended student is its own run's, on its own target
        dd = r["defended"]["shuffle"]
        assert dd["data"] != r["data"] and set(dd["shares"]["all"]) == {"owl", "cat", "dog"}
        assert f"/{r['target']}/stages/student_trait_shuffle_run{r['run']}-" in dd["student"]
        assert f"/{r['target']}/stages/defend_shuffle_trait_run{r['run']}-" in dd["data"]
    assert res["config"]["defence"] == "shuffle"
    assert "## Defences" in (out / "report.md").read_text()
    for t, e in d["per_target"].items():  # own vs others, from the defended students' shares
        own = [r["defended"]["shuffle"]["shares"]["all"][t] for r in res["runs"]
               if r["target"] == t]
        assert e["own"] == pytest.approx(sum(own) / len(own))
    assert "Own vs others ratio per target" in (out / "report.md").read_text()
