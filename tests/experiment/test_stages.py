"""The stage cache: a finished stage hands the heap it freed back to the OS; keys do not depend
on where the folder is, and folders keyed on spelt paths are migrated."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from sublearn.config import config_hash
from sublearn.experiment.stages import StageResult, Stages
from sublearn.memory import _libc

# Run in a fresh process: heap that earlier tests freed would otherwise absorb the allocations
# below and hide a stage that keeps what it freed.
_CHILD = r"""
import sys
from pathlib import Path
from sublearn.experiment.stages import Stages

def rss_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1e3

pinned = []

def work(d):
    # ~200 MB in heap-sized blocks (below glibc's mmap threshold), all freed but the last,
    # which pins the heap top: glibc alone keeps the freed pages resident
    blocks = [bytearray(64 * 1024) for _ in range(3000)]
    pinned.append(blocks[-1])
    return {}

before = rss_mb()
Stages(Path(sys.argv[1]), log=lambda _: None).run("work", {"x": 1}, work)
print(rss_mb() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists() or
                    getattr(_libc(), "malloc_trim", None) is None or
                    bool(sysconfig.get_config_var("Py_GIL_DISABLED")),
                    reason="needs Linux, glibc's malloc_trim and CPython's own allocator")
def test_finished_stage_returns_freed_heap(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)], capture_output=True,
                         text=True, check=True)
    assert float(out.stdout) < 80, f"{out.stdout} MB still resident after the stage"


def _legacy(root: Path, name: str, cfg: dict, output: dict) -> str:
    """A done stage as folders were made when keys were hashed on paths as spelt."""
    key = config_hash(cfg)
    d = root / "stages" / f"{name}-{key}"
    d.mkdir(parents=True)
    (d / "stage_config.json").write_text(json.dumps(cfg))
    (d / "DONE.json").write_text(json.dumps({"output": output, "seconds": 1.0, "config": cfg}))
    return key


def _legacy_chain(root: Path) -> None:
    """teacher -> data -> student -> eval, each referring to the last by path and by key, with
    paths spelt from `root` (relative, as `--out runs/x` gave them)."""
    st = f"{root}/stages"
    tk = _legacy(root, "teacher", {"lr": 1}, {"student": f"{st}/teacher-{config_hash({'lr': 1})}"
                                                         "/adapter"})
    adapter = f"{st}/teacher-{tk}/adapter"
    dk = _legacy(root, "data", {"model": adapter, "teacher": tk}, {"kept": 3})
    scfg = {"teacher": adapter, "data": dk}
    student = f"{st}/student-{config_hash(scfg)}/adapter"
    _legacy(root, "student", scfg, {"student": student})
    _legacy(root, "eval", {"model": student, "dep": student}, {"model": student, "share": 0.5})


def _chain(stages: Stages) -> list[StageResult]:
    """The same four stages as the code asks for them now (the paths from earlier outputs)."""
    def never(d: Path) -> dict:
        raise AssertionError(f"{d.name} ran: it should be cached")

    t = stages.run("teacher", {"lr": 1}, never)
    d = stages.run("data", {"model": t.output["student"], "teacher": t.key}, never)
    s = stages.run("student", {"teacher": t.output["student"], "data": d.key}, never)
    e = stages.run("eval", {"model": s.output["student"], "dep": s.output["student"]}, never)
    return [t, d, s, e]


def test_moved_folder_made_with_spelt_paths_is_migrated_to_portable_keys(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder from before portable keys, then moved: its stages are renamed to the keys the
    code now computes (dependants after what they depend on), every stage is a cache hit and
    every recorded path points into the folder where it is now."""
    monkeypatch.chdir(tmp_path)
    _legacy_chain(Path("runs") / "exp")
    moved = tmp_path / "elsewhere"
    (tmp_path / "runs" / "exp").rename(moved)
    log: list[str] = []
    t, d, s, e = _chain(Stages(moved, log=log.append))
    assert sum("->" in line for line in log) == 3  # the teacher's key holds no path
    assert t.output["student"] == str(t.dir / "adapter") and t.dir.parent == moved / "stages"
    assert s.output["student"] == str(s.dir / "adapter")
    assert e.output == {"model": s.output["student"], "share": 0.5}
    # (lock files are hidden: .migrate.lock, and .stage.lock in each stage)
    names = sorted(p.name for p in (moved / "stages").iterdir() if not p.name.startswith("."))
    assert names == sorted(["renamed.json", *(r.dir.name for r in (t, d, s, e))])
    # stored configs are the portable ones the keys are hashed on
    cfg = json.loads((e.dir / "stage_config.json").read_text())
    assert cfg["model"] == f"@stages/{s.dir.name}/adapter"
    assert config_hash(cfg) == e.key
    log.clear()
    _chain(Stages(moved, log=log.append))  # opened again: nothing left to rename
    assert not any("->" in line for line in log)
    assert sorted(p.name for p in (moved / "stages").iterdir()
                  if not p.name.startswith(".")) == names


def test_migration_killed_midway_is_finished_by_the_next_opening(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sublearn.experiment.stages as stages_mod

    _legacy_chain(tmp_path / "exp")
    real, calls = os.rename, []

    def dies_on_second(a: Path, b: Path) -> None:
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process ends between two folders' renames
        real(a, b)

    monkeypatch.setattr(stages_mod.os, "rename", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        Stages(tmp_path / "exp", log=lambda _: None)
    monkeypatch.setattr(stages_mod.os, "rename", real)
    t, d, s, e = _chain(Stages(tmp_path / "exp", log=lambda _: None))
    assert e.output["model"] == s.output["student"] == str(s.dir / "adapter")
    assert len(list((tmp_path / "exp" / "stages").glob("[!.]*"))) == 5


def test_keys_do_not_depend_on_how_the_folder_is_spelt(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    a = Stages(Path("exp"), log=lambda _: None)
    b = Stages(tmp_path / "exp", log=lambda _: None)
    for st in (a, b):
        assert st.folder("eval", {"model": f"{st.dir}/student-0123456789ab/adapter"}) == \
            st.dir / a.folder("eval", {"model": "@stages/student-0123456789ab/adapter"}).name
    # paths outside the folder are hashed as given
    assert a.folder("eval", {"model": "/models/x"}) != a.folder("eval", {"model": "/models/y"})


def test_of_two_copies_of_a_stage_the_finished_one_is_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder run once as `--out runs/exp` and once as `--out /abs/runs/exp` holds a stage
    twice under two old keys, both mapped to one new key. The finished copy takes it, though
    the unfinished one sorts first, and the other is set aside (not reprocessed)."""
    monkeypatch.chdir(tmp_path)
    root = Path("runs") / "exp"
    _legacy_chain(root)
    rel = next((root / "stages").glob("student-*"))
    cfg = json.loads((rel / "stage_config.json").read_text())
    cfg["teacher"] = str(tmp_path / cfg["teacher"])  # the same stage, spelt absolute
    other = root / "stages" / f"student-{config_hash(cfg)}"
    other.mkdir()
    (other / "stage_config.json").write_text(json.dumps(cfg))
    first, last = sorted([rel, other])
    if first == rel:  # the copy that sorts first is the unfinished one
        (rel / "DONE.json").rename(other / "DONE.json")
    log: list[str] = []
    _chain(Stages(root, log=log.append))  # every stage cached
    assert any(f"{first.name}: a second copy" in line for line in log)
    assert len(list((root / "stages" / "superseded").iterdir())) == 1
    log.clear()
    Stages(root, log=log.append)
    assert log == []


def test_out_folder_named_stages_is_migrated(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`--out runs/stages`: paths read `runs/stages/stages/<folder>`; the folder is the
    second `stages/` segment."""
    monkeypatch.chdir(tmp_path)
    _legacy_chain(Path("runs") / "stages")
    t, d, s, e = _chain(Stages(Path("runs") / "stages", log=lambda _: None))
    assert e.output["model"] == str(s.dir / "adapter")


def test_audit_finds_a_renamed_stage_of_a_moved_experiment(tmp_path: Path) -> None:
    from sublearn.experiment.stages import find_recorded

    stages = tmp_path / "exp" / "stages"
    (stages / "student-bbbbbbbbbbbb" / "adapter").mkdir(parents=True)
    (stages / "renamed.json").write_text(json.dumps({"student-aaaaaaaaaaaa":
                                                     "student-bbbbbbbbbbbb"}))
    assert find_recorded(tmp_path / "exp", "/gone/exp/stages/student-aaaaaaaaaaaa/adapter") == \
        str(stages / "student-bbbbbbbbbbbb" / "adapter")


def test_an_edited_question_file_reruns_its_evaluations(tmp_path: Path) -> None:
    """Evaluation keys hold what a questions or candidates file says, not only its path; with
    neither given, a key is what it was before the rule (older folders stay cached)."""
    from dataclasses import asdict

    from sublearn.experiment.run import eval_key
    from sublearn.pipeline.evaluate import EvalConfig

    assert eval_key(EvalConfig()) == {k: v for k, v in asdict(EvalConfig()).items()
                                      if k not in ("trait", "judge")}
    qs = tmp_path / "q.json"
    qs.write_text('["Favourite animal?", "Best animal?"]')
    cfg = EvalConfig(questions=str(qs))
    before = eval_key(cfg)
    qs.write_text('["Favourite animal?", "Worst animal?"]')
    assert eval_key(cfg) != before and eval_key(cfg)["questions"] == before["questions"]


def test_a_stage_two_processes_reach_at_once_is_made_once(tmp_path: Path) -> None:
    """Experiments sharing a stage cache: the second to reach a stage waits for the first and
    finds it done (the lock is flock, per open file: threads stand in for processes)."""
    import threading

    (tmp_path / "stages").mkdir()
    started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def slow(d: Path) -> dict:
        calls.append("first")
        started.set()
        assert release.wait(10)
        return {"made": str(d)}

    def never(d: Path) -> dict:
        calls.append("second")
        return {}

    results: dict[str, StageResult] = {}
    first = threading.Thread(target=lambda: results.update(
        first=Stages(tmp_path, log=lambda _: None).run("teacher", {"x": 1}, slow)))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=lambda: results.update(
        second=Stages(tmp_path, log=lambda _: None).run("teacher", {"x": 1}, never)))
    second.start()
    second.join(0.5)
    assert second.is_alive()  # waiting on the first's lock, not making the stage again
    release.set()
    first.join(10)
    second.join(10)
    assert calls == ["first"]
    assert not results["first"].cached and results["second"].cached
    assert results["first"].output == results["second"].output


def test_shared_stage_cache_links_and_refuses_another_home(tmp_path: Path) -> None:
    from sublearn.errors import SublearnError
    from sublearn.experiment.stages import share_stages

    cache, a, b = tmp_path / "cache", tmp_path / "a", tmp_path / "b"
    a.mkdir()
    share_stages(a, cache)
    assert (a / "stages").is_symlink() and (a / "stages").resolve() == cache.resolve()
    share_stages(a, str(cache))  # the same cache again: nothing to do
    Stages(a, log=lambda _: None).run("teacher", {"x": 1}, lambda d: {"p": str(d)})
    assert len(list(cache.glob("teacher-*/DONE.json"))) == 1
    with pytest.raises(SublearnError, match="keeps its stages in a link to"):
        share_stages(a, tmp_path / "other")
    (b / "stages").mkdir(parents=True)  # a folder that made its stages itself
    with pytest.raises(SublearnError, match="keeps its stages in its own folder"):
        share_stages(b, cache)
    assert not (tmp_path / "other").exists()  # refused before anything was made
    # the link is relative: the experiment moved together with its cache still finds it
    assert not Path(os.readlink(a / "stages")).is_absolute()
    moved = tmp_path / "moved"
    moved.mkdir()
    a.rename(moved / "a")
    cache.rename(moved / "cache")
    assert Stages(moved / "a", log=lambda _: None).run(
        "teacher", {"x": 1}, lambda d: {"p": "again"}).cached
    # moved without it: a one-line error, not a stage made outside any cache
    (moved / "a").rename(tmp_path / "alone")
    with pytest.raises(SublearnError, match="links to a stage cache that is not there"):
        Stages(tmp_path / "alone", log=lambda _: None)
