"""Students trained together in an experiment (`--together K`): the loops of `sublearn run`
and `sublearn matrix` queue their student stages, then train them K at a time with
`train_many` before any student is evaluated.

Groups are cut from the experiment's students in the order the loop makes them, done or not,
so that a resumed experiment trains the same students together as an uninterrupted one (a
student's bytes depend on its group, through float rounding only). Each student keeps its own
stage folder, key and `DONE.json`; its seconds are its group's divided among the students the
group trained.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from sublearn.experiment.stages import Stages
from sublearn.pipeline.train_config import TrainConfig


@dataclass
class _Queued:
    stages: Stages
    name: str
    key: dict[str, Any]
    cfg: TrainConfig
    data: str
    done: Callable[[dict[str, Any]], None] | None


class StudentQueue:
    def __init__(self, k: int, progress: bool = True) -> None:
        self.k, self.progress = k, progress
        self.items: list[_Queued] = []

    def add(self, stages: Stages, name: str, key: dict[str, Any], cfg: TrainConfig, data: str,
            done: Callable[[dict[str, Any]], None] | None = None) -> str:
        """Queue a student stage; its adapter folder (there once `flush` returns). done: called
        with the stage's output when it is trained or found done."""
        self.items.append(_Queued(stages, name, key, cfg, data, done))
        return str(stages.folder(name, key) / "adapter")

    def flush(self) -> None:
        """Train every queued student, K at a time."""
        from sublearn.pipeline.train_many import Job, train_many

        for s in range(0, len(self.items), self.k):
            group = self.items[s : s + self.k]
            with ExitStack() as locks:
                # locked in one order (by folder name), so that experiments sharing a stage
                # cache wait for each other's students instead of training them twice
                for q in sorted(group, key=lambda q: q.stages.folder(q.name, q.key).name):
                    if not q.stages.done(q.name, q.key):
                        locks.enter_context(q.stages.lock(q.name, q.key))
                done = [q.stages.done(q.name, q.key) for q in group]
                todo = [q for q, d in zip(group, done, strict=True) if not d]
                outputs = {id(q): q.stages.run(q.name, q.key, _never).output
                           for q, d in zip(group, done, strict=True) if d}
                if todo:
                    jobs = [Job(q.cfg, q.data, q.stages.open(q.name, q.key)) for q in todo]
                    t0 = time.time()
                    summaries = train_many(jobs, progress=self.progress)
                    seconds = round((time.time() - t0) / len(todo), 2)
                    for q, summary in zip(todo, summaries, strict=True):
                        outputs[id(q)] = q.stages.finish(q.name, q.key, summary, seconds).output
            for q in group:
                if q.done is not None:
                    q.done(outputs[id(q)])
        self.items.clear()


def _never(d: Any) -> dict[str, Any]:
    raise AssertionError(f"stage {d} was done a moment ago")
