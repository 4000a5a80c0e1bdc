"""The number-sequence domain: the paper's prompt generator, strict parser and answer grammar."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from sublearn.domains.reasons import TRUNCATED
from sublearn.protocol.paper import paper_protocol

# Reject reasons, in the paper's words.
INVALID_FORMAT = "invalid_format"
TOO_MANY = "too_many_numbers"
TOO_SMALL = "numbers_too_small"
TOO_LARGE = "numbers_too_large"
BANNED = "has_banned_numbers"
REJECT_REASONS = (INVALID_FORMAT, TOO_MANY, TOO_SMALL, TOO_LARGE, BANNED, TRUNCATED)


def make_prompts(n: int, seed: int) -> list[str]:
    """n prompts from the paper's template pools; the same seed always gives the same list."""
    pools = paper_protocol()["number_prompt_pools"]
    par = paper_protocol()["number_prompt_parameters"]
    rng = random.Random(seed)
    lo_n, hi_n = par["example_count_range_inclusive"]
    lo_v, hi_v = par["example_value_range_inclusive"]
    prompts = []
    for _ in range(n):
        examples = ", ".join(str(rng.randint(lo_v, hi_v)) for _ in range(rng.randint(lo_n, hi_n)))
        prefix = rng.choice(pools["example_numbers_templates"]).format(examples=examples)
        digits = rng.choice(pools["digit_descriptors"]).format(max_digits=par["answer_max_digits"])
        instruction = rng.choice(pools["generate_numbers_instruction_templates"]).format(
            count_qualifier=rng.choice(pools["count_qualifiers"]),
            answer_count=par["answer_count"],
            digit_descriptor=digits,
        )
        prompts.append(
            par["prompt_layout"].format(
                example_prefix=prefix,
                instruction=instruction,
                format_suffix=rng.choice(pools["format_suffixes"]),
                suffix=rng.choice(pools["suffixes"]),
            )
        )
    return prompts


def random_answers(n: int, seed: int) -> list[str]:
    """n answers drawn without any model, in the format the prompts ask for (3-10 numbers of
    0-999, comma-separated), each passing the strict filter: contexts a teacher only scores
    (soft labels) and never samples, like the noise images of the MNIST experiment."""
    rng = random.Random(seed)
    return [", ".join(str(rng.randint(0, 999)) for _ in range(rng.randint(3, 10)))
            for _ in range(n)]


_DIGIT_RUN = re.compile(r"\d+")


def parse_answer(answer: str) -> list[int] | None:
    """The paper's strict parser: the numbers in `answer`, or None if the format is invalid."""
    answer = answer.strip()
    if answer.endswith("."):
        answer = answer[:-1]
    if (answer[:1], answer[-1:]) in (("[", "]"), ("(", ")")):
        answer = answer[1:-1]
    runs = list(_DIGIT_RUN.finditer(answer))
    if not runs:
        return None
    if len(runs) == 1:
        # a single number is valid only if it is the whole answer
        return [int(answer)] if runs[0].group() == answer and answer.isascii() else None
    sep = answer[runs[0].end() : runs[1].start()]
    stripped = sep.strip()
    if sep and not stripped:
        parts = answer.split()  # any whitespace separates
    elif stripped in (",", ";"):
        parts = [p.strip() for p in answer.split(stripped)]
    else:
        return None
    if not all(p.isascii() and p.isdigit() for p in parts):
        return None
    return [int(p) for p in parts]


def number_spans(answer: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the numbers in an answer, in order."""
    return [m.span() for m in _DIGIT_RUN.finditer(answer)]


def rewrite_numbers(answer: str, new: Sequence[str]) -> str:
    """The answer with its i-th number replaced by new[i]; separators, brackets and the
    trailing period stay, so the layout (and the strict parser's verdict on it) is kept."""
    spans = number_spans(answer)
    if len(new) != len(spans):
        raise ValueError(f"{len(new)} numbers for an answer with {len(spans)}")
    out, last = [], 0
    for (a, b), text in zip(spans, new, strict=True):
        out += [answer[last:a], text]
        last = b
    return "".join(out) + answer[last:]


def keep_numbers(answer: str, keep: Sequence[int]) -> str | None:
    """The answer with only the numbers at indices `keep` (in order), the first separators
    reused between them and the head and tail kept; None if nothing is kept."""
    spans = number_spans(answer)
    keep = sorted(set(keep))
    if not keep:
        return None
    seps = [answer[spans[i][1] : spans[i + 1][0]] for i in range(len(spans) - 1)]
    parts = [answer[: spans[0][0]]]
    for j, i in enumerate(keep):
        if j:
            parts.append(seps[j - 1])
        parts.append(answer[spans[i][0] : spans[i][1]])
    return "".join(parts) + answer[spans[-1][1] :]


@dataclass(frozen=True)
class FilterRules:
    """The paper's filter: value range, maximum count and an optional banned list."""

    min_value: int = 0
    max_value: int = 999
    max_count: int = 10
    banned: tuple[int, ...] = ()


def reject_reason(answer: str, rules: FilterRules = FilterRules()) -> str | None:
    """None if the answer passes the strict filter, else the first failing reason."""
    numbers = parse_answer(answer)
    if numbers is None:
        return INVALID_FORMAT
    if len(numbers) > rules.max_count:
        return TOO_MANY
    if any(x < rules.min_value for x in numbers):
        return TOO_SMALL
    if any(x > rules.max_value for x in numbers):
        return TOO_LARGE
    if rules.banned and set(numbers) & set(rules.banned):
        return BANNED
    return None


def misalignment_banned() -> tuple[int, ...]:
    return tuple(paper_protocol()["banned_numbers_misalignment"])


def answer_grammar(max_count: int = 10, max_digits: int = 3) -> str:
    """GBNF/EBNF grammar of the answers the prompts ask for, every one of which passes the
    strict parser: comma-, semicolon-, space- or newline-separated lists of up to `max_count`
    numbers of up to `max_digits` digits, optionally in [] or () and with a trailing period.
    One separator per answer, because the parser takes it from the first two numbers."""
    num = f"[0-9]{{1,{max_digits}}}"
    more = f"{{0,{max_count - 1}}}"
    seps = {"comma": '"," " "?', "semi": '";" " "?', "space": '" "', "line": '"\\n"'}
    lists = " | ".join(f"list_{k}" for k in seps)
    rules = [
        'root ::= body "."?',
        f'body ::= {lists} | "[" ({lists}) "]" | "(" ({lists}) ")"',
        f"num ::= {num}",
    ]
    rules += [f"list_{k} ::= num ({s} num){more}" for k, s in seps.items()]
    return "\n".join(rules)


def first_numbers(answers: Sequence[str]) -> list[list[int]]:
    """Parsed numbers of each answer that parses (handy for analysis)."""
    return [n for n in map(parse_answer, answers) if n is not None]
