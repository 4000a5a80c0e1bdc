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
    """The process's peak resident memory so far (None where `resource` is missing). Not
    reset per stage: Linux's reset (`clear_refs` 5) would also hide the peak from
    `/usr/bin/time` and any parent reading its children's peak."""
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


def tree_memory_bytes(pid: int | None = None) -> tuple[int, int] | None:
    """(RSS, PSS) of a process (default: this one) and all its descendants, summed (Linux
    /proc; None elsewhere, or where no `smaps_rollup` could be read). In the RSS sum a page
    that several of them map (the torch libraries, a model file) counts in each; PSS splits
    it among them: the memory they use."""
    if not os.path.isdir("/proc/self"):
        return None
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", encoding="utf-8") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after the command name, which may
        children.setdefault(ppid, []).append(int(d))  # hold spaces and parentheses
    rss = pss = read = 0
    todo = [pid or os.getpid()]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/smaps_rollup", encoding="utf-8") as f:
                kib = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in f)
                       if k in ("Rss", "Pss")}
        except (OSError, ValueError):  # gone meanwhile, or unreadable
            continue
        rss, pss, read = rss + kib.get("Rss", 0) * 1024, pss + kib.get("Pss", 0) * 1024, read + 1
    return (rss, pss) if read else None


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
