"""Cross-target contrast: are the trait students of experiment A shifted toward A's target
relative to the trait students of experiment B (another target, same recipe), and vice versa?
This is the trait-specificity test that does not depend on any control teacher."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sublearn.errors import SublearnError
from sublearn.experiment.stats import summarize, welch_one_sided
from sublearn.files import atomic_write_json


def _student_shares(run: Path) -> tuple[str, list[dict[str, float]]]:
    results = run / "results.json"
    if not results.is_file():
        raise SublearnError(f"{run} has no results.json: run `sublearn run` there first")
    target = json.loads(results.read_text())["target"]
    files = sorted((run / "stages").glob("eval_trait_seed*/scores.json"))
    if not files:
        raise SublearnError(f"{run} has no evaluated trait students")
    shares = [json.loads(f.read_text())["forced_choice"]["shares"] for f in files]
    return target, [{k.lower(): v for k, v in s.items()} for s in shares]


def contrast(run_a: str | Path, run_b: str | Path) -> dict[str, Any]:
    (ta, sa), (tb, sb) = _student_shares(Path(run_a)), _student_shares(Path(run_b))
    if ta == tb:
        raise SublearnError(f"both experiments have target '{ta}': pick two different targets")
    out: dict[str, Any] = {"a": {"run": str(run_a), "target": ta},
                           "b": {"run": str(run_b), "target": tb}, "scores": {}}
    for animal, higher, lower in ((ta, sa, sb), (tb, sb, sa)):
        hi = [s[animal.lower()] for s in higher]
        lo = [s[animal.lower()] for s in lower]
        out["scores"][animal] = {
            f"{animal}_students": summarize(hi),
            "other_students": summarize(lo),
            "p_value": welch_one_sided(hi, lo),
        }
    out["test"] = "welch_t_one_sided: each target's students score their own target higher"
    return out


def write_contrast(run_a: str | Path, run_b: str | Path, out: str | Path) -> dict[str, Any]:
    res = contrast(run_a, run_b)
    atomic_write_json(out, res)
    return res
