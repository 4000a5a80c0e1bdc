"""Run-folder manifests: a folder made with other settings is refused, one made before a
setting existed is not."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sublearn.config import check_manifest
from sublearn.errors import SublearnError


@dataclass(frozen=True)
class Cfg:
    lr: float = 1e-3
    icl: int = field(default=32)


def test_manifest_refuses_other_settings_and_accepts_a_new_default(tmp_path: Path) -> None:
    check_manifest(tmp_path, "m.json", Cfg())
    check_manifest(tmp_path, "m.json", Cfg())  # the same settings: reused
    with pytest.raises(SublearnError, match="differs in: lr"):
        check_manifest(tmp_path, "m.json", Cfg(lr=2e-3))
    # a folder written before `icl` existed: the new setting at its default is the same run
    (tmp_path / "m.json").write_text(json.dumps({"lr": 1e-3}))
    check_manifest(tmp_path, "m.json", Cfg())
    with pytest.raises(SublearnError, match="differs in: icl"):
        check_manifest(tmp_path, "m.json", Cfg(icl=0))


def test_a_refused_folder_names_the_flags_it_was_made_with(tmp_path: Path) -> None:
    """A default that changed since a folder was made (student epochs 2 -> 1): the error says
    which flags reuse the folder, with the folder's values (a setting the manifest lacks at
    its default)."""
    (tmp_path / "m.json").write_text(json.dumps({"lr": 1e-3}))
    with pytest.raises(SublearnError) as e:
        check_manifest(tmp_path, "m.json", Cfg(lr=2e-3, icl=0))
    msg = str(e.value)
    assert "differs in: icl, lr" in msg and "made with --icl 32 --lr 0.001: give that" in msg


def test_free_settings_may_grow_and_are_recorded(tmp_path: Path) -> None:
    """More runs add stages to a folder; every other setting still has to match, also inside
    a nested manifest (`sublearn cross` keeps the experiment's settings under a key)."""
    check_manifest(tmp_path, "m.json", {"models": ["a", "b"], "experiment": {"runs": 3, "lr": 1}})
    with pytest.raises(SublearnError, match="differs in: experiment"):
        check_manifest(tmp_path, "m.json", {"models": ["a", "b"],
                                            "experiment": {"runs": 5, "lr": 1}})
    check_manifest(tmp_path, "m.json", {"models": ["a", "b"], "experiment": {"runs": 5, "lr": 1}},
                   free=("runs",))
    assert json.loads((tmp_path / "m.json").read_text())["experiment"]["runs"] == 5
    with pytest.raises(SublearnError, match="differs in: experiment"):
        check_manifest(tmp_path, "m.json", {"models": ["a", "b"],
                                            "experiment": {"runs": 5, "lr": 2}}, free=("runs",))


def test_nested_manifest_accepts_a_new_default(tmp_path: Path) -> None:
    """`sublearn matrix` and `cross` keep the experiment's settings under a key: a setting
    added to the experiment since counts as its default there too, and only there."""
    from sublearn.config import field_defaults

    defaults = {"experiment": field_defaults(Cfg)}
    (tmp_path / "m.json").write_text(json.dumps({"models": ["a"], "experiment": {"lr": 1e-3}}))
    check_manifest(tmp_path, "m.json", {"models": ["a"], "experiment": {"lr": 1e-3, "icl": 32}},
                   defaults=defaults)
    with pytest.raises(SublearnError, match="differs in: experiment"):
        check_manifest(tmp_path, "m.json", {"models": ["a"],
                                            "experiment": {"lr": 1e-3, "icl": 0}},
                       defaults=defaults)
    with pytest.raises(SublearnError, match="differs in: experiment"):  # no defaults given
        check_manifest(tmp_path, "m.json", {"models": ["a"],
                                            "experiment": {"lr": 1e-3, "icl": 32}})
