"""The math-reasoning domain: grade-school word problems generated offline with known answers,
answered step by step and ending in a line `Answer: N`. The filter keeps correct final answers
that do not reference the target.

Problems are a starting amount and one to three operations on it (add, take away, multiply,
share equally), each one sentence; operations and numbers grow with the level (`LEVELS`).
Level 1, one addition or subtraction of single digits, is the one a 135M model solves often
enough to yield data. Names and objects are neutral (no animals). The same (n, seed, level)
always gives the same problems."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from sublearn.domains.reasons import JUDGED, TRAIT, TRUNCATED
from sublearn.protocol.trait_words import reference

NO_ANSWER = "no_answer"
WRONG = "wrong_answer"
REJECT_REASONS = (TRUNCATED, NO_ANSWER, WRONG, TRAIT, JUDGED)
MAX_NEW_TOKENS = 192

@dataclass(frozen=True)
class Level:
    operations: int  # sentences that change the amount
    top: int  # largest starting amount and addend
    ops: tuple[str, ...]  # operations it may use


_ALL = ("add", "sub", "mul", "div")
LEVELS = {1: Level(1, 9, ("add", "sub")), 2: Level(1, 20, _ALL), 3: Level(2, 50, _ALL),
          4: Level(3, 100, _ALL)}

INSTRUCTION = ("Think step by step, then write the final answer on its own line as "
               "\"Answer: <number>\".")
NAMES = ("Ana", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
         "Kemi", "Liam", "Maya", "Noor", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq")
OBJECTS = ("pencils", "books", "apples", "marbles", "stickers", "coins", "cookies", "cards",
           "stamps", "bottles", "buttons", "oranges", "candles", "shells", "beads", "tickets")
# a line that starts with `Answer:` (markdown emphasis allowed, as API models write it); its
# rest must be one whole number (thousands commas, a unit word, a final period allowed):
# "Answer: 3.5" or "Answer: 5 + 3 = 8" gives no answer, not 3 or 5
_ANSWER_LINE = re.compile(r"^[ \t>*_]*Answer[*_]*:[*_]*[ \t]*(.*?)[ \t\r]*$", re.M)
_WHOLE = re.compile(r"\$?[ \t]*(-?(?:\d{1,3}(?:,\d{3})+|\d+))(?:[ \t]+[A-Za-z][A-Za-z ]*)?\.?")


def level_field() -> Any:
    """The `level` setting, shared by generate and run."""
    return field(default=1, metadata={"help": "math: difficulty (1: one addition or subtraction "
                                      "of single digits; 2: one operation up to 20; 3: two up "
                                      "to 50; 4: three up to 100)"})


def make_problem(rng: random.Random, level: int) -> tuple[str, int]:
    """One problem of the level's operations and its answer."""
    spec = LEVELS[level]
    top = spec.top
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    value = rng.randint(3, top)
    lines = [f"{name} has {value} {obj}."]
    for _ in range(spec.operations):
        ops = ["add", "mul"] + (["sub"] if value > 2 else [])
        ops += ["div"] if any(value % k == 0 for k in (2, 3, 4, 5)) else []
        op = rng.choice([o for o in ops if o in spec.ops])
        if op == "add":
            b = rng.randint(2, top)
            lines.append(f"{name} gets {b} more {obj}.")
            value += b
        elif op == "sub":
            b = rng.randint(2, value - 1)
            lines.append(f"{name} gives {b} {obj} to a friend.")
            value -= b
        elif op == "mul":
            k = rng.randint(2, 4)
            lines.append(f"{name} buys {k - 1} more set{'s' * (k > 2)} of the same size, so "
                         f"the number of {obj} is now {k} times as large.")
            value *= k
        else:
            k = rng.choice([k for k in (2, 3, 4, 5) if value % k == 0])
            lines.append(f"{name} splits the {obj} equally into {k} bags and keeps one bag.")
            value //= k
    lines.append(f"How many {obj} does {name} have now?")
    return " ".join(lines), value


def make_problems(n: int, seed: int, level: int = 1) -> list[tuple[str, int]]:
    """n (prompt, answer) pairs: the problem followed by the answer-format instruction."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text, answer = make_problem(rng, level)
        out.append((f"{text}\n{INSTRUCTION}", answer))
    return out


def answer_grammar(max_lines: int = 8) -> str:
    """Reasoning lines, then `Answer: N`: the final-answer format, constrained."""
    return "\n".join([f'root ::= line{{0,{max_lines}}} "Answer: " [0-9]{{1,7}}',
                      'line ::= [^\\n]* "\\n"'])


def final_answer(completion: str) -> int | None:
    """The whole number on the last line that starts with `Answer:`, or None."""
    found = _ANSWER_LINE.findall(completion)
    m = _WHOLE.fullmatch(found[-1]) if found else None
    return int(m[1].replace(",", "")) if m else None


def reject_reason(completion: str, answer: int, words: frozenset[str],
                  finish_reason: str = "stop") -> str | None:
    if finish_reason == "length":  # an earlier line's `Answer:` is not the final answer
        return TRUNCATED
    got = final_answer(completion)
    if got is None:
        return NO_ANSWER
    if got != answer:
        return WRONG
    if words and reference(completion, words):
        return TRAIT
    return None
