"""The process's memory: its peak resident size, and handing freed heap back to the OS
(`Stages` does both after each stage; the bench reports the peak); the memory of a process
tree, and what the machine (or its container) has."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import sys
from typing import Any


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


def tree_rss_bytes(pid: int | None = None) -> int | None:
    """The resident memory of a process (default: this one) and all its descendants, summed
    (Linux /proc; None elsewhere). A page that several of them map counts in each."""
    if not os.path.isdir("/proc/self"):
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", encoding="utf-8") as f:
                stat = f.read()
            with open(f"/proc/{d}/statm", encoding="utf-8") as f:
                resident = int(f.read().split()[1])
        except (OSError, ValueError, IndexError):  # gone meanwhile, or unreadable
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after the command name, which may
        children.setdefault(ppid, []).append(int(d))  # hold spaces and parentheses
        rss[int(d)] = resident * page
    total, todo = 0, [pid or os.getpid()]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += children.get(p, [])
    return total


def total_memory_gib(cgroup: str = "/sys/fs/cgroup") -> float | None:
    """The memory this process may use: the machine's physical memory, or its container's
    (Docker, Slurm) cgroup limit where that is lower. None where neither can be read."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows) or no such name
        pass
    for f in ("memory.max", "memory/memory.limit_in_bytes"):  # cgroup v2, v1
        try:
            with open(os.path.join(cgroup, f), encoding="utf-8") as fh:
                limits.append(int(fh.read().strip()))  # "max" (no limit) fails here
        except (OSError, ValueError):
            continue
    return min(limits) / 2**30 if limits else None
