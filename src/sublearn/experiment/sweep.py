"""Sweeps: a grid of independent experiments (`sublearn sweep sweep.yaml --out DIR`).

    base:                 # ExperimentConfig fields shared by every run
      n: 192
      runs: 5
    grid:                 # lists; every combination is one run
      target: [owl, cat]
      seed: [0, 5]
      recipe: [soft, hard]

Each run is `run_experiment` in `DIR/runs/<name>/` (name from its grid values), in a fresh
process of a local pool (`--workers`) or as a Ray task (`--executor ray --address ...`; the
out dir must then be on storage every node sees). A run is finished when its results.json
exists: reruns skip finished runs, and unfinished ones resume from their cached stages. A
failed run is retried (`--retries`) and then reported as failed in `summary.json` /
`summary.md`, never dropped. Paths in `questions`/`candidates` (and `model` values that exist
as paths there) are relative to the YAML file's folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sublearn.config import check_setting, dataclass_settings, read_yaml_mapping
from sublearn.errors import MissingExtraError, SublearnError, first_line
from sublearn.experiment.run import ExperimentConfig
from sublearn.experiment.stages import share_stages
from sublearn.experiment.workers import PRELOAD, cpu_threads, fresh_worker_pool
from sublearn.files import atomic_write_json, atomic_write_text, ensure_writable_dir
from sublearn.models.dtype import recorded_dtype

EXECUTORS = ("local", "ray")
PATH_FIELDS = ("questions", "candidates")


@dataclass(frozen=True)
class SweepRun:
    name: str
    values: dict[str, Any]  # this run's grid values
    config: ExperimentConfig


@dataclass(frozen=True)
class SweepSpec:
    base: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)

    def expand(self) -> list[SweepRun]:
        keys = list(self.grid)
        runs = []
        for combo in itertools.product(*(self.grid[k] for k in keys)):
            values = dict(zip(keys, combo, strict=True))
            try:
                cfg = ExperimentConfig(**{**self.base, **values}).validate()
            except SublearnError as e:
                raise SublearnError(f"sweep run {values or 'base'}: {e}") from None
            runs.append(SweepRun(_run_name(values), values, cfg))
        names = [r.name for r in runs]
        # Two values with the same short form (model folders with one basename): add a hash.
        return [dataclasses.replace(r, name=f"{r.name}-{_digest(r.values)}")
                if names.count(r.name) > 1 else r for r in runs]


def _slug(v: Any) -> str:
    s = Path(v).name if isinstance(v, str) and ("/" in v or os.sep in v) else str(v)
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", s).strip("_.")[:40] or "x"


def _digest(values: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]


def _run_name(values: dict[str, Any]) -> str:
    return "__".join(f"{k}-{_slug(v)}" for k, v in values.items()) or "base"


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep YAML: only `base` and `grid`, only ExperimentConfig fields."""
    path = Path(path)
    doc = read_yaml_mapping(path)
    if set(doc) - {"base", "grid"}:
        raise SublearnError(f"{path}: expected a mapping with 'base' and 'grid' keys only")
    base, grid = doc.get("base") or {}, doc.get("grid") or {}
    if not isinstance(base, dict) or not isinstance(grid, dict):
        raise SublearnError(f"{path}: 'base' and 'grid' must be mappings")
    settings = dataclass_settings(ExperimentConfig)
    for key in [*base, *grid]:
        if key not in settings:
            raise SublearnError(f"{path}: '{key}' is not an experiment setting "
                                f"(one of: {', '.join(settings)})")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SublearnError(f"{path}: grid '{key}' must be a non-empty list")
        if len({json.dumps(v) for v in values}) != len(values):
            raise SublearnError(f"{path}: grid '{key}' repeats a value")
    here = path.resolve().parent

    def fix(key: str, v: Any) -> Any:
        v = check_setting(settings[key], v, f"{path}: {key}")
        if isinstance(v, str) and (key in PATH_FIELDS or key == "model"):
            p = Path(v).expanduser()
            if not p.is_absolute() and (key in PATH_FIELDS or (here / p).exists()):
                return str(here / p)
        return v

    return SweepSpec(base={k: fix(k, v) for k, v in base.items()},
                     grid={k: [fix(k, v) for v in vs] for k, vs in grid.items()})


# -- one run (executed in a worker process or a Ray task) --

def run_one(config: dict[str, Any], run_dir: str, threads: int = 0) -> dict[str, Any]:
    """Run one experiment; never raises, so every failure comes back as a status."""
    import contextlib

    t0 = time.time()
    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    if threads > 0 and "OMP_NUM_THREADS" not in os.environ:
        import torch  # workers x threads <= cores: oversubscription makes every run slower

        torch.set_num_threads(threads)
    with open(d / "log.txt", "a", encoding="utf-8") as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            from sublearn.experiment.run import run_experiment

            # the sweep runs experiments side by side; each makes its stages in one process
            # unless the sweep's settings give it workers
            run_experiment(ExperimentConfig(**{**config, "workers": config.get("workers") or 1}),
                           d, progress=False)
            (d / "error.txt").unlink(missing_ok=True)
            return {"ok": True, "error": None, "seconds": round(time.time() - t0, 1)}
        # SystemExit: a SIGTERM to this run's process while its own workers made stages
        # (`workers.fresh_worker_pool`): this run stopped, the sweep goes on
        except (Exception, SystemExit) as e:  # noqa: BLE001 - reported in the summary
            atomic_write_text(d / "error.txt", traceback.format_exc())
            msg = first_line(e)
            return {"ok": False, "error": f"{type(e).__name__}: {msg}"[:500],
                    "seconds": round(time.time() - t0, 1)}


Job = tuple[SweepRun, Path]
Executor = Callable[[list[Job]], dict[str, dict[str, Any]]]


def local_executor(workers: int, log: Callable[[str], None] = print) -> Executor:
    def execute(jobs: list[Job]) -> dict[str, dict[str, Any]]:
        from concurrent.futures import as_completed

        threads = cpu_threads(workers)
        out: dict[str, dict[str, Any]] = {}
        # a fresh process per run: a crashed or leaky run cannot harm the next one
        with fresh_worker_pool(min(workers, len(jobs)),
                               [*PRELOAD, "sublearn.experiment.sweep"]) as pool:
            futures = {pool.submit(run_one, dataclasses.asdict(r.config), str(d), threads): r
                       for r, d in jobs}
            for fut in as_completed(futures):
                r = futures[fut]
                try:
                    out[r.name] = fut.result()
                except Exception as e:  # BrokenProcessPool: the worker was killed (OOM?)
                    out[r.name] = {"ok": False, "seconds": None,
                                   "error": f"worker process died: {type(e).__name__}: {e}"}
                _log_result(log, r.name, out[r.name])
        return out

    return execute


def ray_executor(address: str | None, cpus_per_run: float = 1.0,
                 log: Callable[[str], None] = print) -> Executor:
    try:
        import ray
    except ModuleNotFoundError:
        raise MissingExtraError("ray", "ray") from None

    def execute(jobs: list[Job]) -> dict[str, dict[str, Any]]:
        started = not ray.is_initialized()
        if started:
            ray.init(address=address, log_to_driver=False)
        try:
            # max_retries=0: retries are the sweep's own, so they are counted and reported.
            task = ray.remote(num_cpus=cpus_per_run, max_retries=0)(run_one)
            refs = {task.remote(dataclasses.asdict(r.config), str(d.resolve())): r
                    for r, d in jobs}
            out: dict[str, dict[str, Any]] = {}
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                r = refs[ready[0]]
                try:
                    out[r.name] = ray.get(ready[0])
                except Exception as e:  # the worker or node died
                    out[r.name] = {"ok": False, "seconds": None,
                                   "error": f"ray task failed: {type(e).__name__}: "
                                            f"{first_line(e)[:300]}"}
                _log_result(log, r.name, out[r.name])
            return out
        finally:
            if started:
                ray.shutdown()

    return execute


def _log_result(log: Callable[[str], None], name: str, res: dict[str, Any]) -> None:
    if res["ok"]:
        log(f"[sweep] {name}: done ({res['seconds']} s)")
    else:
        log(f"[sweep] {name}: FAILED: {res['error']}")


# -- the sweep --

def run_sweep(spec: SweepSpec, out: str | Path, execute: Executor, retries: int = 1,
              log: Callable[[str], None] = print,
              share: bool = False) -> list[dict[str, Any]]:
    """Run every unfinished run (each up to 1 + retries times); returns the summary rows.
    share: the runs keep their stages in one cache, `out/stages` (`stages.share_stages`), so
    that runs differing only in later settings (student lr, epochs) share teachers and data."""
    if retries < 0:
        raise SublearnError("--retries must be >= 0")
    runs = spec.expand()  # a bad grid is refused before the folder is made
    out = ensure_writable_dir(out)
    atomic_write_json(out / "sweep.json", {"base": spec.base, "grid": spec.grid,
                                           "runs": [r.name for r in runs],
                                           "share_stages": share})
    dirs = {r.name: out / "runs" / r.name for r in runs}
    # dtype "auto" keeps what a run's folder was made with (`sublearn run` does the same)
    runs = [dataclasses.replace(r, config=dataclasses.replace(r.config, dtype=recorded_dtype(
        {**spec.base, **r.values}.get("dtype", "auto"), dirs[r.name] / "experiment_config.json")))
        for r in runs]
    state: dict[str, dict[str, Any]] = {}
    pending = []
    for r in runs:
        if stale := _other_config(dirs[r.name], r.config):
            # Never skip (or mix into) a folder made with other settings: report it instead.
            state[r.name] = {"status": "failed", "attempts": 0, "error": stale}
            log(f"[sweep] {r.name}: FAILED: {stale}")
        elif _finished(dirs[r.name], r.config):
            state[r.name] = {"status": "skipped", "attempts": 0, "error": None}
            log(f"[sweep] {r.name}: finished earlier, skipped")
        else:
            state[r.name] = {"status": "failed", "attempts": 0, "error": None}
            pending.append(r)
    if share:  # every run checked, then linked, before any starts
        hint = "it was run without --share-stages; sweep into another --out"
        for r in pending:
            share_stages(dirs[r.name], out / "stages", check_only=True, hint=hint)
        for r in pending:
            dirs[r.name].mkdir(parents=True, exist_ok=True)
            share_stages(dirs[r.name], out / "stages")
    for attempt in range(retries + 1):
        if not pending:
            break
        if attempt:
            log(f"[sweep] retry {attempt}/{retries}: {len(pending)} run(s)")
        results = execute([(r, dirs[r.name]) for r in pending])
        for r in pending:
            res = results.get(r.name) or {"ok": False, "error": "no result from executor"}
            state[r.name].update(attempts=state[r.name]["attempts"] + 1,
                                 status="done" if res["ok"] else "failed", error=res["error"])
        pending = [r for r in pending if state[r.name]["status"] == "failed"]
    rows = [summary_row(r, dirs[r.name], out, state[r.name]) for r in runs]
    write_summary(out, rows)
    return rows


def _finished(d: Path, cfg: ExperimentConfig) -> bool:
    """The folder holds this run's results (with as many runs: a grown --runs adds them)."""
    f = d / "results.json"
    return f.is_file() and json.loads(f.read_text()).get("config", {}).get("runs") == cfg.runs


def _other_config(d: Path, cfg: ExperimentConfig) -> str | None:
    """Why run folder `d` cannot hold this run (made with other settings), else None."""
    from sublearn.config import manifest_diff
    from sublearn.experiment.run import FREE, manifest_config

    diff = manifest_diff(d / "experiment_config.json", manifest_config(cfg), FREE)
    if not diff:
        return None
    return (f"folder holds a run with other settings (differs in: {', '.join(diff)}); "
            "use another --out or delete the run folder")


def summary_row(run: SweepRun, d: Path, out: Path, st: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"run": run.name, **{f"grid.{k}": v for k, v in run.values.items()},
                           "target": run.config.target, "status": st["status"],
                           "attempts": st["attempts"], "error": st["error"],
                           "primary_metric": None, "trait_mean": None, "control_mean": None,
                           "ratio": None, "p_value": None, "p_permutation": None,
                           "dir": str(d.relative_to(out))}
    if st["status"] != "failed":  # done or skipped: results.json exists
        res = json.loads((d / "results.json").read_text())
        primary = res["primary_metric"]
        effect = res["effects"][primary]
        row.update(primary_metric=primary, p_value=effect["p_welch"],
                   p_permutation=effect["p_permutation"], ratio=effect["ratio"]["estimate"],
                   trait_mean=res["conditions"]["trait"][primary]["mean"],
                   control_mean=res["conditions"]["control"][primary]["mean"])
    return row


def write_summary(out: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_json(out / "summary.json", rows)

    def fmt(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")[:120]

    metric = next((r["primary_metric"] for r in rows if r["primary_metric"]), "primary metric")
    cols = ["run", "target", "trait_mean", "control_mean", "p_value", "status", "attempts",
            "error"]
    lines = [f"# Sweep summary ({metric}; p: trait > control)", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    failed = sum(r["status"] == "failed" for r in rows)
    lines += ["", f"{len(rows)} runs: {len(rows) - failed} finished, {failed} failed "
              "(tracebacks in runs/<run>/error.txt)"]
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
