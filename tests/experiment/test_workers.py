"""The pool that makes an experiment's stages (`sublearn run --workers`): dependencies, tasks
already done, a task's error and a dead worker; then `sublearn run` with two workers against
one process on a tiny model: the same stages, the same bytes from fresh processes, and a run
whose worker was killed resumed to those bytes."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sublearn.errors import SublearnError
from sublearn.experiment.workers import Task, run_tasks


def _make(folder: str, name: str) -> dict:
    """A task that notes when it started and ended (in the worker)."""
    start = time.time()
    if name == "fails":
        raise SublearnError("task 'fails' failed")
    if name == "dies":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.3)
    Path(folder, name).write_text(json.dumps({"start": start, "end": time.time(),
                                              "pid": os.getpid()}))
    return {"peak_rss": {name: 0.1}, "made": [name],
            "log": [f"[stage] {name}", f"mark {os.environ.get('SUBLEARN_TEST_MARK')}"]}


def _made(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


def test_tasks_wait_for_what_they_need_and_skip_what_is_done(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture
                                                             ) -> None:
    from functools import partial

    tasks = [Task("a"), Task("b"), Task("c", ("a", "b")), Task("d", ("c",)), Task("e")]
    out = run_tasks(tasks, partial(_make, str(tmp_path)), lambda name: name == "b", 2,
                    progress=False)
    assert out["made"] == {"a", "c", "d", "e"} and set(out["by_stage"]) == out["made"]
    assert not (tmp_path / "b").exists()  # done already: not given out
    assert _made(tmp_path, "c")["start"] >= _made(tmp_path, "a")["end"]
    assert _made(tmp_path, "d")["start"] >= _made(tmp_path, "c")["end"]
    pids = {_made(tmp_path, n)["pid"] for n in "acde"}
    assert len(pids) == 4 and os.getpid() not in pids  # a fresh worker process per task
    assert out["total"] is None or out["total"][0] >= out["total"][1] > 0  # RSS >= PSS
    log = capsys.readouterr().out
    assert "[stage] a" in log and "[stage] d" in log  # the workers' log, printed here


def test_workers_see_this_process_environment_as_it_is_now(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """The fork server keeps the environment it started with; a worker gets this process's
    (SUBLEARN_DEVICE, SUBLEARN_CACHE may change between two experiments of one process)."""
    from functools import partial

    make = partial(_make, str(tmp_path))
    run_tasks([Task("a")], make, lambda n: False, 2, progress=False)  # the server is up
    monkeypatch.setenv("SUBLEARN_TEST_MARK", "set-after")
    run_tasks([Task("b")], make, lambda n: False, 2, progress=False)
    assert capsys.readouterr().out.splitlines()[-1] == "mark set-after"


def test_nothing_to_make_starts_no_worker(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import concurrent.futures
    from functools import partial

    def no_pool(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pool was started")

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", no_pool)
    out = run_tasks([Task("a"), Task("b", ("a",))], partial(_make, str(tmp_path)),
                    lambda name: True, 2, progress=False)
    assert out["made"] == set() and out["total"] is None


def test_a_task_error_and_a_dead_worker_stop_the_pool(tmp_path: Path) -> None:
    from functools import partial

    make = partial(_make, str(tmp_path))
    with pytest.raises(SublearnError, match="task 'fails' failed"):
        run_tasks([Task("fails"), Task("after", ("fails",))], make, lambda n: False, 2,
                  progress=False)
    assert not (tmp_path / "after").exists()
    with pytest.raises(SublearnError, match="a worker process died while making 'dies'.*"
                                            "rerun the command to resume"):
        run_tasks([Task("dies"), Task("after", ("dies",))], make, lambda n: False, 2,
                  progress=False)
    assert not (tmp_path / "after").exists()


def _cli(args: list[str], kill_at: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sublearn", *args],
                          env={**os.environ, "SUBLEARN_KILL_AT": kill_at},
                          capture_output=True, text=True, timeout=600)


def _outputs(folder: Path) -> dict[str, bytes]:
    """Every stage's made files (adapters, data, logs, scores), timings and the folder's own
    path (of the teacher that wrote the data, of the in-context control's data) taken out."""
    out = {}
    for f in sorted((folder / "stages").glob("*/**/*")):
        rel = str(f.relative_to(folder / "stages"))
        if f.suffix in (".safetensors", ".jsonl"):
            out[rel] = f.read_bytes().replace(str(folder).encode(), b"<out>")
        elif f.name == "scores.json":
            scores = json.dumps(_no_seconds(json.loads(f.read_text())), sort_keys=True)
            out[rel] = scores.replace(str(folder), "<out>").encode()
    return out


def _no_seconds(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: _no_seconds(v) for k, v in obj.items() if k != "seconds"}
    return [_no_seconds(v) for v in obj] if isinstance(obj, list) else obj


@pytest.mark.parametrize(("cores", "gib", "together", "want"), [
    (2, 24.0, 1, 2), (2, 7.7, 1, 2), (2, 6.0, 1, 1), (2, None, 1, 2), (1, 24.0, 1, 1),
    (16, 64.0, 2, 1)])
def test_auto_workers_need_two_cores_and_the_memory_for_two(
        monkeypatch: pytest.MonkeyPatch, cores: int, gib: float | None, together: int,
        want: int) -> None:
    """--workers 0 settles to 2 only where two processes fit (a 6 GiB machine gets one);
    a number given is kept."""
    from sublearn.experiment import run
    from sublearn.models import device

    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(run, "total_memory_gib", lambda: gib)
    monkeypatch.setattr(device, "on_gpu", lambda: False)
    cfg = run.ExperimentConfig(target="owl", together=together)
    assert run.resolve_workers(cfg) == (want if run._forkserver() else 1)
    assert run.resolve_workers(run.ExperimentConfig(target="owl", workers=3)) == 3


def test_total_memory_reads_the_machine_and_a_container_limit(tmp_path: Path) -> None:
    from sublearn.memory import total_memory_gib

    gib = total_memory_gib()
    assert gib is None or 0.1 < gib < 1e5
    machine = total_memory_gib(str(tmp_path / "none")) or float("inf")  # no cgroup files
    (tmp_path / "memory.max").write_text("max\n")  # cgroup v2 without a limit
    assert total_memory_gib(str(tmp_path)) == machine
    (tmp_path / "memory.max").write_text(f"{8 * 2**30}\n")  # an 8 GiB container
    assert total_memory_gib(str(tmp_path)) == min(8.0, machine)
    (tmp_path / "memory.max").unlink()
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(f"{6 * 2**30}\n")  # v1
    assert total_memory_gib(str(tmp_path)) == min(6.0, machine)


def test_run_with_workers_makes_the_same_stages_and_resumes(tiny_model: str,
                                                            tmp_path: Path) -> None:
    """Two workers and one process make the same stages (names and keys); two workers from
    fresh processes make the same bytes, also when a worker was killed (SIGKILL inside its
    second training step) and the command rerun. One thread or two round a training step's
    sums differently, so across --workers the evaluations of the base (no training) are
    compared exactly and the rest by name."""
    args = ["run", "--model", tiny_model, "--target", "owl", "--n", "8", "--runs", "2",
            "--epochs", "1", "--batch-size", "4", "--teacher-epochs", "1",
            "--min-grammar-share", "0", "--icl", "4"]
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    assert _cli([*args, "--workers", "1", "--out", str(one)]).returncode == 0
    assert _cli([*args, "--workers", "2", "--out", str(two)]).returncode == 0
    assert sorted(p.parent.name for p in (one / "stages").glob("*/DONE.json")) == \
        sorted(p.parent.name for p in (two / "stages").glob("*/DONE.json"))
    base = [next((d / "stages").glob("eval_base-*")) / "scores.json" for d in (one, two)]
    assert _outputs(one)[str(base[0].relative_to(one / "stages"))] == \
        _outputs(two)[str(base[1].relative_to(two / "stages"))]
    res = {d: json.loads((d / "results.json").read_text()) for d in (one, two)}
    assert res[one]["workers"] == {"processes": 1}
    assert res[two]["workers"]["processes"] == 2
    assert res[one]["conditions"].keys() == res[two]["conditions"].keys()

    proc = _cli([*args, "--workers", "2", "--out", str(killed)], "train.step:2")
    assert proc.returncode == 2, proc.stderr[-2000:]
    # (multiprocessing's resource tracker may warn after it of the dead pool's semaphores)
    assert "sublearn run: error: a worker process died while making 'data:" in proc.stderr
    assert not (killed / "results.json").exists()
    assert _cli([*args, "--workers", "2", "--out", str(killed)]).returncode == 0
    assert _outputs(killed) == _outputs(two)
    got, want = (json.loads((d / "results.json").read_text()) for d in (killed, two))
    for k in ("stage_seconds", "wall_seconds", "peak_rss_gb"):
        got.pop(k, None), want.pop(k, None)
    assert json.dumps(got).replace(str(killed), "") == json.dumps(want).replace(str(two), "")


def test_the_tree_memory_splits_shared_pages() -> None:
    """The sampler's two sums: RSS counts a page each process maps, PSS splits it, so a tree
    of this process and a child that shares its pages has PSS below RSS."""
    from sublearn.memory import tree_memory_bytes

    if tree_memory_bytes() is None:
        pytest.skip("no /proc/<pid>/smaps_rollup here")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        time.sleep(0.5)
        rss, pss = tree_memory_bytes() or (0, 0)
        alone = tree_memory_bytes(child.pid)
        assert alone is not None and rss > alone[0] > 0  # the child is in this tree
        assert rss > pss > 0  # the Python binary and libraries the two map are split
    finally:
        child.kill()
        child.wait()


SIGTERM_MAIN = """
import sys
from functools import partial
from sublearn.experiment.workers import Task, run_tasks
import slow_task
run_tasks([Task("a"), Task("b")], partial(slow_task.make, sys.argv[1]), lambda n: False, 2,
          progress=False)
"""

SLOW_TASK = """
import os, time
from pathlib import Path

def make(folder, name):
    Path(folder, name + ".pid").write_text(str(os.getpid()))
    time.sleep(120)
    Path(folder, name + ".done").write_text("made")
    return {"peak_rss": {}, "made": [name], "log": []}
"""


def test_sigterm_to_the_main_process_stops_its_workers(tmp_path: Path) -> None:
    """A SIGTERM (a scheduler's stop, `kill`) to `sublearn run` ends its workers too: before,
    only the main process died and its workers went on making stages."""
    (tmp_path / "slow_task.py").write_text(SLOW_TASK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    # a session of its own: the cleanup below can end it with its fork server and workers
    main = subprocess.Popen([sys.executable, "-c", SIGTERM_MAIN, str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    pids = []
    try:
        deadline = time.time() + 120
        while len(pids) < 2 and time.time() < deadline and main.poll() is None:
            time.sleep(0.2)
            pids = [int(f.read_text()) for f in tmp_path.glob("*.pid") if f.read_text()]
        assert len(pids) == 2, main.stderr.read() if main.poll() is not None else "no workers"
        main.send_signal(signal.SIGTERM)
        assert main.wait(timeout=30) == 128 + signal.SIGTERM
        deadline = time.time() + 30
        while any(_alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in pids), "a worker outlived the SIGTERM"
        assert not list(tmp_path.glob("*.done"))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(main.pid, signal.SIGKILL)
        main.communicate()


def _alive(pid: int) -> bool:
    """Running (a zombie counts as gone: it makes nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
