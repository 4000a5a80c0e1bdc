"""Stage cache for experiments: each stage runs in `out/stages/<name>-<hash>/`, keyed by a hash
of its config (which includes the hashes of the stages it depends on). A stage is done when its
`DONE.json` is written, last and atomically; a rerun skips done stages, a changed setting gives
new hashes to exactly the stages that depend on it.

Keys do not depend on where the folder is: a path into `out/stages/` is hashed as `@stages/...`
(a stage's config names the teacher adapter or data file it uses), and a path that a done
stage recorded is found again under the folder it is read from. So a folder that was moved,
copied, or named another way (`--out runs/x`, `./runs/x`, an absolute path) is the same cache.
Folders made when keys held the paths as spelt are renamed to these keys when first opened.

Experiments may share one cache (`share_stages`: `out/stages` a link to it), so that what
they have in common is made once: every target's control runs, or a sweep's teachers and
data under other student settings. Each stage is made under a lock (flock), so of two
processes that reach the same stage, one makes it and the other finds it done."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sublearn.config import config_hash
from sublearn.errors import SublearnError
from sublearn.faults import point as fault_point
from sublearn.files import atomic_write_json, ensure_writable_dir, waiting_lock
from sublearn.memory import peak_rss_gb, release_memory

TOKEN = "@stages"  # `out/stages` in stage keys and configs
# "stages/<folder>" in a path, after its start or a "/" (not consuming the folder: in
# `runs/stages/stages/x-K` the second match is the stage)
_STAGE_DIR = re.compile(r"(?<![^/])stages/(?=([^/]+))")
_KEY = re.compile(r"[0-9a-f]{12}")
RENAMED = "renamed.json"  # stages/RENAMED: old folder name -> its name under portable keys
SUPERSEDED = "superseded"  # stages/SUPERSEDED: second copies of a stage, set aside by `migrate`


def stage_refs(path: str) -> Iterator[tuple[str, str]]:
    """(folder, rest) for each `stages/<folder>` that `path` names, first to last: the stage
    folder and what follows it (e.g. `/adapter`)."""
    for m in _STAGE_DIR.finditer(path):
        yield m[1], path[m.end() + len(m[1]):]


def map_strings(obj: Any, f: Callable[[str], str]) -> Any:
    """`obj` (a config or record: dicts, lists, scalars) with `f` applied to each string."""
    if isinstance(obj, str):
        return f(obj)
    if isinstance(obj, dict):
        return {k: map_strings(v, f) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [map_strings(v, f) for v in obj]
    return obj


def renames(stages_dir: Path) -> dict[str, str]:
    """The stage folders `migrate` renamed in `stages_dir`: old name -> new name."""
    log = stages_dir / RENAMED
    return json.loads(log.read_text()) if log.is_file() else {}


def relocate(path: str, stages_dir: Path, renamed: dict[str, str]) -> str | None:
    """`path` into a stage folder, found under `stages_dir` (through its renames); None when
    it names no folder there."""
    for folder, rest in stage_refs(path):
        name = renamed.get(folder, folder)
        if (stages_dir / name).is_dir():
            return str(stages_dir / name) + rest
    return None


def find_recorded(exp: Path, path: str) -> str:
    """A stage path that `results.json` of the experiment folder `exp` recorded where `sublearn
    run` ran, found under `exp` now (the folder may have moved since, and its stages been
    renamed to keys that hold no path)."""
    found = relocate(path, exp / "stages", renames(exp / "stages"))
    if found is not None:
        return found
    if Path(path).exists():
        return path
    raise SublearnError(f"{path} (from {exp}/results.json) not found")


class NotMade(Exception):
    """A stage asked of a dry `Stages` is not done."""


@dataclass
class StageResult:
    name: str
    dir: Path
    key: str
    output: dict[str, Any]
    seconds: float
    cached: bool


class Stages:
    def __init__(self, root: Path, log: Callable[[str], None] = print,
                 dry: bool = False) -> None:
        """dry: `run` makes nothing; a stage that is not done raises `NotMade`."""
        self.root = root
        self.log = log
        self.dry = dry
        self.dir = root / "stages"
        if self.dir.is_symlink() and not self.dir.exists():
            raise SublearnError(f"{self.dir} links to a stage cache that is not there "
                                f"({os.readlink(self.dir)}): restore it, or remove the link")
        # the spellings of `self.dir` that a path into it may start with, longest first
        self._spellings = sorted({str(self.dir), os.path.abspath(self.dir),
                                  str(self.dir.resolve())}, key=len, reverse=True)
        # folders of another process sharing the cache are not renamed under it
        with waiting_lock(self.dir / ".migrate.lock", "another process is opening the stage "
                          "cache; waiting") if self.dir.is_dir() else nullcontext():
            self._renamed = migrate(self.dir, log)
        self.seconds: dict[str, float] = {}
        # seconds of a part of some stage's work (a label defence inside a student's stage):
        # a cost to report, not a stage, so not in `seconds` (whose sum is the stages' time)
        self.costs: dict[str, float] = {}
        # the process's peak RSS when each stage made here finished: the first stage to reach
        # the final value is where the memory peak is (cached stages have none); a worker
        # process makes one task's stages (`workers.run_tasks`), so its peaks are the task's
        self.peak_rss: dict[str, float] = {}
        self.made: list[str] = []  # the stages made here, in order

    def portable(self, obj: Any) -> Any:
        """`obj` with each path into `self.dir` written from `TOKEN`: what keys are hashed on."""
        def one(s: str) -> str:
            norm = os.path.normpath(s) if "/" in s else s
            for sp in self._spellings:
                if norm == sp or norm.startswith(sp + "/"):
                    return TOKEN + norm[len(sp):]
            return s

        return map_strings(obj, one)

    def local(self, obj: Any) -> Any:
        """A done stage's recorded output with each path into a stage folder that this folder
        holds spelt under `self.dir`: the record may come from where the folder was made."""
        def one(s: str) -> str:
            if s == TOKEN or s.startswith(TOKEN + "/"):
                return str(self.dir) + s[len(TOKEN):]
            found = relocate(s, self.dir, self._renamed)
            return s if found is None else found

        return map_strings(obj, one)

    def _dir(self, name: str, cfg: dict[str, Any]) -> tuple[Path, str]:
        key = config_hash(self.portable(cfg))
        return self.dir / f"{name}-{key}", key

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
        return {**rec, "output": self.local(rec["output"])}

    def note(self, name: str, cfg: dict[str, Any]) -> None:
        """Record a done stage's seconds without running it or reading its outputs (nothing
        when it is not done): a stage whose result another done stage already holds."""
        self._cached(name, self._dir(name, cfg)[0] / "DONE.json")

    def run(self, name: str, cfg: dict[str, Any],
            fn: Callable[[Path], dict[str, Any]]) -> StageResult:
        d, key = self._dir(name, cfg)
        if (rec := self._cached(name, d / "DONE.json")) is not None:
            return StageResult(name, d, key, rec["output"], rec["seconds"], True)
        if self.dry:
            raise NotMade(name)
        with self.lock(name, cfg):
            # another experiment sharing this cache may have made it while we waited
            if (rec := self._cached(name, d / "DONE.json")) is not None:
                return StageResult(name, d, key, rec["output"], rec["seconds"], True)
            self.open(name, cfg)
            t0 = time.time()
            output = fn(d)
            return self.finish(name, cfg, output, round(time.time() - t0, 2))

    def lock(self, name: str, cfg: dict[str, Any]) -> Any:
        """Held while the stage is made (`run`, or `open` ... `finish` by a caller that makes
        several stages as one work): another process sharing the cache waits for it."""
        d = self._dir(name, cfg)[0]
        return waiting_lock(d / ".stage.lock", f"stage {d.name} is being made by another "
                                               "process sharing the stage cache; waiting")

    def open(self, name: str, cfg: dict[str, Any]) -> Path:
        """A stage's folder, made to run it (a caller that runs several stages as one work,
        such as students trained together, then `finish`es each)."""
        d = self._dir(name, cfg)[0]
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(d / "stage_config.json", self.portable(cfg))
        self.log(f"[stage] {name} -> {d}")
        return d

    def finish(self, name: str, cfg: dict[str, Any], output: dict[str, Any],
               seconds: float) -> StageResult:
        d, key = self._dir(name, cfg)
        fault_point("stage.done")
        atomic_write_json(d / "DONE.json", {"output": output, "seconds": seconds,
                                            "config": self.portable(cfg)})
        self.seconds[name] = seconds
        self.made.append(name)
        if (peak := peak_rss_gb()) is not None:
            self.peak_rss[name] = peak
        release_memory()
        return StageResult(name, d, key, output, seconds, False)

    def folder(self, name: str, cfg: dict[str, Any]) -> Path:
        return self._dir(name, cfg)[0]


def share_stages(out: Path, cache: str | Path, check_only: bool = False,
                 hint: str = "use another --out, or the cache it was made with") -> None:
    """Keep the experiment folder `out`'s stages in `cache`, a folder other experiments may
    share: `out/stages` becomes a link to it, relative, so that a folder moved with its cache
    still finds it. Refused, before anything is made, when `out` keeps its stages elsewhere
    (its own folder, or another cache). check_only: only refuse."""
    cache = Path(cache).expanduser().absolute()
    link = out / "stages"
    if link.is_symlink() or link.exists():
        if link.resolve() == cache.resolve():
            return
        where = f"a link to {link.resolve()}" if link.is_symlink() else "its own folder"
        raise SublearnError(f"{out} keeps its stages in {where}, not in the shared stage "
                            f"cache {cache}: {hint}")
    if check_only:
        return
    ensure_writable_dir(cache)
    tmp = out / f".stages.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(cache, out.absolute()), tmp, target_is_directory=True)
    os.replace(tmp, link)  # a kill leaves the link whole or absent


def migrate(d: Path, log: Callable[[str], None] = print) -> dict[str, str]:
    """Rename the stage folders in `d` whose keys were hashed on paths as spelt (before keys
    were portable) to their portable keys; returns every rename made here, now or before.
    A config's references to other stages, by path or by key, are rewritten to those stages'
    new names first. Each folder's rename is recorded, then its configs and record rewritten,
    then the folder renamed: a migration killed at any point is finished by the next."""
    log_file = d / RENAMED
    renamed = renames(d)
    if not d.is_dir():
        return renamed
    configs = {f.name: json.loads((f / "stage_config.json").read_text())
               for f in sorted(d.iterdir()) if (f / "stage_config.json").is_file()}
    by_key = {n.rsplit("-", 1)[1]: n for n in configs} | \
        {old.rsplit("-", 1)[1]: new for old, new in renamed.items()}
    new: dict[str, str] = {}

    def name_of(n: str) -> str:
        if n not in configs:
            return renamed.get(n, n)
        if n not in new:
            new[n] = n  # a reference cycle (none is made) would end here
            new[n] = f"{n.rsplit('-', 1)[0]}-{config_hash(translate(configs[n]))}"
        return new[n]

    def translate(obj: Any, spell: str = TOKEN) -> Any:
        """References to stages under their new names: paths spelt from `spell`."""
        def one(s: str) -> str:
            if _KEY.fullmatch(s) and s in by_key:
                return name_of(by_key[s]).rsplit("-", 1)[1]
            for folder, rest in stage_refs(s):
                if folder in configs or folder in renamed:
                    return f"{spell}/{name_of(folder)}{rest}"
            return s

        return map_strings(obj, one)

    def done(n: str) -> bool:
        return (d / n / "DONE.json").is_file()

    # finished folders first: of two copies of one stage (a folder reached by two spellings
    # of --out), the finished one takes the name
    for n in sorted(configs, key=lambda n: not done(n)):
        to = name_of(n)
        if to == n:
            continue
        renamed[n] = to
        atomic_write_json(log_file, renamed)
        if (d / to).exists():  # a second copy: the unfinished one, or this one, is set aside
            aside = to if done(n) and not done(to) else n
            (d / SUPERSEDED).mkdir(exist_ok=True)
            os.replace(d / aside, d / SUPERSEDED / f"{aside}-{time.time_ns()}")
            log(f"[stages] {aside}: a second copy of {to}, set aside in {SUPERSEDED}/")
            if aside == n:
                continue
        atomic_write_json(d / n / "stage_config.json", translate(configs[n]))
        if done(n):
            rec = json.loads((d / n / "DONE.json").read_text())
            atomic_write_json(d / n / "DONE.json", {**rec, "config": translate(rec["config"]),
                                                    "output": translate(rec["output"], str(d))})
        os.rename(d / n, d / to)
        log(f"[stages] {n} -> {to} (keys no longer hold the folder's path)")
    return renamed
