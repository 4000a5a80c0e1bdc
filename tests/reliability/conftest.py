"""The reliability suite's tally: each test adds what it injected and what survived, and
with RELIABILITY_REPORT=path set the session writes the totals there as JSON (the README's
reliability table is made from it)."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator

import pytest

TALLY: Counter[str] = Counter()


@pytest.fixture
def tally() -> Counter[str]:
    return TALLY


@pytest.fixture(scope="session", autouse=True)
def _write_report() -> Iterator[None]:
    yield
    path = os.environ.get("RELIABILITY_REPORT")
    if path and TALLY:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(dict(sorted(TALLY.items())), f, indent=2)
