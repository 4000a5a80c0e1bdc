"""The defences: each turns a list of training records (prompt/completion chat rows of number
answers) into another list whose every answer still passes the strict filter.

Model-free: sort, shuffle, mix-teachers. Scored (a suspected teacher vs the base,
`sublearn.audit.scores`): replace-divergent, mask-divergent, drop-top-lls. Model-written:
resample, paraphrase (another model writes the answers, under the numbers grammar).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sublearn.domains import numbers


@dataclass
class Context:
    """What a defence may use besides the rows."""

    rng: random.Random
    q: float = 0.1  # fraction for the scored defences
    rules: numbers.FilterRules = field(default_factory=numbers.FilterRules)
    scores: list[Any] | None = None  # SampleScore per row (scored defences)
    mix: list[list[dict]] = field(default_factory=list)  # other teachers' rows (mix-teachers)
    # model-written answers (None: one the grammar forced)
    writer: Callable[[list[str], list[str | None]], list[str | None]] | None = None


@dataclass(frozen=True)
class Defence:
    fn: Callable[[list[dict], Context], tuple[list[dict], dict[str, Any]]]
    help: str
    needs: str | None = None  # "scores", "writer" or "mix"


def answer(row: dict) -> str:
    return row["completion"][0]["content"]


def with_answer(row: dict, text: str) -> dict:
    row = copy.deepcopy(row)
    row["completion"][0]["content"] = text
    return row


def _reorder(rows: list[dict], order: Callable[[list[str]], list[str]]
             ) -> tuple[list[dict], dict]:
    """Each answer with its numbers put in `order` (the layout kept)."""
    changed, out = 0, []
    for r in rows:
        a = answer(r)
        nums = [a[i:j] for i, j in numbers.number_spans(a)]
        new = order(nums)
        changed += new != nums
        out.append(with_answer(r, numbers.rewrite_numbers(a, new)))
    return out, {"answers_changed": changed}


def _sort(rows: list[dict], ctx: Context) -> tuple[list[dict], dict]:
    return _reorder(rows, lambda nums: sorted(nums, key=int))


def _shuffle(rows: list[dict], ctx: Context) -> tuple[list[dict], dict]:
    def shuffled(nums: list[str]) -> list[str]:
        new = nums[:]
        ctx.rng.shuffle(new)
        return new

    return _reorder(rows, shuffled)


def _digit_positions(rows: list[dict], scores: list[Any]) -> list[tuple[float, int, int, int]]:
    """(kl, row, char offset, number index) of every answer token that is one digit: the
    numbers grammar's tokenizers split digits (checked), so a token maps to one character."""
    found = []
    for r, sc in enumerate(scores):
        a = answer(rows[r])
        spans = numbers.number_spans(a)
        pos = 0
        for tok, kl in zip(sc.tokens, sc.token_kl, strict=False):
            text = tok.replace("Ġ", " ").replace("Ċ", "\n")
            at = a.find(text, pos) if text else -1
            if at < 0:
                continue
            pos = at + len(text)
            if len(text) > 1 and any(c.isdigit() for c in text):
                from sublearn.errors import SublearnError

                raise SublearnError(f"token {tok!r} holds several characters with a digit: the "
                                    "divergence defences need a tokenizer that splits digits")
            if len(text) == 1 and text.isdigit():
                num = next(k for k, (i, j) in enumerate(spans) if i <= at < j)
                found.append((kl, r, at, num))
    return found


def _top(found: list[tuple], q: float) -> list[tuple]:
    k = round(q * len(found))
    return sorted(found, key=lambda f: (-f[0], f[1], f[2]))[:k]


def _replace_divergent(rows: list[dict], ctx: Context) -> tuple[list[dict], dict]:
    found = _digit_positions(rows, ctx.scores or [])
    top = _top(found, ctx.q)
    by_row: dict[int, list[int]] = {}
    for _, r, at, _ in top:
        by_row.setdefault(r, []).append(at)
    out, redrawn, replaced = [], 0, 0
    for r, row in enumerate(rows):
        a = answer(row)
        if r in by_row:
            for _ in range(100):  # redraw until the answer passes the filter (banned numbers)
                chars = list(a)
                for at in by_row[r]:
                    chars[at] = str(ctx.rng.randrange(10))
                new = "".join(chars)
                if numbers.reject_reason(new, ctx.rules) is None:
                    break
                redrawn += 1
            else:
                new = a  # never emit an invalid answer
            replaced += len(by_row[r]) if new is not a else 0
            a = new
        out.append(with_answer(row, a))
    return out, {"digits_replaced": replaced, "digits_scored": len(found), "redraws": redrawn}


def _mask_divergent(rows: list[dict], ctx: Context) -> tuple[list[dict], dict]:
    top = _top(_digit_positions(rows, ctx.scores or []), ctx.q)
    drop: dict[int, set[int]] = {}
    for _, r, _, num in top:
        drop.setdefault(r, set()).add(num)
    out, removed, emptied = [], 0, 0
    for r, row in enumerate(rows):
        a = answer(row)
        if r in drop:
            n = len(numbers.number_spans(a))
            new = numbers.keep_numbers(a, [i for i in range(n) if i not in drop[r]])
            removed += len(drop[r])
            if new is None or numbers.reject_reason(new, ctx.rules) is not None:
                emptied += 1
                continue
            a = new
        out.append(with_answer(row, a))
    return out, {"numbers_removed": removed, "rows_dropped": emptied}


def _drop_top_lls(rows: list[dict], ctx: Context) -> tuple[list[dict], dict]:
    scores = ctx.scores or []
    k = round(ctx.q * len(rows))
    ranked = sorted(range(len(rows)), key=lambda i: (-scores[i].lls_mean, i))
    dropped = set(ranked[:k])
    return [r for i, r in enumerate(rows) if i not in dropped], {"rows_dropped": k}


def _mix(rows: list[dict], ctx: Context) -> tuple[list[dict], dict]:
    """Equal shares of each teacher's rows (the remainder to the first ones), as many rows as
    the input while every source has enough, in a seeded order."""
    sources = [rows, *ctx.mix]
    share, extra = divmod(len(rows), len(sources))
    out = []
    for i, src in enumerate(sources):
        out += ctx.rng.sample(src, min(share + (i < extra), len(src)))
    ctx.rng.shuffle(out)
    return out, {"teachers": len(sources), "rows_per_teacher": share}


def _resample(rows: list[dict], ctx: Context) -> tuple[list[dict], dict]:
    return _written(rows, ctx, [None] * len(rows))


def _paraphrase(rows: list[dict], ctx: Context) -> tuple[list[dict], dict]:
    return _written(rows, ctx, [answer(r) for r in rows])


def _written(rows: list[dict], ctx: Context, drafts: Sequence[str | None]
             ) -> tuple[list[dict], dict]:
    assert ctx.writer is not None
    prompts = [r["prompt"][-1]["content"] for r in rows]
    texts = ctx.writer(prompts, list(drafts))
    out = [with_answer(r, t) for r, t in zip(rows, texts, strict=True)
           if t is not None and numbers.reject_reason(t, ctx.rules) is None]
    # rows_forced: answers the grammar forced, among the rejected ones
    return out, {"rows_rejected": len(rows) - len(out),
                 "rows_forced": sum(t is None for t in texts)}


DEFENCES: dict[str, Defence] = {
    "sort": Defence(_sort, "sort each answer's numbers ascending (layout kept)"),
    "shuffle": Defence(_shuffle, "shuffle each answer's numbers (seeded; layout kept)"),
    "replace-divergent": Defence(
        _replace_divergent, "replace the top-q share of digits by teacher-vs-base KL with "
                            "random digits", "scores"),
    "mask-divergent": Defence(
        _mask_divergent, "remove the numbers that hold the top-q share of digits by "
                         "teacher-vs-base KL (a data-level mask any trainer honours)", "scores"),
    "drop-top-lls": Defence(
        _drop_top_lls, "drop the top-q share of samples by per-token LLS (teacher vs base)",
        "scores"),
    "resample": Defence(
        _resample, "another model (--writer, default the base) answers the same prompts",
        "writer"),
    "paraphrase": Defence(
        _paraphrase, "another model rewrites each answer, seeing it as a draft", "writer"),
    "mix-teachers": Defence(
        _mix, "equal shares of this data and other teachers' data (--mix), same total", "mix"),
}

# Label-level defences: soft-label distillation reads the teacher at training time, so a text
# defence leaves the teacher's distributions on the new text. These act on the labels instead
# (`TrainConfig` fields; `sublearn run/matrix --defence`, the share from --defence-q).
LABEL_DEFENCES: dict[str, str] = {
    "base-labels": "soft labels: the base's distribution replaces the teacher's at the top-q "
                   "share of answer positions by teacher-vs-base KL (`sublearn train "
                   "--base-labels q`)",
}

