"""An experiment's stages made by a pool of worker processes (`sublearn run --workers N`).

One process leaves a 2-core CPU idle between the small ops of a 135M model (a training step
on 4 short rows, an evaluation's batches): timed with the shipped commands, two processes of
one thread each made two teachers in 58 s where one process of two threads took 37 s each,
and two evaluations in 24 s against 16 s each (README, Speed). Two processes of two threads
each fight over the cores instead (OpenMP threads spin while they wait: 3-9x slower).

The caller describes its work as tasks with dependencies (`Task`); each task makes stages
through the same calls as the caller's own loop, so it makes the same stages, which the loop
then finds done. A task is given to a worker once the tasks it needs are done; a task whose
stages are all done already (`done`, asked in this process) is not given out, so a finished
or resumed experiment starts no worker it does not need.

Float rounding: a training stage's bytes depend on the threads it ran with, as they depend on
the machine; an evaluation checked at one thread and at two scored the same to the last digit
(README), and sampling was not checked."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from sublearn.errors import SublearnError
from sublearn.memory import tree_memory_bytes


@dataclass(frozen=True)
class Task:
    name: str
    needs: tuple[str, ...] = ()


# what the fork server imports once for every worker it starts
PRELOAD = ["torch", "transformers.modeling_utils", "peft", "sublearn.experiment.run"]


def cpu_threads(workers: int) -> int:
    """Threads per worker: the cores shared out (at least one each)."""
    return max(1, (os.cpu_count() or 1) // workers)


def _start(threads: int, environ: dict[str, str]) -> None:
    """A worker's start: its threads, and this process's environment as it is now (the fork
    server's is as it was when it started: SUBLEARN_DEVICE or SUBLEARN_CACHE may have changed
    since, in a process that runs several experiments). What the preloaded libraries read from
    the environment on import (`HF_HOME`, `HF_HUB_OFFLINE`) stays as the fork server saw it."""
    import torch

    os.environ.clear()
    os.environ.update(environ)
    torch.set_num_threads(threads)


def run_tasks(tasks: list[Task], make: Callable[[str], dict[str, float]],
              done: Callable[[str], bool], workers: int,
              progress: bool = True) -> dict[str, Any]:
    """Make every task, `workers` at a time, ready tasks in list order, each in a fresh worker.
    make(name), run in a worker (picklable), returns {"peak_rss": the worker's peak RSS (GiB)
    as each stage it made finished, "made": those stages' names, "log": lines to print here};
    done(name), asked here, whether a task's stages are all made. Returns {"by_stage": those
    peaks merged, "made": the stages made, "total": the peaks of this process's and its
    workers' resident memory together, sampled each second: (RSS sum, PSS sum) in GiB, None
    where unknown}."""
    from concurrent.futures import FIRST_COMPLETED, Future, wait
    from concurrent.futures.process import BrokenProcessPool

    from tqdm import tqdm

    names = {t.name for t in tasks}
    if missing := {n for t in tasks for n in t.needs} - names:
        raise ValueError(f"tasks need unknown tasks: {sorted(missing)}")
    finished: set[str] = set()
    running: dict[Future, str] = {}
    peaks: dict[str, float] = {}
    made: set[str] = set()
    pool: Any = None
    sampler = _RssSampler()
    bar = tqdm(total=len(tasks), unit="task", desc=f"stages ({workers} workers)",
               disable=not progress)
    try:
        with ExitStack() as stack:  # left by an error: the pool's exit stops the workers
            while len(finished) < len(tasks):
                for t in tasks:
                    if len(running) >= workers:
                        break
                    if t.name in finished or t.name in running.values() \
                            or not set(t.needs) <= finished:
                        continue
                    if done(t.name):
                        finished.add(t.name)
                        bar.update()
                        continue
                    if pool is None:
                        # a fresh worker per task: one that made stages held ~1.1-1.3 GiB between
                        # them against ~0.5 GiB fresh, and two must fit in 4 GB (README, Memory)
                        pool = stack.enter_context(fresh_worker_pool(
                            workers, PRELOAD, _start, (cpu_threads(workers), dict(os.environ))))
                        sampler.start()
                    running[pool.submit(make, t.name)] = t.name
                if not running:
                    continue  # tasks found done made others ready
                for fut in wait(running, return_when=FIRST_COMPLETED)[0]:
                    name = running.pop(fut)
                    try:
                        rec = fut.result()  # a worker's error is raised here
                    except BrokenProcessPool:
                        raise SublearnError(
                            f"a worker process died while making '{name}' (killed, or out of "
                            "memory?); the stages made are kept: rerun the command to resume "
                            "(--workers 1 makes them in this process)") from None
                    peaks.update(rec["peak_rss"])
                    made.update(rec["made"])
                    for line in rec["log"]:
                        bar.write(line)
                    finished.add(name)
                    bar.update()
    finally:
        bar.close()
        sampler.stop()
    return {"by_stage": peaks, "made": made, "total": sampler.peaks_gb()}


@contextmanager
def fresh_worker_pool(workers: int, preload: list[str], initializer: Callable[..., Any] | None
                      = None, initargs: tuple[Any, ...] = ()) -> Iterator[Any]:
    """A ProcessPoolExecutor of `workers` processes, a fresh one per task, forked from a fork
    server that imported `preload` once (3 s per worker otherwise; no thread state of this
    process inherited). Left by an exception (a task's error, a dead worker, Ctrl-C, or a
    SIGTERM to this process, turned into SystemExit meanwhile), it terminates the workers: a
    stage they were making stays unfinished (no DONE.json) and is made again on resume.
    Without this, a SIGTERM killed only this process and its workers went on making stages."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(preload)
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer,
                               initargs=initargs, max_tasks_per_child=1)
    try:
        with _sigterm_exits():
            yield pool
    except BaseException:
        for p in list(getattr(pool, "_processes", {}).values()):
            if p.is_alive():
                p.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM raises SystemExit(143) here, so that `finally` blocks run (Python's default
    ends the process at once); only where the default is in place, on the main thread."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


class _RssSampler:
    """The peaks of this process's and its descendants' resident memory together, read each
    second: the RSS sum (a page two of them map, such as the torch libraries, counts in each:
    an upper bound) and the PSS sum (such a page split among them)."""

    def __init__(self, every: float = 1.0) -> None:
        self.every, self.peak = every, (0, 0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if tree_memory_bytes() is None:
            return
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, pss = tree_memory_bytes() or (0, 0)
            self.peak = (max(self.peak[0], rss), max(self.peak[1], pss))
            time.sleep(self.every)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def peaks_gb(self) -> tuple[float, float] | None:
        """(RSS, PSS) peaks in GiB; None where unknown."""
        return (round(self.peak[0] / 2**30, 2), round(self.peak[1] / 2**30, 2)) \
            if self.peak[0] else None
