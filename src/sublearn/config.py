"""Config helpers shared by stages: content hashes, manifests, dataclass -> CLI flags, and the
YAML `--config` files every verb reads (and writes back, resolved, into its output folder)."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shlex
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from sublearn.errors import SublearnError, first_line
from sublearn.files import atomic_write_json, atomic_write_text


def config_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_hash(cfg: Any, length: int = 12) -> str:
    blob = json.dumps(config_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def without_added(d: dict[str, Any], added: dict[str, Any]) -> dict[str, Any]:
    """`d` without the settings in `added` that sit at the default given there: settings added
    to a config after folders were cached leave those folders' stage keys unchanged."""
    return {k: v for k, v in d.items() if k not in added or added[k] != v}


def _without(d: Any, keys: tuple[str, ...]) -> Any:
    """`d` with `keys` dropped from it and from the dicts nested in it."""
    if not isinstance(d, dict):
        return d
    return {k: _without(v, keys) for k, v in d.items() if k not in keys}


def field_defaults(cls: Any) -> dict[str, Any]:
    """A dataclass's defaults, as JSON gives them back (tuples as lists). A field whose
    metadata has "manifest_default" gives that instead: what a manifest written before the
    field existed ran with, where the default itself is settled per machine (dtype "auto")."""
    return json.loads(json.dumps({f.name: f.metadata.get("manifest_default", f.default)
                                  for f in dataclasses.fields(cls)
                                  if f.default is not dataclasses.MISSING}))


def _fill(have: Any, want: Any, defaults: Any) -> Any:
    """`have` with the settings it lacks, and `want` has, taken from `defaults` (nested like
    them): a setting added to a config since the manifest was written ran at its default."""
    if not (isinstance(have, dict) and isinstance(want, dict) and isinstance(defaults, dict)):
        return have
    out = {k: _fill(v, want.get(k), defaults.get(k)) for k, v in have.items()}
    out.update({k: defaults[k] for k in want if k not in have and k in defaults})
    return out


def manifest_diff(path: Path, cfg: Any, free: tuple[str, ...] = (),
                  defaults: dict[str, Any] | None = None) -> list[str]:
    """The settings in which the manifest at `path` differs from `cfg` ([] when it matches or
    does not exist). A setting the manifest lacks (added to the config since) counts as its
    default: a dataclass's own, or for a dict manifest those in `defaults` (nested like it).
    Settings in `free` (at any depth) may differ."""
    if not path.exists():
        return []
    want = json.loads(json.dumps(cfg if isinstance(cfg, dict) else config_dict(cfg)))
    have = json.loads(path.read_text())
    if dataclasses.is_dataclass(cfg):
        defaults = field_defaults(cfg)
    have = _fill(have, want, defaults or {})
    return _differing(_without(have, free), _without(want, free))


def _differing(have: Any, want: Any, where: str = "") -> list[str]:
    """Dotted paths of the settings in which two (nested) manifests differ."""
    out = []
    for k in sorted(set(have) | set(want)):
        a, b = have.get(k), want.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differing(a, b, f"{where}{k}.")
        elif a != b:
            out.append(f"{where}{k}")
    return out


def _made_with(path: Path, cfg: Any, diff: list[str]) -> str:
    """What the folder was made with, as the flags that reuse it, when the settings that
    differ are flags (a default that changed since: `--epochs 2.0`); else nothing."""
    if not dataclasses.is_dataclass(cfg) or any("." in d for d in diff):
        return ""
    have = _fill(json.loads(path.read_text()), config_dict(cfg), field_defaults(cfg))
    flags = " ".join(f"--{d.replace('_', '-')} {shlex.quote(str(have[d]))}" for d in diff
                     if isinstance(have.get(d), (int, float, str))
                     and not isinstance(have[d], bool))
    return f"it was made with {flags}: give that to reuse it, or " if flags else ""


def check_manifest(out: Path, name: str, cfg: Any, free: tuple[str, ...] = (),
                   defaults: dict[str, Any] | None = None) -> None:
    """Refuse to reuse a folder made with a different config; write the manifest if new.
    A setting the manifest lacks (added to the config since) counts as its default (see
    `manifest_diff`). Settings in `free` only add stages (e.g. more runs): they may change, and
    the manifest then records the latest values."""
    path = out / name
    want = cfg if isinstance(cfg, dict) else config_dict(cfg)
    want = json.loads(json.dumps(want))  # tuples -> lists, as they come back from disk
    if path.exists():
        diff = manifest_diff(path, cfg, free, defaults)
        if diff:
            raise SublearnError(
                f"{out} holds results of a different config (differs in: {', '.join(diff)}); "
                f"{_made_with(path, cfg, diff)}use another --out or delete the folder"
            )
        if not free or json.loads(path.read_text()) == want:
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
        help_ = f.metadata.get("help", "")
        # A help text that explains its own default keeps it; None means "not set".
        if default is not None and "default" not in help_:
            help_ += f" (default: {default})"
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


def _yaml_value(action: argparse.Action, value: Any, where: str) -> Any:
    """A YAML value for one flag, checked as the command line would check it."""
    if action.nargs == 0:  # store_true / --flag/--no-flag
        if value is None and action.default is None:  # "unset", as a resolved config says
            return None
        if not isinstance(value, bool):
            raise SublearnError(f"{where} must be true or false, got {value!r}")
        return value
    if action.nargs in ("+", "*"):
        if not isinstance(value, list) or (action.nargs == "+" and not value):
            raise SublearnError(f"{where} must be a list, got {value!r}")
        return [_yaml_scalar(action, v, where) for v in value]
    return _yaml_scalar(action, value, where)


def _yaml_scalar(action: argparse.Action, value: Any, where: str) -> Any:
    tp = action.type or str
    if value is None and action.default is None:
        return None
    if isinstance(value, bool) or value is None:
        ok = False
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text; the flag takes it
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, int | float)
    elif tp is int or tp is str:
        ok = isinstance(value, tp)
    else:  # a converter (e.g. Path): it takes the text
        ok = isinstance(value, str)
        value = tp(value) if ok else value
    if not ok:
        name = getattr(tp, "__name__", str(tp))
        raise SublearnError(f"{where} must be {name}, got {value!r}")
    if action.choices is not None and value not in action.choices:
        raise SublearnError(f"{where} must be one of {list(action.choices)}, got {value!r}")
    return float(value) if tp is float else value


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SublearnError(f"config file not found: {path}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = first_line(e)
        raise SublearnError(f"{path} is not valid YAML: {first}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise SublearnError(f"{path}: expected a mapping of setting: value")
    return doc


def apply_yaml_defaults(parser: argparse.ArgumentParser, path: str | Path) -> set[str]:
    """Make a `--config` file's settings the parser's defaults (so command-line flags still
    win); returns the destinations it set."""
    doc = read_yaml_mapping(path)
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    values: dict[str, Any] = {}
    for key, value in doc.items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None:
            raise SublearnError(f"{path}: '{key}' is not a setting of `{parser.prog}` "
                                f"(one of: {', '.join(sorted(actions))})")
        setting = check_setting(action, value, f"{path}: {key}")
        if setting is None and (action.required or not action.option_strings):
            continue  # a required flag or a positional the file leaves unset is still missing
        values[dest] = setting
        action.required = False
        if not action.option_strings:  # a positional given in the file becomes optional
            action.nargs = "?"
            action.default = values[dest]
    parser.set_defaults(**values)
    return set(values)


def write_resolved_config(path: Path, args: argparse.Namespace) -> None:
    """The settings a verb ran with, as a YAML file `--config` reads back."""
    import yaml

    skip = {"config", "verb", "_given"}
    doc = {k: list(v) if isinstance(v, tuple) else v
           for k, v in vars(args).items() if k not in skip and not k.startswith("_")}
    doc = {k: str(v) if isinstance(v, Path) else v for k, v in doc.items()}
    atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False))


def dataclass_settings(cls: type) -> dict[str, argparse.Action]:
    """The flags of a dataclass config by field name, to check settings that arrive in a file
    (a sweep's YAML) exactly as the command line checks them."""
    parser = argparse.ArgumentParser(add_help=False)
    add_dataclass_flags(parser, cls)
    return {a.dest: a for a in parser._actions}


def check_setting(action: argparse.Action, value: Any, where: str) -> Any:
    """One setting from a file, checked and converted as its flag would be."""
    return _yaml_value(action, value, where)
