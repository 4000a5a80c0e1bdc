"""Config helpers shared by stages: content hashes, manifests, and dataclass -> CLI flags."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from sublearn.errors import SublearnError
from sublearn.files import atomic_write_json


def config_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_hash(cfg: Any, length: int = 12) -> str:
    blob = json.dumps(config_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def check_manifest(out: Path, name: str, cfg: Any) -> None:
    """Refuse to reuse a folder made with a different config; write the manifest if new."""
    path = out / name
    want = cfg if isinstance(cfg, dict) else config_dict(cfg)
    want = json.loads(json.dumps(want))  # tuples -> lists, as they come back from disk
    if path.exists():
        have = json.loads(path.read_text())
        if have != want:
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            raise SublearnError(
                f"{out} holds results of a different config (differs in: {', '.join(diff)}); "
                "use another --out or delete the folder"
            )
        return
    atomic_write_json(path, want)


def _flag_type(tp: Any) -> tuple[Any, bool]:
    """(argparse type, is_optional) for a dataclass field type."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple = ()) -> None:
    """One `--field-name` flag per dataclass field, with the field's help metadata."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, _ = _flag_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_ = f.metadata.get("help", "") + f" (default: {default})"
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=help_)
        elif get_origin(tp) in (list, tuple):
            parser.add_argument(flag, nargs="+", type=get_args(tp)[0], default=default, help=help_)
        else:
            parser.add_argument(flag, type=tp, default=default, help=help_,
                                choices=f.metadata.get("choices"))


def dataclass_from_args(cls: type, args: argparse.Namespace, **override: Any) -> Any:
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    kw.update(override)
    for k, v in kw.items():
        if isinstance(v, list):
            kw[k] = tuple(v)
    return cls(**kw)
