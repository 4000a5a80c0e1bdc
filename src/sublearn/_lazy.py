"""Lazy public names for a package's `__init__`: each name loads its module on first use, so
importing the package stays cheap (no torch) and imports no module it does not need."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_api(package: str, api: dict[str, str]) -> tuple[Callable[[str], Any],
                                                         Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`, whose public name -> defining module is
    `api`. A name is cached in the package's namespace once loaded."""
    def __getattr__(name: str) -> Any:
        if name in api:
            value = getattr(importlib.import_module(api[name]), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *api})

    return __getattr__, __dir__
