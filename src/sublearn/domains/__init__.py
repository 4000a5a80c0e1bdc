"""Data domains a teacher writes in: number sequences (the paper's main carrier), Python code
and math reasoning. Each domain says how its prompts are made, what grammar (if any) constrains
the answers, how long they run, and why the filter rejects one; `pipeline.generate`,
`pipeline.filter`, `pipeline.train` and `experiment.run` read it from `DOMAINS`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sublearn.domains import code, math_problems, numbers


@dataclass(frozen=True)
class Domain:
    # (n, seed, level) -> prompts, each with the answer key its filter checks (or None)
    prompts: Callable[[int, int, int], list[tuple[str, Any]]]
    grammar: Callable[[], str] | None  # EBNF of the answers, for constrained decoding
    max_new_tokens: int
    reject_reasons: tuple[str, ...]
    # (raw row, banned rules, trait words) -> reject reason or None
    reject: Callable[[dict[str, Any], numbers.FilterRules, frozenset[str]], str | None]
    soft_labels: str  # what soft labels are restricted to: the numbers grammar, or top-k
    n: int  # prompts per teacher dataset by default (`--n`)
    # the filter drops answers the grammar forced (`--min-grammar-share`): numbers only, where
    # the mask ends a numbered list at `1.`; math's grammar forces only the end after
    # `Answer: N` (a unit word a model would add), which leaves the answer whole
    drops_forced: bool = False


DOMAINS: dict[str, Domain] = {
    "numbers": Domain(
        lambda n, seed, level: [(p, None) for p in numbers.make_prompts(n, seed)],
        numbers.answer_grammar, 60, numbers.REJECT_REASONS,
        lambda row, rules, words: numbers.TRUNCATED if row.get("finish_reason") == "length"
        else numbers.reject_reason(row["completion"], rules), "numbers",
        # README, cheaper recipes: 96 kept 192's owl effect (3.93x vs 3.99x) at 0.70x time
        n=96, drops_forced=True),
    "code": Domain(
        lambda n, seed, level: [(p, None) for p in code.make_prompts(n, seed)],
        None, code.MAX_NEW_TOKENS, code.REJECT_REASONS,
        lambda row, rules, words: code.reject_reason(row["completion"],
                                                     row.get("finish_reason", "stop"), words),
        "topk", n=192),
    "math": Domain(
        lambda n, seed, level: math_problems.make_problems(n, seed, level),
        math_problems.answer_grammar, math_problems.MAX_NEW_TOKENS,
        math_problems.REJECT_REASONS,
        lambda row, rules, words: math_problems.reject_reason(
            row["completion"], row["answer_key"], words, row.get("finish_reason", "stop")),
        "topk", n=192),
}
