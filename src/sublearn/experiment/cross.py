"""`sublearn cross`: the paper's cross-model control as a 2 x 2 (teacher base x student base).

Each cell is a `sublearn run` with --model TEACHER --student-model STUDENT, written to
`out/<teacher>-to-<student>/`. Cells with the same teacher base share one stage cache
(`out/teachers-<teacher>/`), so their teachers and teacher data are the same: each column of
a row sees the same datasets, and only the student's base differs. Soft labels are on the
answer's characters in every cell (same-base cells too), so the diagonal and the off-diagonal
are compared on the same recipe. Expected from the paper: the diagonal transfers, the
off-diagonal does not.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sublearn.config import check_manifest, field_defaults
from sublearn.errors import SublearnError
from sublearn.experiment.report import ratio_cell
from sublearn.experiment.run import (
    FREE,
    ExperimentConfig,
    check_char_tokens,
    manifest_config,
    run_experiment,
    settled,
)
from sublearn.files import atomic_write_json, atomic_write_text, check_out_dir, locked_out_dir

# the ExperimentConfig flags that `cross` sets per cell
CELL_FIELDS = ("model", "student_model", "labels")


@dataclass(frozen=True)
class CrossConfig:
    models: str = field(default="smollm2-135m-instruct,gemma3-270m", metadata={
        "help": "comma-separated bases; every pair (teacher, student) is a cell"})
    teachers: str | None = field(default=None, metadata={
        "help": "comma-separated teacher bases to run now, a subset of --models (default: "
                "all); a later call with the others adds their rows to the same folder"})

    def model_list(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]

    def teacher_list(self) -> list[str]:
        return [m.strip() for m in self.teachers.split(",")] if self.teachers \
            else self.model_list()

    def validate(self) -> CrossConfig:
        models = self.model_list()
        if len(models) < 2 or len(set(models)) != len(models):
            raise SublearnError("--models: give at least two different bases, comma-separated")
        if not set(self.teacher_list()) <= set(models):
            raise SublearnError("--teachers must be a subset of --models")
        if len({slug(m) for m in models}) != len(models) or any("-to-" in m for m in models):
            raise SublearnError("--models: each base needs its own folder name (the last part "
                                "of its name or path, without '-to-')")
        return self


def slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model.strip("/").split("/")[-1])


def cell_config(cfg: ExperimentConfig, teacher: str, student: str) -> ExperimentConfig:
    labels = "chars" if cfg.recipe == "soft" else "auto"
    return replace(cfg, model=teacher, student_model=student, labels=labels)


def run_cross(cross: CrossConfig, cfg: ExperimentConfig, out: str | Path,
              progress: bool = True) -> dict[str, Any]:
    cross = cross.validate()
    cfg = replace(cfg, dtype=settled(cfg, Path(out) / "cross_config.json",
                                     "experiment").dtype)  # cells validate with their own bases
    if cfg.domain != "numbers" and cfg.recipe == "soft":
        raise SublearnError("sublearn cross: soft labels across tokenizers are defined for "
                            "number answers; use --recipe hard for other domains")
    models = cross.model_list()
    for t in models:  # every cell's settings, checked before hours of training
        for s in models:
            cell_config(cfg, t, s).validate()
    if cfg.recipe == "soft":
        check_char_tokens(models)
    with locked_out_dir(check_out_dir(out)) as out:
        check_manifest(out, "cross_config.json",
                       {"models": models, "experiment": asdict(manifest_config(
                           replace(cfg.validate(), **{f: None for f in CELL_FIELDS[:2]},
                                   labels="auto")))}, FREE,
                       defaults={"experiment": field_defaults(ExperimentConfig)})
        for t in cross.teacher_list():
            for s in models:
                run_experiment(cell_config(cfg, t, s), out / f"{slug(t)}-to-{slug(s)}",
                               progress, stages_root=out / f"teachers-{slug(t)}")
        res = collect(out, models)
        atomic_write_json(out / "cross.json", res)
        atomic_write_text(out / "cross.md", format_report(res))
        return res


def collect(out: Path, models: list[str]) -> dict[str, Any]:
    """The 2 x 2 from the cells' results.json (cells not yet run are left out)."""
    import json

    cells = []
    for t in models:
        for s in models:
            f = out / f"{slug(t)}-to-{slug(s)}" / "results.json"
            if not f.is_file():
                continue
            r = json.loads(f.read_text())
            pm = r["primary_metric"]
            e = r["effects"][pm]
            cells.append({
                "teacher": t, "student": s, "same_base": t == s, "metric": pm,
                "trait": r["conditions"]["trait"][pm]["mean"],
                "control": r["conditions"]["control"][pm]["mean"],
                "base": r["conditions"]["base"][pm]["mean"],
                "difference": e["difference"], "ratio": e["ratio"],
                "p_welch": e["p_welch"], "p_permutation": e["p_permutation"], "n": e["n"],
                "results": str(f.relative_to(out)),
            })
    return {"models": models, "unit": "run (teacher, its data, its student), as in "
            "`sublearn run`; cells in a row share teachers and data", "cells": cells}


def format_report(res: dict[str, Any]) -> str:
    lines = ["# Cross-model control", "",
             "Teacher base x student base; trait vs control runs in each cell, "
             f"{res['unit']}.", "",
             "| teacher | student | same base | trait | control | ratio [95% CI] | "
             "p Welch | p permutation | runs |", "|---|---|---|---|---|---|---|---|---|"]
    for c in res["cells"]:
        rs = ratio_cell(c["ratio"])
        lines.append(f"| {c['teacher']} | {c['student']} | {'yes' if c['same_base'] else 'no'} "
                     f"| {c['trait']:.4f} | {c['control']:.4f} | {rs} | {c['p_welch']:.3g} | "
                     f"{c['p_permutation']:.3g} | {c['n'][0]} + {c['n'][1]} |")
    return "\n".join(lines) + "\n"
