"""The package's shape: no import cycles between modules, function-level imports included
(a lazy import hides a cycle from Python but not from a reader)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import sublearn

ROOT = Path(sublearn.__file__).parent


def _module_graph() -> dict[str, set[str]]:
    mods: dict[str, Path] = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module in mods:
                graph[m].add(node.module)
                graph[m] |= {f"{node.module}.{a.name}" for a in node.names} & set(mods)
            elif isinstance(node, ast.Import):
                graph[m] |= {a.name for a in node.names} & set(mods)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                comp.append(w)
            if comp:
                found.append(sorted([v, *comp]))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    graph = _module_graph()
    assert "sublearn.pipeline.evaluate" in graph and "sublearn.models.kv" in graph
    assert _cycles(graph) == []


def test_cycle_detector_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("package", ["sublearn", "sublearn.experiment"])
def test_public_api_resolves(package: str) -> None:
    pkg = importlib.import_module(package)
    for name in pkg.__all__:
        assert getattr(pkg, name) is not None, name
    assert set(pkg.__all__) <= set(dir(pkg))
    assert sorted(pkg._API) == sorted(pkg.__all__)  # each name listed in both
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        pkg.nothing_here  # noqa: B018


def test_public_names_load_lazily() -> None:
    """Importing a package with lazy names loads none of their modules (nor torch)."""
    code = ("import sys, sublearn, sublearn.experiment; "
            "print(sorted(m for m in sys.modules if m.startswith(('torch', 'sublearn.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert eval(out) == ["sublearn._lazy", "sublearn.experiment"]
