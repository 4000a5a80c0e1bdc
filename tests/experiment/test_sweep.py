"""`sublearn sweep` on the tiny model with the local process pool: expansion, a run that
fails (and is retried and reported), skipping finished runs on a rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sublearn.cli import main
from sublearn.errors import SublearnError
from sublearn.experiment.sweep import SweepSpec, load_spec

# min_grammar_share 0: the tiny random model's answers are all the grammar's
FAST = {"n": 8, "runs": 2, "epochs": 1, "batch_size": 4, "teacher_mode": "prompted",
        "recipe": "hard", "min_grammar_share": 0.0}


def _yaml(path: Path, base: dict, grid: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"base": base, "grid": grid}))
    return path


def test_expand_names_and_validation(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = SweepSpec(base={"n": 8}, grid={"target": ["owl", "cat"], "seed": [0, 1],
                                           "model": ["/a/m", "/b/m"]})
    runs = spec.expand()
    assert len(runs) == 8 and len({r.name for r in runs}) == 8
    assert runs[0].name.startswith("target-owl__seed-0__model-m-")  # hashed: same basename
    assert runs[0].config.n == 8 and runs[-1].config.target == "cat"
    assert [r.name for r in SweepSpec(grid={"recipe": ["soft"]}).expand()] == ["recipe-soft"]

    spec_file = _yaml(tmp_path / "ok.yaml", {"n": 8}, {"target": ["owl", "cat"]})
    assert main(["sweep", str(spec_file), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    assert not (tmp_path / "o").exists()
    assert capsys.readouterr().out.splitlines()[0] == "target-owl: {'target': 'owl'}"

    bad = [({"grid": {"taget": ["owl"]}}, "'taget' is not an experiment setting"),
           ({"grid": {"target": "owl"}}, "must be a non-empty list"),
           ({"base": {"runs": "2"}}, "runs must be int, got '2'"),
           ({"base": {"lr": True}}, "lr must be float, got True"),
           ({"grid": {"runs": [1]}}, "--runs must be at least 2"),
           ({"grid": {"recipe": ["sof"]}}, r"recipe must be one of \['soft', 'hard'\], got 'sof'"),
           ({"other": 1}, "'base' and 'grid' keys only")]
    for i, (doc, msg) in enumerate(bad):
        p = tmp_path / f"bad{i}.yaml"
        p.write_text(json.dumps(doc))
        with pytest.raises(SublearnError, match=msg):
            load_spec(p).expand()


def test_sweep_failure_reported_and_rerun_skips(tiny_model: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "good.json").write_text(json.dumps(["owl", "cat", "dog"]))
    (tmp_path / "bad.json").write_text(json.dumps(["cat", "dog"]))  # lacks the target
    spec = _yaml(tmp_path / "sweep.yaml", {**FAST, "model": tiny_model, "target": "owl"},
                 {"candidates": ["good.json", "bad.json"]})  # relative to the YAML
    out = tmp_path / "sweep"
    args = ["sweep", str(spec), "--out", str(out), "--workers", "1", "--retries", "1"]
    assert main(args) == 1  # one run failed
    log = capsys.readouterr().out
    assert "candidates-bad.json: FAILED" in log and "retry 1/1: 1 run(s)" in log

    rows = {r["run"]: r for r in json.loads((out / "summary.json").read_text())}
    good, bad = rows["candidates-good.json"], rows["candidates-bad.json"]
    assert good["status"] == "done" and good["attempts"] == 1
    assert good["primary_metric"] == "forced_choice_share"
    assert 0 <= good["trait_mean"] <= 1 and 0 <= good["control_mean"] <= 1
    assert 0 <= good["p_value"] <= 1
    # a sweep's experiment makes its stages in one process (the sweep runs several at once)
    assert json.loads((out / good["dir"] / "results.json").read_text())["workers"] == \
        {"processes": 1}
    assert bad["status"] == "failed" and bad["attempts"] == 2 and bad["trait_mean"] is None
    assert "does not include the target 'owl'" in bad["error"]
    assert "Traceback" in (out / bad["dir"] / "error.txt").read_text()
    md = (out / "summary.md").read_text()
    assert "| candidates-bad.json | owl |" in md and "1 failed" in md

    # Rerun: the finished run is skipped (not rerun), the failed one is tried again.
    results = (out / good["dir"] / "results.json").stat().st_mtime_ns
    assert main(args[:-2] + ["--retries", "0"]) == 1
    log = capsys.readouterr().out
    assert "candidates-good.json: finished earlier, skipped" in log
    rows = {r["run"]: r for r in json.loads((out / "summary.json").read_text())}
    assert rows["candidates-good.json"]["status"] == "skipped"
    assert rows["candidates-good.json"]["trait_mean"] == good["trait_mean"]
    assert rows["candidates-bad.json"]["attempts"] == 1
    assert (out / good["dir"] / "results.json").stat().st_mtime_ns == results

    # Changed base settings: the finished run is not silently reused, it is reported.
    spec.write_text(spec.read_text().replace("epochs: 1", "epochs: 2"))
    assert main(args[:-2] + ["--retries", "0"]) == 1
    rows = {r["run"]: r for r in json.loads((out / "summary.json").read_text())}
    assert rows["candidates-good.json"]["status"] == "failed"
    assert "differs in: epochs" in rows["candidates-good.json"]["error"]


def test_ray_missing_gives_pip_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)
    spec = _yaml(tmp_path / "s.yaml", FAST, {"target": ["owl"]})
    assert main(["sweep", str(spec), "--out", str(tmp_path / "o"), "--executor", "ray"]) == 2
    assert 'pip install "sublearn[ray]"' in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_on_local_ray(tiny_model: str, tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")  # no telemetry from tests
    from sublearn.experiment.sweep import ray_executor, run_sweep

    (tmp_path / "bad.json").write_text(json.dumps(["cat"]))
    spec = load_spec(_yaml(tmp_path / "s.yaml", {**FAST, "model": tiny_model},
                           {"candidates": [None, "bad.json"]}))
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        rows = run_sweep(spec, tmp_path / "out", ray_executor(None), retries=0)
    finally:
        ray.shutdown()
    assert [r["status"] for r in rows] == ["done", "failed"]


def test_resumed_sweep_keeps_each_folders_dtype(tmp_path: Path) -> None:
    """A run folder made in one dtype is resumed in it when the sweep's dtype is auto (as
    `sublearn run` does), not reported as made with other settings."""
    from dataclasses import asdict, replace

    from sublearn.experiment.run import manifest_config
    from sublearn.experiment.sweep import run_sweep
    from sublearn.models.dtype import settle_dtype

    other = "bfloat16" if settle_dtype("auto") == "float32" else "float32"
    spec = SweepSpec(base=FAST, grid={"target": ["owl"]})
    (r,) = spec.expand()
    d = tmp_path / "out" / "runs" / r.name
    d.mkdir(parents=True)
    (d / "experiment_config.json").write_text(json.dumps(
        asdict(manifest_config(replace(r.config, dtype=other)))))
    seen = []

    def execute(jobs: list) -> dict:
        seen.extend(job[0].config.dtype for job in jobs)
        return {job[0].name: {"ok": False, "error": "not run here"} for job in jobs}

    rows = run_sweep(spec, tmp_path / "out", execute, retries=0, log=lambda s: None)
    assert seen == [other]  # sent to run in the folder's dtype, not refused as stale
    assert rows[0]["error"] == "not run here"


def test_sweep_runs_share_one_stage_cache(tiny_model: str, tmp_path: Path) -> None:
    """--share-stages: runs that differ only in the students' settings make their teacher
    data once; each run's folder links to the sweep's stage cache. Two worker processes
    reach the same data stages at once: each stage is made by one and found by the other."""
    spec = _yaml(tmp_path / "sweep.yaml", {**FAST, "model": tiny_model, "target": "owl",
                                           "icl": 0}, {"epochs": [1, 2]})
    out = tmp_path / "sweep"
    assert main(["sweep", str(spec), "--out", str(out), "--share-stages", "--workers", "2"]) == 0
    stages = out / "stages"
    logs = ""
    for r in ("epochs-1.0", "epochs-2.0"):
        assert (out / "runs" / r / "stages").resolve() == stages.resolve()
        logs += (out / "runs" / r / "log.txt").read_text()
    assert len(list(stages.glob("data_*/DONE.json"))) == 4  # 2 runs x trait/control, once
    assert len(list(stages.glob("student_*/DONE.json"))) == 8  # each epochs setting its own
    for stage in ("data_trait_run0", "data_control_run1"):
        assert logs.count(f"[stage] {stage} ") == 1 and logs.count(f"[cached] {stage}\n") == 1
    # a run folder that made its own stages is not silently moved into the cache
    (out / "runs" / "epochs-3.0" / "stages").mkdir(parents=True)
    spec = _yaml(tmp_path / "sweep.yaml", {**FAST, "model": tiny_model, "target": "owl",
                                           "icl": 0}, {"epochs": [1, 2, 3]})
    assert main(["sweep", str(spec), "--out", str(out), "--share-stages"]) == 2


def test_a_stopped_run_is_a_failed_run_not_the_end_of_the_sweep(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run with workers of its own turns a SIGTERM into SystemExit (so its workers stop);
    in a sweep that is one run's failure, reported, and the others go on."""
    from sublearn.experiment import run, sweep

    def stopped(*args: object, **kwargs: object) -> None:
        raise SystemExit(143)

    monkeypatch.setattr(run, "run_experiment", stopped)
    res = sweep.run_one({"target": "owl"}, str(tmp_path / "r"))
    assert res["ok"] is False and res["error"] == "SystemExit: 143"
    assert "SystemExit" in (tmp_path / "r" / "error.txt").read_text()
