"""The stage cache's process hygiene: a finished stage hands the heap it freed back to the OS."""

from pathlib import Path

import pytest

from sublearn.experiment.stages import Stages, _libc

_pinned: list[bytearray] = []


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1e3
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists() or
                    getattr(_libc(), "malloc_trim", None) is None,
                    reason="needs Linux and glibc's malloc_trim")
def test_finished_stage_returns_freed_heap(tmp_path: Path) -> None:
    def work(d: Path) -> dict:
        # ~200 MB in heap-sized blocks (below glibc's mmap threshold), all freed but the last,
        # which pins the heap top: glibc alone keeps the freed pages resident
        blocks = [bytearray(64 * 1024) for _ in range(3000)]
        for b in blocks:
            b[::4096] = b"\1" * len(b[::4096])
        _pinned.append(blocks[-1])
        return {}

    before = _rss_mb()
    Stages(tmp_path, log=lambda _: None).run("work", {"x": 1}, work)
    assert _rss_mb() - before < 80
