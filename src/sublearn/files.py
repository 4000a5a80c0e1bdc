"""Atomic file writes and append-only JSONL: what every stage uses to persist artefacts."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
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
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SublearnError(f"file not found: {path}") from None
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


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    raise SublearnError(f"{path}:{lineno} is not valid JSON") from None


def read_jsonl(path: str | Path, repair: bool = False) -> list[dict]:
    """Read a JSONL file. With repair=True a torn final line (from a kill mid-write) is
    truncated away on disk so appends continue from a clean state."""
    path = Path(path)
    if not repair:
        return list(iter_jsonl(path))
    raw = path.read_bytes()
    good_end = raw.rfind(b"\n") + 1
    if good_end != len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return [json.loads(line) for line in raw[:good_end].decode("utf-8").splitlines() if line]


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
