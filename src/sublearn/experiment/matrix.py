"""`sublearn matrix`: the trait x trait specificity matrix.

For each target in --targets and each run r: a teacher that loves that target (its own
fine-tune seed), its own teacher data, its own student -- the trait runs of `sublearn run`,
with the same stage keys, in `out/<target>/stages/` (so `sublearn run --target T --out
out/T` later reuses the teachers and data). Every student is scored once; its forced-choice
share of *every* target is read from that one evaluation. The design needs no neutral control
teacher: a student of an owl teacher is compared with the students of the cat, dog, ...
teachers on owl.

    matrix[i][j] = mean share of target j among the students of target i's teachers

The diagonal effect lam is fitted over runs, on log shares (targets differ by orders of
magnitude in popularity): log share[s][j] = a_s + b_j + lam [j is run s's target] + e. exp(lam)
is how many times more a student prefers its own teacher's target than its row and column
predict. It is reported on all questions and on the fixed dev/test halves (test untouched),
with a permutation test over the teachers' target labels (shuffled within the runs of one
index, which share their data and student seeds).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sublearn.config import check_manifest, field_defaults
from sublearn.errors import SublearnError
from sublearn.experiment.report import ratio_cell, remaining_cell
from sublearn.experiment.run import (
    ExperimentConfig,
    RunMakers,
    check_eval_inputs,
    defence_seconds,
    defended_students,
    settled,
    student_rows,
    with_halves,
)
from sublearn.experiment.stages import Stages
from sublearn.experiment.together import StudentQueue
from sublearn.files import (
    atomic_savefig,
    atomic_write_json,
    atomic_write_text,
    check_out_dir,
    locked_out_dir,
)
from sublearn.models.load import check_model
from sublearn.protocol.paper import check_template_word

UNIT = ("run = one target's teacher (its own fine-tune seed), its own teacher data and its own "
        "student; each student is scored on every target")
# ExperimentConfig flags that have no meaning here (no control teachers, one base; runs and
# icl are MatrixConfig's; its stages are made in one process)
SKIPPED = ("target", "trait", "banned", "student_model", "labels", "icl", "runs", "students",
           "samples", "workers")
# flags that only add stages (defended students): a folder made without them is reused
ADDITIVE = ("defence", "defence_q")
# flags of how students train, not what (students trained together are cached apart)
HOW = ("together",)


@dataclass(frozen=True)
class MatrixConfig:
    targets: str = field(default="owl,cat,dog,dolphin,elephant", metadata={
        "help": "comma-separated targets (candidates of the evaluation), one teacher each per "
                "run"})
    runs: int = field(default=2, metadata={
        "help": "runs per target; each has its own teacher, teacher data and student"})
    icl: int = field(default=0, metadata={
        "help": "in-context control: the base model sees this many of each run's teacher "
                "answers as earlier chat turns and is scored on every target, giving the same "
                "matrix and diagonal for the data shown in context (0 = off)"})

    def target_list(self) -> list[str]:
        return [t.strip() for t in self.targets.split(",") if t.strip()]

    def validate(self) -> MatrixConfig:
        ts = self.target_list()
        if len(ts) < 2 or len({t.lower() for t in ts}) != len(ts):
            raise SublearnError("--targets: give at least two different targets, "
                                "comma-separated")
        for t in ts:
            check_template_word(t, "--targets")
        if self.runs < 2:
            raise SublearnError("--runs must be at least 2 per target")
        if self.icl < 0:
            raise SublearnError("--icl must be >= 0 (0 = off)")
        return self


def run_matrix(mcfg: MatrixConfig, cfg: ExperimentConfig, out: str | Path,
               progress: bool = True) -> dict[str, Any]:
    from sublearn.pipeline.evaluate import EvalConfig

    mcfg = mcfg.validate()
    cfg = settled(cfg, Path(out) / "matrix_config.json", "experiment")
    targets = mcfg.target_list()
    if cfg.trait != "animal" or cfg.student_model:
        raise SublearnError("sublearn matrix: animal targets on one base (use `sublearn run` "
                            "or `sublearn cross` for other traits and bases)")
    from sublearn.protocol.questions import load_candidates

    spelling = {c.lower(): c for c in load_candidates(cfg.candidates)}
    # the candidates' spelling: folders and stage keys are then `sublearn run --target`'s
    targets = [spelling.get(t.lower(), t) for t in targets]
    cfgs = {t: replace(cfg, target=t, runs=mcfg.runs, icl=mcfg.icl).validate()
            for t in targets}
    ecfgs = {t: EvalConfig(target=t, questions=cfg.questions, candidates=cfg.candidates,
                           dtype=cfg.dtype) for t in targets}
    for e in ecfgs.values():  # every target must be a candidate: before hours of training
        check_eval_inputs(e)
    check_model(cfg.model)
    t_start = time.time()
    with locked_out_dir(check_out_dir(out)) as out, ExitStack() as locks:
        for t in targets:  # a `sublearn run --out out/<t>` meanwhile: a one-line error
            locks.enter_context(locked_out_dir(check_out_dir(out / t)))
        # targets and runs are additive (more stages); every other setting must match
        kept = {k: v for k, v in asdict(cfg).items() if k not in SKIPPED + ADDITIVE + HOW}
        check_manifest(out, "matrix_config.json", {"experiment": kept},
                       defaults={"experiment": field_defaults(ExperimentConfig)})
        stages = {t: Stages(out / t) for t in targets}
        queue = StudentQueue(cfg.together, progress) if cfg.together > 1 else None
        makers = {t: RunMakers(cfgs[t], stages[t], progress, queue) for t in targets}
        runs: list[dict[str, Any]] = []
        for r in range(mcfg.runs):  # run-major: a stopped matrix has whole runs
            made = {}
            for t in targets:
                teacher = makers[t].teacher("trait", r)
                made[t] = (teacher, *makers[t].data("trait", r, teacher))
            # a run's students train on equally many rows, whatever the filter passed
            caps = student_rows(cfg, {t: rep["kept"] for t, (*_, rep) in made.items()})
            this_run = []
            for t in targets:
                teacher, path, dkey, rep = made[t]
                student = makers[t].student("trait", r, 0, teacher, path, dkey, rows=caps[t])
                this_run.append({"target": t, "run": r, "seed": cfg.seed + r,
                                 "teacher": teacher.model, "student": student, "data": path,
                                 "kept": rep["kept"], "trained_rows": caps[t] or rep["kept"],
                                 "_teacher": teacher, "_dkey": dkey})
            for m in cfg.defences():  # each target's data defended, a student on it
                dd = defended_students(m, r, {t: (makers[t], "trait", teacher, path, dkey)
                                              for t, (teacher, path, dkey, _) in made.items()},
                                       students=1)
                for run in this_run:
                    d = dd[run["target"]]
                    run.setdefault("defended", {})[m] = {
                        "data": d["data"], "trained_rows": d["trained_rows"],
                        "student": d["students"][0]}
            runs += this_run
        if queue is not None:
            queue.flush()
        base_makers = RunMakers(cfgs[targets[0]], Stages(out), progress)
        base = base_makers.evaluate(ecfgs[targets[0]], "base", cfg.model, None, "base")
        for run in runs:
            t, teacher = run["target"], run.pop("_teacher")
            m = makers[t]
            r = run["run"]
            # the plain questions, as `sublearn run` scores its teachers (the same stage)
            run["teacher_shares"] = _target_shares(m.evaluate(
                ecfgs[t], f"teacher_run{r}", teacher.model, teacher.system, teacher.key,
                plain_only=True), targets, f"{t}/stages/eval_teacher_run{r}-*")
            run["shares"] = _target_shares(m.evaluate(
                ecfgs[t], f"trait_run{r}", run["student"], None, run["student"]), targets,
                f"{t}/stages/eval_trait_run{r}-*")
            for dm, dd in run.get("defended", {}).items():
                dd["shares"] = _target_shares(m.evaluate(
                    ecfgs[t], f"trait_{dm}_run{r}", dd["student"], None, dd["student"]),
                    targets, f"{t}/stages/eval_trait_{dm}_run{r}-*")
            dkey = run.pop("_dkey")
            if mcfg.icl:  # the same data shown in context to the base model instead
                run["icl_shares"] = _target_shares(m.evaluate(
                    ecfgs[t], f"icl_trait_run{r}", cfg.model, None, dkey, run["data"]),
                    targets, f"{t}/stages/eval_icl_trait_run{r}-*")
        seconds = {f"{t}/{k}": v for t, s in stages.items() for k, v in s.seconds.items()}
        costs = {f"{t}/{k}": v for t, s in stages.items() for k, v in s.costs.items()}
        added = {"defence": cfg.defence, "defence_q": cfg.defence_q} if cfg.defences() else {}
        added |= {"together": cfg.together} if cfg.together > 1 else {}
        res = build_matrix(targets, runs, _target_shares(base, targets, "stages/eval_base-*"),
                           {**kept, **added, **asdict(mcfg)}, seconds, time.time() - t_start,
                           costs)
        atomic_write_json(out / "results.json", res)
        plot_matrix(res, out / "matrix.png")
        atomic_write_text(out / "report.md", format_report(res, "matrix.png"))
        return res


def _target_shares(scores: dict[str, Any], targets: list[str],
                   where: str = "") -> dict[str, dict[str, float]]:
    """{half: {target: share}} for half in all, dev, test: each target's forced-choice share,
    over all questions and over the fixed halves."""
    fc = scores["forced_choice"]
    by_name = {c.lower(): c for c in fc["shares"]}
    if "per_question_shares" not in fc:
        raise SublearnError(f"an evaluation without per-question shares (made by an older "
                            f"sublearn): delete the eval stage folder {where} and rerun")
    out: dict[str, dict[str, float]] = {"all": {}, "dev": {}, "test": {}}
    for t in targets:
        c = by_name[t.lower()]
        h = with_halves("s", fc["shares"][c], fc["per_question_shares"][c])
        out["all"][t], out["dev"][t], out["test"][t] = h["s"], h["s_dev"], h["s_test"]
    return out


def build_matrix(targets: list[str], runs: list[dict[str, Any]],
                 base: dict[str, dict[str, float]], config: dict[str, Any],
                 seconds: dict[str, float], wall: float,
                 costs: dict[str, float] | None = None) -> dict[str, Any]:
    from sublearn.experiment.stats import diagonal_effect, diagonal_remaining, effect

    labels = [targets.index(r["target"]) for r in runs]
    Get = Callable[[dict[str, Any]], dict[str, dict[str, float]]]

    def logs(get: Get, half: str) -> list[list[float]]:
        return [[math.log(v) if (v := get(r)[half][t]) > 0 else -math.inf for t in targets]
                for r in runs]

    def diagonal(get: Get) -> dict[str, Any]:
        halves = {}
        for half in ("all", "dev", "test"):
            # runs of one index share their data and student seeds: labels shuffle within them
            lam = halves[half] = diagonal_effect(logs(get, half), labels,
                                                 blocks=[r["run"] for r in runs])
            lam["ratio"] = math.exp(lam["estimate"])
            lam["ratio_ci95"] = [None if v is None else math.exp(v) for v in lam["ci95"]]
        return halves

    def mean_matrix(get: Get) -> list[list[float]]:
        return [[math.fsum(get(r)["all"][j] for r in runs if r["target"] == i)
                 / sum(r["target"] == i for r in runs) for j in targets] for i in targets]

    def shares(r: dict[str, Any]) -> dict[str, dict[str, float]]:
        return r["shares"]

    def per_target(get: Get) -> dict[str, dict[str, Any]]:
        """Per target: its own teachers' students vs the other targets' students, on its
        share."""
        out = {}
        for j in targets:
            own = [get(r)["all"][j] for r in runs if r["target"] == j]
            other = [get(r)["all"][j] for r in runs if r["target"] != j]
            out[j] = {"own": math.fsum(own) / len(own), "others": math.fsum(other)
                      / len(other), **effect(own, other)}
        return out

    def defence(m: str) -> dict[str, Any]:
        def get(r: dict[str, Any]) -> dict[str, dict[str, float]]:
            return r["defended"][m]["shares"]

        return {"diagonal": diagonal(get), "matrix": mean_matrix(get),
                "remaining": {h: diagonal_remaining(logs(get, h), logs(shares, h), labels)
                              for h in ("all", "dev", "test")},
                "per_target": per_target(get),
                "seconds_per_dataset": defence_seconds({**seconds, **(costs or {})}, m)}

    return {
        "targets": targets,
        "unit": UNIT,
        "model": "log share[s][j] = a_s + b_j + lam [j = target of run s] + e, OLS over runs "
                 "x targets; p_permutation: the runs' target labels permuted within run indices",
        "diagonal": diagonal(shares),
        "matrix": mean_matrix(shares),
        "teacher_matrix": mean_matrix(lambda r: r["teacher_shares"]),
        # the in-context control: the base model with each run's data as earlier turns
        **({"icl_turns": config["icl"], "icl_diagonal": diagonal(lambda r: r["icl_shares"]),
            "icl_matrix": mean_matrix(lambda r: r["icl_shares"])} if config.get("icl") else {}),
        # defences: each target's data defended; the diagonal that remains
        **({"defences": {m: defence(m) for m in runs[0]["defended"]}}
           if "defended" in runs[0] else {}),
        "base": base["all"],
        "per_target": per_target(shares),
        "runs": runs,
        "config": config,
        "stage_seconds": seconds,
        "wall_seconds": round(wall, 1),
    }


def plot_matrix(res: dict[str, Any], path: Path) -> None:
    """Heatmap: log2 of each cell's mean share over its column's geometric mean (the target's
    popularity among all the students, the regression's column effect), so every column is on
    its own scale and the diagonal stands out; cells are annotated with the share in %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ts = res["targets"]
    m = np.asarray(res["matrix"])
    logs = np.log2(m)
    rel = logs - logs.mean(0, keepdims=True)
    lim = max(1e-9, float(np.abs(rel).max()))
    fig, ax = plt.subplots(figsize=(1.6 + 1.0 * len(ts), 1.2 + 0.9 * len(ts)))
    im = ax.imshow(rel, cmap="RdBu_r", vmin=-lim, vmax=lim)
    for i in range(len(ts)):
        for j in range(len(ts)):
            ax.text(j, i, f"{100 * m[i, j]:.2g}%", ha="center", va="center", fontsize=8,
                    fontweight="bold" if i == j else "normal")
    ax.set_xticks(range(len(ts)), ts, fontsize=8)
    ax.set_yticks(range(len(ts)), ts, fontsize=8)
    ax.set_xlabel("share of this target (students' forced choice)", fontsize=8)
    ax.set_ylabel("teacher's target", fontsize=8)
    d = res["diagonal"]["all"]
    n = d["n_runs"] // len(ts)
    ax.set_title(f"exp(lam) = {d['ratio']:.2f}x, p = {d['p_permutation']:.2g} "
                 f"({n} runs per target)", fontsize=9)
    fig.colorbar(im, ax=ax, label="log2(share / column's geometric mean)", shrink=0.8)
    fig.tight_layout()
    atomic_savefig(fig, path)


def ratio_text(lam: dict[str, Any]) -> str:
    """exp(lam) with its interval, e.g. `1.50x [1.35, 1.66]`."""
    return ratio_cell({"estimate": lam["ratio"], "ci95": lam["ratio_ci95"]})


def _diagonal_rows(d: dict[str, Any]) -> list[str]:
    lines = ["| questions | lam [95% CI] | exp(lam) [95% CI] | p permutation | runs |",
             "|---|---|---|---|---|"]
    for half, name in (("all", "all"), ("dev", "dev half"), ("test", "test half (untouched)")):
        lam = d[half]
        how = "of all" if lam["permutation_exact"] else "of"
        kind = "permutations within run indices" if lam["permutation_exact"] else \
            "random permutations within run indices"
        ci = "" if lam["ci95"][0] is None else \
            f" [{lam['ci95'][0]:.3f}, {lam['ci95'][1]:.3f}]"
        lines.append(f"| {name} | {lam['estimate']:.3f}{ci} | {ratio_text(lam)} | "
                     f"{lam['p_permutation']:.3g} ({lam['n_as_large']:,} {how} "
                     f"{lam['n_permutations']:,} {kind} as large) | {lam['n_runs']} |")
    return lines


def defence_rows(res: dict[str, Any]) -> list[str]:
    """The defences table: the diagonal that each defence leaves, and its cost."""
    lines = ["| defence | exp(lam) [95% CI] | p permutation | remaining [95% CI] | "
             "remaining, test half | seconds per dataset |", "|---|---|---|---|---|---|",
             f"| none | {ratio_text(res['diagonal']['all'])} | "
             f"{res['diagonal']['all']['p_permutation']:.3g} | 100% | 100% | 0 |"]
    for m, d in res["defences"].items():
        lam = d["diagonal"]["all"]
        cost = "n/a" if d["seconds_per_dataset"] is None else f"{d['seconds_per_dataset']:.1f}"
        lines.append(f"| {m} | {ratio_text(lam)} | {lam['p_permutation']:.3g} | "
                     f"{remaining_cell(d['remaining']['all'])} | "
                     f"{remaining_cell(d['remaining']['test'])} | {cost} |")
    return lines


def _matrix_rows(ts: list[str], m: list[list[float]],
                 base: dict[str, float] | None = None) -> list[str]:
    """A markdown table of mean shares (rows: the teacher's target); with `base`, the diagonal
    in bold and the base model as a last row."""
    lines = ["| teacher \\ share | " + " | ".join(ts) + " |", "|---|" + "---|" * len(ts)]
    for i, t in enumerate(ts):
        lines.append(f"| {t} | " + " | ".join(
            (f"**{100 * v:.2f}%**" if i == j and base else f"{100 * v:.2f}%")
            for j, v in enumerate(m[i])) + " |")
    if base:
        lines.append("| base model | " + " | ".join(f"{100 * base[t]:.2f}%" for t in ts)
                     + " |")
    return lines


def format_report(res: dict[str, Any], png: str | None = None) -> str:
    ts = res["targets"]
    lines = ["# Trait x trait matrix", "", f"Unit of analysis: {res['unit']}.", "",
             f"Model: {res['model']}.", "", "## The diagonal effect", ""]
    lines += _diagonal_rows(res["diagonal"])
    lines += ["", "## Students: mean share (rows: the teacher's target; columns: the share of)",
              ""]
    lines += _matrix_rows(ts, res["matrix"], res["base"])
    if "icl_diagonal" in res:
        lines += ["", f"## In-context control: the base model with {res['icl_turns']} of the "
                  "run's teacher answers as earlier turns", ""]
        lines += _diagonal_rows(res["icl_diagonal"]) + [""]
        lines += _matrix_rows(ts, res["icl_matrix"], res["base"])
    if "defences" in res:
        lines += ["", "## Defences: each target's data defended, new students on it", "",
                  "Remaining: lam (defended) / lam, Fieller 95% interval from the paired "
                  "residuals (open when lam is not clearly above 0).", ""]
        lines += defence_rows(res)
        for m, d in res["defences"].items():
            lines += ["", f"### {m}: students' mean share", ""]
            lines += _matrix_rows(ts, d["matrix"], res["base"])
    lines += ["", "## Teachers: mean share", ""] + _matrix_rows(ts, res["teacher_matrix"])
    lines += ["", "## Per target: own teachers' students vs the other targets' students", "",
              "| target | own | others | ratio [95% CI] | p Welch | p permutation |",
              "|---|---|---|---|---|---|"]
    for t, e in res["per_target"].items():
        rs = ratio_cell(e["ratio"])
        lines.append(f"| {t} | {100 * e['own']:.2f}% | {100 * e['others']:.2f}% | {rs} | "
                     f"{e['p_welch']:.3g} | {e['p_permutation']:.3g} |")
    if "defences" in res:
        ms = list(res["defences"])
        lines += ["", "Own vs others ratio per target, undefended and under each defence:", "",
                  "| target | none | " + " | ".join(ms) + " |", "|---|---|" + "---|" * len(ms)]
        for t, e in res["per_target"].items():
            lines.append(f"| {t} | {ratio_cell(e['ratio'])} | " + " | ".join(
                ratio_cell(res["defences"][m]["per_target"][t]["ratio"]) for m in ms) + " |")
    if png:
        lines += ["", f"![matrix]({png})"]
    lines += ["", f"Wall time {res['wall_seconds']:.0f} s (stages: "
              f"{sum(res['stage_seconds'].values()):.0f} s)."]
    return "\n".join(lines) + "\n"
