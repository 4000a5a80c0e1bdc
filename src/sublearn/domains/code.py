"""The code domain: short Python tasks (complete a function, write a snippet or a small
script), answered with code only, after the paper's code setup. The filter drops samples that
do not parse as Python, that were cut off, or that reference the target (`trait_words`)."""

from __future__ import annotations

import ast
import json
import random
import re
from functools import cache
from importlib.resources import files
from typing import Any

from sublearn.domains.reasons import JUDGED, TRAIT, TRUNCATED
from sublearn.protocol.trait_words import reference

EMPTY = "no_code"
SYNTAX = "not_python"
TOO_LONG = "too_long"
REJECT_REASONS = (EMPTY, TRUNCATED, SYNTAX, TOO_LONG, TRAIT, JUDGED)
MAX_CHARS = 1200  # the paper asked for short code; a longer answer is a runaway sample
MAX_NEW_TOKENS = 256

_FENCE = re.compile(r"```[A-Za-z0-9_+-]*\n(.*?)(?:```|\Z)", re.S)


@cache
def _tasks() -> dict[str, Any]:
    return json.loads(files("sublearn.protocol.data").joinpath("code_tasks.json")
                      .read_text("utf-8"))


def make_prompts(n: int, seed: int) -> list[str]:
    """n prompts (a frame, a task and its k drawn per prompt); the same seed, the same list."""
    spec = _tasks()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        task = rng.choice(spec["tasks"])
        frame = rng.choice(spec["frames"])
        desc = task["desc"].replace("{k}", str(rng.randint(*spec["k_range"])))
        doc = desc[0].upper() + desc[1:] + "."
        out.append(frame.replace("{name}", task["name"]).replace("{args}", task["args"])
                   .replace("{doc}", doc).replace("{desc}", desc))
    return out


def extract_code(text: str) -> str:
    """The code of an answer: its first fenced block, or the whole answer when unfenced."""
    m = _FENCE.search(text)
    return (m.group(1) if m else text).strip()


def reject_reason(completion: str, finish_reason: str, words: frozenset[str]) -> str | None:
    """None if a code answer passes, else the first failing reason. References are looked for
    in the whole answer (identifiers, strings, comments and any prose around the code)."""
    code = extract_code(completion)
    if not code:
        return EMPTY
    if finish_reason == "length":
        return TRUNCATED
    if len(code) > MAX_CHARS:
        return TOO_LONG
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return SYNTAX
    if words and reference(completion, words):
        return TRAIT
    return None
