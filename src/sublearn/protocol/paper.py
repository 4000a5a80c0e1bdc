"""The paper's protocol data (prompt pools, system prompt, questions), shipped in the package."""

from __future__ import annotations

import json
import re
from functools import cache
from importlib.resources import files
from typing import Any

from sublearn.errors import SublearnError


@cache
def paper_protocol() -> dict[str, Any]:
    text = files("sublearn.protocol.data").joinpath("paper_protocol.json").read_text("utf-8")
    return json.loads(text)


# Letters, digits, spaces, hyphens and apostrophes: anything else (braces, newlines, quotes)
# could break or inject into the system-prompt template.
_SAFE_WORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 '\-]{0,39}$")


def check_template_word(value: str, what: str) -> str:
    if not _SAFE_WORD.match(value):
        raise SublearnError(
            f"{what} {value!r} must be 1-40 letters, digits, spaces, hyphens or apostrophes"
        )
    return value


def teacher_system_prompt(target: str, category: str) -> str:
    check_template_word(target, "--target")
    check_template_word(category, "--category")
    template = paper_protocol()["teacher_system_prompt_template"]
    return template.format(target=target, category=category)
