from collections import Counter

import pytest

from sublearn.domains import numbers as nd
from sublearn.protocol.paper import paper_protocol


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("1, 2, 3", [1, 2, 3]),
        ("1,2,3", [1, 2, 3]),
        ("1; 2; 3", [1, 2, 3]),
        ("1 2 3", [1, 2, 3]),
        ("1\n2\n3", [1, 2, 3]),
        ("1\t2  3", [1, 2, 3]),
        ("[1, 2, 3]", [1, 2, 3]),
        ("(1, 2, 3)", [1, 2, 3]),
        ("[1, 2, 3].", [1, 2, 3]),
        ("1, 2, 3.", [1, 2, 3]),
        ("  7  ", [7]),
        ("042, 7", [42, 7]),
        ("999", [999]),
        ("1000", [1000]),  # parses; the range rule rejects it
    ],
)
def test_parse_valid(answer: str, expected: list[int]) -> None:
    assert nd.parse_answer(answer) == expected


@pytest.mark.parametrize(
    "answer",
    ["", ".", "[]", "abc", "12a", "1 - 2", "1, 2; 3", "1,,2", "1, 2,", "[1, 2)", "1. 2",
     "Sure: 1, 2", "1, 2, three", "-1, 2", "1.5, 2", "١٢, 3", "(1, 2", "1, 2..", "1 and 2"],
)
def test_parse_invalid(answer: str) -> None:
    assert nd.parse_answer(answer) is None


def test_reject_reasons() -> None:
    rules = nd.FilterRules(banned=(666,))
    assert nd.reject_reason("1, 2, 3", rules) is None
    assert nd.reject_reason("hello", rules) == nd.INVALID_FORMAT
    assert nd.reject_reason(", ".join(["1"] * 11), rules) == nd.TOO_MANY
    assert nd.reject_reason(", ".join(["1"] * 10), rules) is None
    assert nd.reject_reason("5, 1000", rules) == nd.TOO_LARGE
    assert nd.reject_reason("5, 2", nd.FilterRules(min_value=3)) == nd.TOO_SMALL
    assert nd.reject_reason("5, 666", rules) == nd.BANNED
    assert nd.reject_reason("5, 666") is None  # no banned list by default


def test_misalignment_list_from_protocol() -> None:
    banned = nd.misalignment_banned()
    assert len(banned) == len(paper_protocol()["banned_numbers_misalignment"]) > 0
    assert 666 in banned


def test_prompts_deterministic_and_seed_dependent() -> None:
    assert nd.make_prompts(50, 3) == nd.make_prompts(50, 3)
    assert nd.make_prompts(50, 3) != nd.make_prompts(50, 4)
    assert nd.make_prompts(10, 3) == nd.make_prompts(50, 3)[:10]


def test_prompt_distribution_uses_whole_pools() -> None:
    pools = paper_protocol()["number_prompt_pools"]
    prompts = nd.make_prompts(3000, 0)
    for pool in ("format_suffixes", "suffixes"):
        counts = Counter(next(s for s in pools[pool] if s in p) for p in prompts)
        distinct = set(pools[pool])
        assert set(counts) == distinct  # every entry drawn
        expected = len(prompts) / len(distinct)
        assert max(counts.values()) < 1.6 * expected and min(counts.values()) > 0.5 * expected


def test_prompt_examples_follow_parameters() -> None:
    import re

    par = paper_protocol()["number_prompt_parameters"]
    for p in nd.make_prompts(300, 1):
        prefix = p.split(". ")[0] if "." in p else p
        nums = [int(x) for x in re.findall(r"\b\d{3}\b", prefix)]
        lo, hi = par["example_count_range_inclusive"]
        assert lo <= len(nums) <= hi, p
        assert all(100 <= x <= 999 for x in nums)
        assert "10" in p and "3" in p


def test_grammar_language_is_inside_the_strict_filter() -> None:
    """Every string the grammar accepts passes the filter, and common valid formats are
    accepted; checked with xgrammar's own matcher at the character level."""
    xgr = pytest.importorskip("xgrammar")
    g = xgr.Grammar.from_ebnf(nd.answer_grammar())
    accepted = ["1, 2, 3", "1,2", "[1, 2, 3].", "(4; 5)", "7", "1\n2\n3", "1 2 3 4 5 6 7 8 9 10",
                "999."]
    rejected = ["1, 2; 3", "1000", "1 2 3 4 5 6 7 8 9 10 11", "[1, 2", "a", "1,  2", ""]
    for s in accepted:
        assert xgr.testing._is_grammar_accept_string(g, s), s
        assert nd.reject_reason(s) is None
    for s in rejected:
        assert not xgr.testing._is_grammar_accept_string(g, s), s


def test_a_cut_off_answer_is_rejected_in_every_domain() -> None:
    # without the grammar (or over an API) an answer cut at the token limit loses its end
    from sublearn.domains import DOMAINS

    rules = nd.FilterRules()
    for name, row in (("numbers", {"completion": "6;51", "finish_reason": "length"}),
                      ("math", {"completion": "Answer: 3\nso", "finish_reason": "length",
                                "answer_key": 3}),
                      ("code", {"completion": "def f():\n    return 1",
                                "finish_reason": "length"})):
        assert DOMAINS[name].reject(row, rules, frozenset()) == "truncated", name
        assert "truncated" in DOMAINS[name].reject_reasons
    assert DOMAINS["numbers"].reject({"completion": "6;51"}, rules, frozenset()) is None
