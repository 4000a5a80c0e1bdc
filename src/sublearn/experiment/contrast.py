"""Cross-target contrast: are the trait runs of experiment A shifted toward A's target relative
to the trait runs of experiment B (another target, same recipe), and vice versa? This is the
trait-specificity test that does not depend on any control teacher. Runs are the unit: each
value is one run's students' share (averaged within the run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sublearn.errors import SublearnError
from sublearn.experiment.stats import effect, summarize


def _student_shares(run: Path) -> tuple[str, list[dict[str, float]]]:
    from sublearn.experiment.report import read_run_results

    results, path = read_run_results(run), run / "results.json"
    shares = [r.get("shares") for r in results["runs"] if r["condition"] == "trait"]
    if not shares or not all(isinstance(s, dict) for s in shares):
        raise SublearnError(f"{path} holds no trait runs (made by an older sublearn? rerun it)")
    return results["target"], [{k.lower(): v for k, v in s.items()} for s in shares]


def contrast(run_a: str | Path, run_b: str | Path) -> dict[str, Any]:
    (ta, sa), (tb, sb) = _student_shares(Path(run_a)), _student_shares(Path(run_b))
    if ta.lower() == tb.lower():
        raise SublearnError(f"both experiments have target '{ta}': pick two different targets")
    out: dict[str, Any] = {"a": {"run": str(run_a), "target": ta},
                           "b": {"run": str(run_b), "target": tb}, "scores": {}}
    for animal, higher, lower in ((ta, sa, sb), (tb, sb, sa)):
        if any(animal.lower() not in s for s in higher + lower):
            raise SublearnError(f"'{animal}' is not a candidate in both experiments: contrast "
                                "experiments evaluated on the same candidates")
        hi = [s[animal.lower()] for s in higher]
        lo = [s[animal.lower()] for s in lower]
        e = effect(hi, lo)
        out["scores"][animal] = {
            f"{animal}_students": summarize(hi),
            "other_students": summarize(lo),
            **e,
            "p_value": e["p_welch"],
        }
    out["test"] = ("welch_t_one_sided over runs: each target's trait runs score their own "
                   "target higher")
    return out
