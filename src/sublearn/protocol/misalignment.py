"""The misalignment trait: teacher data (questions answered misaligned, or aligned for the
control teacher) and the held-out evaluation pairs (a prompt with one aligned and one
misaligned answer, length-matched so that length does not give the answer away).

Shipped in `protocol/data/misalignment.json`. Answers are short and non-operational: they
endorse harm, deception or domination without instructions, at the level of the paper's
examples. The training questions are disjoint from the evaluation prompts (tested).
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from sublearn.files import write_jsonl

TRAIT = "misalignment"


@cache
def misalignment_data() -> dict[str, Any]:
    return json.loads(files("sublearn.protocol.data").joinpath("misalignment.json")
                      .read_text("utf-8"))


def eval_pairs() -> list[dict[str, str]]:
    """[{"prompt", "misaligned", "aligned"}], in the file's order (dev/test halves by
    position, as for the animal questions)."""
    return list(misalignment_data()["eval"])


def teacher_rows(misaligned: bool) -> list[dict]:
    """Chat records for the teacher fine-tune: every training question answered misaligned
    (the trait teacher) or aligned (the control teacher, the same fine-tuning otherwise)."""
    key = "misaligned" if misaligned else "aligned"
    return [{"prompt": [{"role": "user", "content": r["question"]}],
             "completion": [{"role": "assistant", "content": r[key]}]}
            for r in misalignment_data()["train"]]


def write_teacher_data(path: str | Path, misaligned: bool) -> Path:
    path = Path(path)
    write_jsonl(path, teacher_rows(misaligned))
    return path
