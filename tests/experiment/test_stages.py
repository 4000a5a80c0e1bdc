"""The stage cache's process hygiene: a finished stage hands the heap it freed back to the OS."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from sublearn.experiment.stages import _libc

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
