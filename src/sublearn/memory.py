"""The process's memory: its peak resident size, and handing freed heap back to the OS
(`Stages` does both after each stage; the bench reports the peak)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
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
