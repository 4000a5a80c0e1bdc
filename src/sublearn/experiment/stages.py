"""Stage cache for experiments: each stage runs in `out/stages/<name>-<hash>/`, keyed by a hash
of its config (which includes the hashes of the stages it depends on). A stage is done when its
`DONE.json` is written, last and atomically; a rerun skips done stages, a changed setting gives
new hashes to exactly the stages that depend on it."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sublearn.config import config_hash
from sublearn.faults import point as fault_point
from sublearn.files import atomic_write_json


def release_memory() -> None:
    """Hand the heap a finished stage freed back to the OS. glibc keeps freed blocks in its
    arenas, so an experiment's resident memory climbed stage after stage to ~5 GB (measured:
    after each stage 1.8-3.5 GB resident without this, 1.2 GB with it), and the in-context
    evaluations peaked on top of that. No-op where the C library has no malloc_trim."""
    gc.collect()
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def peak_rss_bytes() -> int | None:
    """The process's peak resident memory so far (None where `resource` is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; bytes on macOS
    return peak if sys.platform == "darwin" else peak * 1024


def peak_rss_gb() -> float | None:
    """`peak_rss_bytes` in GiB."""
    peak = peak_rss_bytes()
    return None if peak is None else round(peak / 2**30, 2)


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


@dataclass
class StageResult:
    name: str
    dir: Path
    key: str
    output: dict[str, Any]
    seconds: float
    cached: bool


class Stages:
    def __init__(self, root: Path, log: Callable[[str], None] = print) -> None:
        self.root = root
        self.log = log
        self.seconds: dict[str, float] = {}
        # seconds of a part of some stage's work (a label defence inside a student's stage):
        # a cost to report, not a stage, so not in `seconds` (whose sum is the stages' time)
        self.costs: dict[str, float] = {}
        # the process's peak RSS when each stage run here finished: the first stage to reach
        # the final value is where the memory peak is (cached stages have none)
        self.peak_rss: dict[str, float] = {}

    def _dir(self, name: str, cfg: dict[str, Any]) -> tuple[Path, str]:
        key = config_hash(cfg)
        return self.root / "stages" / f"{name}-{key}", key

    def done(self, name: str, cfg: dict[str, Any]) -> bool:
        """Whether the stage is done (a `run` of it would be a cache hit)."""
        return (self._dir(name, cfg)[0] / "DONE.json").is_file()

    def _cached(self, name: str, done: Path) -> dict[str, Any] | None:
        """A done stage's record, its seconds noted (None when it is not done)."""
        if not done.is_file():
            return None
        rec = json.loads(done.read_text())
        self.seconds[name] = rec["seconds"]
        self.log(f"[cached] {name}")
        return rec

    def note(self, name: str, cfg: dict[str, Any]) -> None:
        """Record a done stage's seconds without running it or reading its outputs (nothing
        when it is not done): a stage whose result another done stage already holds."""
        self._cached(name, self._dir(name, cfg)[0] / "DONE.json")

    def run(self, name: str, cfg: dict[str, Any],
            fn: Callable[[Path], dict[str, Any]]) -> StageResult:
        d, key = self._dir(name, cfg)
        if (rec := self._cached(name, d / "DONE.json")) is not None:
            return StageResult(name, d, key, rec["output"], rec["seconds"], True)
        self.open(name, cfg)
        t0 = time.time()
        output = fn(d)
        return self.finish(name, cfg, output, round(time.time() - t0, 2))

    def open(self, name: str, cfg: dict[str, Any]) -> Path:
        """A stage's folder, made to run it (a caller that runs several stages as one work,
        such as students trained together, then `finish`es each)."""
        d = self._dir(name, cfg)[0]
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(d / "stage_config.json", cfg)
        self.log(f"[stage] {name} -> {d}")
        return d

    def finish(self, name: str, cfg: dict[str, Any], output: dict[str, Any],
               seconds: float) -> StageResult:
        d, key = self._dir(name, cfg)
        fault_point("stage.done")
        atomic_write_json(d / "DONE.json", {"output": output, "seconds": seconds, "config": cfg})
        self.seconds[name] = seconds
        if (peak := peak_rss_gb()) is not None:
            self.peak_rss[name] = peak
        release_memory()
        return StageResult(name, d, key, output, seconds, False)

    def folder(self, name: str, cfg: dict[str, Any]) -> Path:
        return self._dir(name, cfg)[0]
