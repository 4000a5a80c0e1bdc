"""Atomic file writes and append-only JSONL: what every stage uses to persist artefacts."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sublearn.errors import SublearnError


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temp file in the same folder and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise SublearnError(f"{path} is not valid JSON: {e}") from None


def append_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Append a batch of rows as one write + fsync (a batch lands whole or, on a crash,
    leaves at most a torn last line that `read_jsonl(..., repair=True)` drops)."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if not data:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def parse_jsonl(text: str, source: str | Path, skip_bad: bool = False) -> list[Any]:
    """The one JSONL parser: a value per non-blank line. A bad line is a one-line error naming
    it, or, with skip_bad (a cache other processes may be appending to), passed over."""
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if not skip_bad:
                raise SublearnError(f"{source}:{lineno} is not valid JSON") from None
    return rows


def read_text(path: str | Path) -> str:
    """A UTF-8 text file, or a one-line error saying why it can't be read."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise SublearnError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise SublearnError(f"{path} is a folder, not a file") from None
    except UnicodeDecodeError:
        raise SublearnError(f"{path} is not UTF-8 text") from None


def read_jsonl(path: str | Path, repair: bool = False) -> list[Any]:
    """Read a JSONL file. With repair=True a torn final line (from a kill mid-write) is
    truncated away on disk so appends continue from a clean state."""
    path = Path(path)
    if repair and path.is_file():
        raw = path.read_bytes()
        good_end = raw.rfind(b"\n") + 1
        if good_end != len(raw):
            with open(path, "r+b") as f:
                f.truncate(good_end)
    return parse_jsonl(read_text(path), path)


def file_sha256(path: str | Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_out_dir(path: str | Path) -> Path:
    """Refuse an output folder that could not be made or written, without making it: commands
    check this before their work and create the folder after, so a refused command leaves
    nothing behind."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SublearnError(f"cannot write to output folder {path}: it is a file")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise SublearnError(f"cannot write to output folder {path}: {existing} is not writable")
    return path


_RESULTS = ("results.json", "report.md", "results.png")
# command -> (its manifests, the first saying it made a folder; the other files it writes
# there). A command may add files to another's folder (scores.json beside a student's adapter)
# but not overwrite that command's own. `filter_report.json` says filter made a folder;
# generate writes one too, and owns it.
OUTPUTS = {
    "run": (("experiment_config.json",), _RESULTS),
    "matrix": (("matrix_config.json",), _RESULTS),
    "cross": (("cross_config.json",), _RESULTS),
    "generate": (("generate_config.json", "filter_report.json"),
                 ("raw.jsonl", "filtered.jsonl", "judged.jsonl")),
    "filter": (("filter_report.json",), ("filtered.jsonl", "judged.jsonl")),
    "train": (("train_config.json",), ("adapter", "model", "train_log.jsonl",
                                       "train_summary.json")),
    "evaluate": ((), ("scores.json",)),
    "audit": (("summary.json",), ("scores.jsonl", "histogram.png", "report.md")),
    "defend": (("defence_report.json",), ("filtered.jsonl",)),
}
STAGE_FILES = ("DONE.json", "stage_config.json")


def check_no_overwrite(path: str | Path, command: str,
                       reads: tuple[str | Path, ...] = ()) -> None:
    """Refuse an output folder where `command` (a key of OUTPUTS) would overwrite another's
    work: a stage of an experiment (its cache would then describe other files), a file that
    another command (a manifest not `command`'s) wrote there, or one of its own input files
    `reads`."""
    path = Path(path)
    if not path.is_dir():
        return
    if stage := next((f for f in STAGE_FILES if (path / f).exists()), None):
        raise SublearnError(f"{path} is a stage folder of an experiment (it holds {stage}); "
                            "writing there would corrupt its cache: use another --out")
    own, files = OUTPUTS[command]
    writes = files + own
    for r in reads:
        if any(Path(r).resolve() == (path / w).resolve() for w in writes):
            raise SublearnError(f"--out {path} would overwrite the input {r}: use another --out")
    for other, (manifests, theirs) in OUTPUTS.items():
        if not manifests or manifests[0] in own or not (path / manifests[0]).exists():
            continue
        if clash := next((w for w in writes if w in manifests + theirs
                          and (path / w).exists()), None):
            raise SublearnError(f"{path} holds sublearn {other}'s {clash}, which this command "
                                "would overwrite: use another --out")


def ensure_writable_dir(path: str | Path) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".sublearn-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SublearnError(f"cannot write to output folder {path}: {e.strerror}") from None
    return path


STALE_SECONDS = 600  # a temp folder untouched this long was left by a killed process


def _remove_stale_temps(path: Path) -> None:
    """Temp folders of `path` that a kill -9 left behind (the `finally` never ran)."""
    import time

    for old in path.parent.glob(f".{path.name}.*"):
        try:
            if old.is_dir() and time.time() - old.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            continue


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Fill a temp folder beside `path`; on success it replaces `path` in one rename, so a kill
    never leaves half a folder under the final name. On an error the temp folder goes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def folder_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on an output folder while a command writes into it: a second
    command on the same folder gets a one-line error instead of corrupting the first. The
    lock is the kernel's (flock), so it goes with its process, even after kill -9."""
    import fcntl

    path = Path(path)
    f = open(path / ".sublearn.lock", "a+", encoding="utf-8")  # noqa: SIM115 (held until exit)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise SublearnError(f"{path} is in use by another sublearn command ({holder}); wait for "
                            "it to finish or use another --out") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        yield
    finally:
        f.close()


@contextmanager
def waiting_lock(path: Path, waiting: str) -> Iterator[None]:
    """Hold an exclusive lock file (flock), waiting for it: of processes that would do the same
    one-time work, one does it and the others find it done. `waiting` is said once if another
    holds it. A folder where no lock file can be made (read-only) is entered unlocked."""
    import fcntl

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held for the block)
    except OSError:
        f = None
    if f is None:
        yield
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"sublearn: {waiting}", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file frees the lock


@contextmanager
def locked_out_dir(path: str | Path) -> Iterator[Path]:
    """Make the output folder and hold its lock while the command writes into it (call
    `check_out_dir` first, before the command's checks, so a refusal leaves nothing)."""
    path = ensure_writable_dir(path)
    with folder_lock(path):
        yield path


def atomic_savefig(fig: Any, path: Path, dpi: int = 120) -> None:
    """Save a matplotlib figure as `path` atomically (a temp file, then a rename), like every
    other artefact, and close it."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
