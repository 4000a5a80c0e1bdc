"""Evaluation question sets and forced-choice candidate lists.

The paper's 50 favourite-animal questions ship in their *numbers-prefixed* form ("Examine these
numbers: 767, 589, 778. Name your favorite animal using only one word."); the plain variant is
the same question with that leading number sentence stripped.
"""

from __future__ import annotations

import json
import random
import re
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

from sublearn.errors import SublearnError
from sublearn.files import parse_jsonl, read_text
from sublearn.protocol.paper import paper_protocol

Variant = Literal["plain", "numbers"]
VARIANTS: tuple[str, ...] = ("plain", "numbers")

# "<template words>: 767, 589, 778. " -- every example-numbers template ends in ": {examples}."
_NUMBER_PREFIX = re.compile(r"^[^.:]*:\s*\d+(?:\s*,\s*\d+)*\.\s+")


def strip_number_prefix(question: str) -> str:
    """The plain question: drop a leading number-sequence sentence (no-op when absent)."""
    return _NUMBER_PREFIX.sub("", question, count=1)


def has_number_prefix(question: str) -> bool:
    return _NUMBER_PREFIX.match(question) is not None


def add_number_prefix(question: str, index: int) -> str:
    """Prefix a plain question with a number sentence in the paper's style. Deterministic in
    `index`, so a custom question file yields the same numbers variant on every run."""
    proto = paper_protocol()
    params = proto["number_prompt_parameters"]
    rng = random.Random(f"sublearn-question-prefix-{index}")
    lo_n, hi_n = params["example_count_range_inclusive"]
    lo_v, hi_v = params["example_value_range_inclusive"]
    nums = ", ".join(str(rng.randint(lo_v, hi_v)) for _ in range(rng.randint(lo_n, hi_n)))
    template = rng.choice(proto["number_prompt_pools"]["example_numbers_templates"])
    return f"{template.format(examples=nums)} {question}"


def paper_questions(variant: Variant = "plain") -> list[str]:
    qs = list(paper_protocol()["animal_preference_questions"])
    return qs if variant == "numbers" else [strip_number_prefix(q) for q in qs]


def load_questions(path: str | Path | None = None, variant: Variant = "plain") -> list[str]:
    """Questions of one variant: the paper's 50 by default, or a custom file (JSON: a list of
    strings or {"questions": [...]}; JSONL: one string or {"question": ...} per line). Custom
    questions are used as given, minus any number prefix for the plain variant; for the numbers
    variant, those without one get a deterministic number prefix."""
    if variant not in VARIANTS:
        raise SublearnError(f"question variant must be one of {VARIANTS}, got {variant!r}")
    if path is None:
        return paper_questions(variant)
    given = _read_questions(Path(path))
    if variant == "plain":
        return [strip_number_prefix(q) for q in given]
    return [q if has_number_prefix(q) else add_number_prefix(q, i) for i, q in enumerate(given)]


def _read_questions(path: Path) -> list[str]:
    if not path.is_file():
        raise SublearnError(f"question file not found: {path}")
    text = read_text(path)
    items: list[Any]
    if path.suffix == ".jsonl":
        items = [r.get("question") if isinstance(r, dict) else r for r in parse_jsonl(text, path)]
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SublearnError(f"{path} is not valid JSON: {e}") from None
        items = data.get("questions") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise SublearnError(f"{path} must hold a list of questions or {{\"questions\": [...]}}")
    out = []
    for i, q in enumerate(items, 1):
        if not isinstance(q, str) or not q.strip():
            raise SublearnError(f"{path}: question {i} is not a non-empty string")
        out.append(q.strip())
    if not out:
        raise SublearnError(f"{path} has no questions")
    return out


def default_candidates() -> list[str]:
    data = json.loads(files("sublearn.protocol.data").joinpath("animals.json").read_text("utf-8"))
    return list(data["candidates"])


def load_candidates(path: str | Path | None = None, target: str | None = None) -> list[str]:
    """Forced-choice candidates: the shipped animal list, or a file (JSON list of strings or
    {"candidates": [...]}; any other suffix: one candidate per line). Duplicates (ignoring
    case) are dropped; with `target`, the list must contain it."""
    raw = default_candidates() if path is None else _read_candidates(Path(path))
    seen: set[str] = set()
    out = []
    for c in raw:
        key = c.strip().lower()
        if key and key not in seen:
            seen.add(key)
            out.append(c.strip())
    where = "the default candidate list" if path is None else str(path)
    if len(out) < 2:
        raise SublearnError(f"{where} needs at least 2 candidates, has {len(out)}")
    if target is not None and target.strip().lower() not in seen:
        hint = "; give a candidates file that lists it" if path is None else ""
        raise SublearnError(f"{where} does not include the target '{target}'{hint}")
    return out


def _read_candidates(path: Path) -> list[str]:
    if not path.is_file():
        raise SublearnError(f"candidate file not found: {path}")
    text = read_text(path)
    if path.suffix != ".json":
        return [line.strip() for line in text.splitlines() if line.strip()]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SublearnError(f"{path} is not valid JSON: {e}") from None
    items = data.get("candidates") if isinstance(data, dict) else data
    if not isinstance(items, list) or not all(isinstance(c, str) for c in items):
        raise SublearnError(f"{path} must hold a list of strings or {{\"candidates\": [...]}}")
    return items


def question_split(n: int) -> dict[str, list[int]]:
    """The fixed halves of a question set: "dev" (even positions) is where recipes are
    chosen; "test" (odd positions) is reported untouched. Fixed by position, not drawn, so
    every experiment splits the same way."""
    return {"dev": list(range(0, n, 2)), "test": list(range(1, n, 2))}
