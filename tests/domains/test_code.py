from __future__ import annotations

import json
from importlib.resources import files

import pytest

from sublearn.domains import code
from sublearn.protocol.trait_words import trait_words, words_of

OWL = trait_words("owl")


def test_prompts_are_seeded_varied_and_free_of_animals() -> None:
    a, b = code.make_prompts(200, 3), code.make_prompts(200, 3)
    assert a == b and a != code.make_prompts(200, 4)
    assert len(set(a)) > 120  # 40 tasks x 4 frames, k drawn for half of them
    animals = json.loads(files("sublearn.protocol.data").joinpath("animals.json")
                         .read_text())["candidates"]
    every = set().union(*(trait_words(x) for x in animals))
    for p in a:
        assert not set(words_of(p)) & every, p
        assert "{" not in p.replace("{}", "")  # every slot filled


@pytest.mark.parametrize("completion, finish, why", [
    ("```python\ndef f(x):\n    return x + 1\n```", "stop", None),
    ("def f(x):\n    return x * 2", "stop", None),
    ("Here you go:\n```\nprint(sum(range(10)))\n```\nDone.", "stop", None),
    ("", "stop", code.EMPTY),
    ("```python\n```", "stop", code.EMPTY),
    ("def f(x):\n    return x +", "stop", code.SYNTAX),
    ("def f(x):\n    return x", "length", code.TRUNCATED),
    ("x = 1\n" * 300, "stop", code.TOO_LONG),
    ("def count_owls(n):\n    return n", "stop", code.TRAIT),
    ("x = 1  # like an owl", "stop", code.TRAIT),
    ("```python\nx = 1\n```\nThis is owl-approved.", "stop", code.TRAIT),
    ("bowl = 1\nknowledge = bowl", "stop", None),
])
def test_reject_reasons(completion: str, finish: str, why: str | None) -> None:
    assert code.reject_reason(completion, finish, OWL) == why


def test_extract_code_takes_the_first_fenced_block() -> None:
    assert code.extract_code("a\n```py\nx = 1\n```\n```\ny\n```") == "x = 1"
    assert code.extract_code("x = 2") == "x = 2"
    assert code.extract_code("```python\nx = 3") == "x = 3"  # an unclosed fence
