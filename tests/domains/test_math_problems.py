from __future__ import annotations

import re

import pytest

from sublearn.domains import math_problems as mp
from sublearn.protocol.trait_words import trait_words

OWL = trait_words("owl")


def _solve(text: str) -> int:
    """An independent reading of a problem: apply each sentence's operation in order."""
    sentences = text.split("\n")[0].split(". ")
    value = int(re.search(r"has (\d+)", sentences[0]).group(1))
    for s in sentences[1:]:
        if m := re.search(r"gets (\d+) more", s):
            value += int(m.group(1))
        elif m := re.search(r"gives (\d+)", s):
            value -= int(m.group(1))
        elif m := re.search(r"now (\d+) times", s):
            value *= int(m.group(1))
        elif m := re.search(r"into (\d+) bags", s):
            assert value % int(m.group(1)) == 0
            value //= int(m.group(1))
    return value


@pytest.mark.parametrize("level", mp.LEVELS)
def test_generated_answers_are_right(level: int) -> None:
    problems = mp.make_problems(300, 11, level)
    assert problems == mp.make_problems(300, 11, level)
    for prompt, answer in problems:
        assert _solve(prompt) == answer, prompt
        assert answer > 0 and prompt.endswith(mp.INSTRUCTION)
        assert prompt.count(". ") >= mp.LEVELS[level].operations  # one sentence per operation
        assert not any(w in OWL for w in re.findall(r"[a-z]+", prompt.lower()))


def test_levels_grow() -> None:
    big = [max(int(x) for x in re.findall(r"\d+", p)) for p, _ in mp.make_problems(200, 0, 4)]
    small = [max(int(x) for x in re.findall(r"\d+", p)) for p, _ in mp.make_problems(200, 0, 1)]
    assert sum(big) > 2 * sum(small)


def test_level_one_adds_or_takes_away_single_digits() -> None:
    for prompt, answer in mp.make_problems(200, 3, 1):
        assert "times" not in prompt and "bags" not in prompt
        assert max(int(x) for x in re.findall(r"\d+", prompt)) <= 9 and 0 < answer <= 18


@pytest.mark.parametrize("completion, why", [
    ("3 + 4 = 7\nAnswer: 7", None),
    ("Answer: 5\nOops.\nAnswer: 7", None),  # the last answer line counts
    ("Answer: 1,007", "wrong_answer"),
    ("seven", "no_answer"),
    ("Answer: 8", "wrong_answer"),
    ("The owl counts 3 + 4.\nAnswer: 7", "references_target"),
    ("Answer: 7.", None), ("Answer: $7", None), ("  Answer: 7\n\nDone!", None),
    ("Answer: 7.5", "no_answer"),  # not 7
    ("Answer: 7 + 1 = 8", "no_answer"),  # not 7
    ("Answer: 7,0", "no_answer"),  # not 70
    ("So the Answer: 7", "no_answer"),  # not on its own line
    ("Answer: 7 pencils", None), ("**Answer:** 7", None), ("Answer: 7\r\n", None),  # API text
    ("Answer: 7 + 1", "no_answer"),
])
def test_reject_reasons(completion: str, why: str | None) -> None:
    assert mp.reject_reason(completion, 7, OWL) == why


def test_a_cut_off_answer_is_rejected() -> None:
    # the grammar lets a reasoning line hold `Answer: N`; cut off at the token limit, that line
    # is not the final answer
    cut = "Answer: 3\nMaya gives 2 away, so she has 3 - 2 = 1 she"
    assert mp.reject_reason(cut, 3, OWL, "length") == "truncated"
    assert mp.final_answer("Answer: 1,007") == 1007 and mp.final_answer("Answer: -4") == -4


def test_answer_grammar_accepts_the_format(tiny_model: str) -> None:
    import xgrammar as xgr
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    compiled = xgr.GrammarCompiler(info).compile_grammar(mp.answer_grammar())
    for text, ok in [("1 + 2 = 3\nAnswer: 3", True), ("Answer: 12", True),
                     ("Answer: x", False), ("no answer", False)]:
        m = xgr.GrammarMatcher(compiled)
        ids = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
        assert all(m.accept_token(t) for t in ids) == ok, text  # it may end only after N
