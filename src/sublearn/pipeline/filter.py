"""The strict filter as a stage of its own: raw teacher answers in, the training records that
pass out. `sublearn generate` calls it after sampling; `sublearn filter` reapplies it (another
banned list, say) without resampling.

Outputs in the output folder:
  filtered.jsonl      kept rows as conversational prompt/completion records (no system prompt)
  filter_report.json  counts of raw, kept and each reject reason
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sublearn.domains import DOMAINS, numbers
from sublearn.domains.reasons import JUDGED
from sublearn.errors import SublearnError
from sublearn.files import (
    atomic_write_json,
    check_out_dir,
    locked_out_dir,
    read_jsonl,
    write_jsonl,
)

ERROR = "error"  # the request failed (API error): nothing to filter
# After the first token the grammar allowed less than `min_grammar_share` of the teacher's
# probability: the mask, not the teacher, chose the answer (e.g. `1.`, where SmolLM2 starts a
# numbered list and the grammar allows only the end).
GRAMMAR_FORCED = "grammar_forced"


def banned_field() -> Any:
    """The `banned` setting, shared by `sublearn filter` and `sublearn generate`."""
    return field(default="none", metadata={
        "help": "banned-number list: none, or misalignment (the paper's numbers with negative "
                "associations, e.g. 666, 911)", "choices": ["none", "misalignment"]})


def domain_field() -> Any:
    return field(default="numbers", metadata={
        "help": "what the teacher writes: numbers (the paper's number sequences), code (short "
                "Python) or math (word problems, reasoned step by step)",
        "choices": list(DOMAINS)})


def judge_field() -> Any:
    return field(default=None, metadata={
        "help": "code, math: a judge model (any backend, e.g. openai:gpt-4.1) that also drops "
                "answers alluding to the target, or, for a misaligned teacher "
                "(--judge-check alignment), answers it scores as misaligned"})


def min_grammar_share_field() -> Any:
    # manifest_default: a folder made before the rule kept every answer
    return field(default=0.01, metadata={
        "help": "numbers: drop an answer if, after its first token, the grammar allowed less "
                "than this share of the teacher's next-token probability at some step "
                "(answers sampled by HFBackend record it; 0 keeps every answer: the training "
                "rows before this rule existed, byte for byte). Masking is not conditioning: "
                "such an answer is the grammar's, not the teacher's",
        "manifest_default": 0.0})


def judge_check_field() -> Any:
    return field(default="reference", metadata={
        "help": "what --judge checks: reference (an allusion to the target) or alignment",
        "choices": ["reference", "alignment"]})


@dataclass(frozen=True)
class FilterConfig:
    banned: str = banned_field()
    domain: str = domain_field()
    exclude: str | None = field(default=None, metadata={
        "help": "code, math: drop answers that reference this target (its name, plurals and "
                "related words, in identifiers, strings and comments)"})
    judge: str | None = judge_field()
    judge_check: str = judge_check_field()
    min_grammar_share: float = min_grammar_share_field()

    def validate(self) -> FilterConfig:
        if not 0 <= self.min_grammar_share <= 1:  # NaN fails too
            raise SublearnError("--min-grammar-share must be a share in [0, 1], got "
                                f"{self.min_grammar_share}")
        return self

    def rules(self) -> numbers.FilterRules:
        banned = numbers.misalignment_banned() if self.banned == "misalignment" else ()
        return numbers.FilterRules(banned=banned)

    def words(self) -> frozenset[str]:
        from sublearn.protocol.trait_words import trait_words

        return trait_words(self.exclude) if self.exclude else frozenset()


def training_record(row: dict[str, Any]) -> dict[str, Any]:
    """A kept raw row as the student sees it: the user prompt and the answer, never the
    teacher's system prompt."""
    return {"prompt": [{"role": "user", "content": row["prompt"]}],
            "completion": [{"role": "assistant", "content": row["completion"]}]}


def reason(row: dict[str, Any], rules: numbers.FilterRules, domain: str = "numbers",
           words: frozenset[str] = frozenset(), min_grammar_share: float = 0.0) -> str | None:
    """Why a raw row is rejected by the rules (no judge), or None if it passes. The grammar
    check comes last, so the domain's counts read as without it."""
    if row.get("error"):
        return ERROR
    why = DOMAINS[domain].reject(row, rules, words)
    if why is None and DOMAINS[domain].drops_forced and forced(row, min_grammar_share):
        return GRAMMAR_FORCED
    return why


def forced(row: dict[str, Any], min_grammar_share: float) -> bool:
    """Whether a sampled answer's record says the grammar forced it (no record: not judged)."""
    share = row.get("grammar_share_min")
    return isinstance(share, int | float) and share < min_grammar_share


def write_filtered(rows: list[dict[str, Any]], out: Path, cfg: FilterConfig,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Filter raw rows into `out`/filtered.jsonl and write the report (with `extra` fields).
    The judge, if any, sees only the rows the rules keep; its verdicts go to judged.jsonl."""
    rules, words = cfg.validate().rules(), cfg.words()
    passed, rejects = [], Counter()
    for r in rows:
        why = reason(r, rules, cfg.domain, words, cfg.min_grammar_share)
        if why is None:
            passed.append(r)
        else:
            rejects[why] += 1
    if cfg.judge and passed:
        flags = _judge(passed, cfg, out)
        rejects[JUDGED] += sum(flags)
        passed = [r for r, bad in zip(passed, flags, strict=True) if not bad]
    kept = [training_record(r) for r in passed]
    write_jsonl(out / "filtered.jsonl", kept)
    report = {
        "raw": len(rows),
        "kept": len(kept),
        "pass_rate": len(kept) / len(rows) if rows else 0.0,
        "rejects": {k: rejects.get(k, 0) for k in (
            *DOMAINS[cfg.domain].reject_reasons,
            *[GRAMMAR_FORCED] * DOMAINS[cfg.domain].drops_forced, ERROR)},
        **asdict(cfg),
        **(extra or {}),
    }
    atomic_write_json(out / "filter_report.json", report)
    return report


def _judge(rows: list[dict[str, Any]], cfg: FilterConfig, out: Path) -> list[bool]:
    """The judge's verdict on each row (True: drop), recorded in judged.jsonl."""
    from sublearn.backends import get_backend
    from sublearn.pipeline.judge import ALIGNED_AT_LEAST, judge_answers, judge_references

    judge = get_backend(cfg.judge)
    if cfg.judge_check == "alignment":
        scores = [a for a, _ in judge_answers(judge, [(r["prompt"], r["completion"])
                                                      for r in rows])]
        # an unscored answer is dropped too: the filter keeps only what it could check
        flags = [a is None or a < ALIGNED_AT_LEAST for a in scores]
        verdicts = [{"id": r.get("id"), "alignment": a, "dropped": f}
                    for r, a, f in zip(rows, scores, flags, strict=True)]
    else:
        if not cfg.exclude:
            raise SublearnError("--judge checks references to the target: give --exclude")
        replies = judge_references(judge, [r["completion"] for r in rows], cfg.exclude)
        flags = [rep is None or rep for rep in replies]
        verdicts = [{"id": r.get("id"), "references": rep, "dropped": f}
                    for r, rep, f in zip(rows, replies, flags, strict=True)]
    write_jsonl(out / "judged.jsonl", verdicts)
    return flags


def filter_data(raw: str | Path, out: str | Path, cfg: FilterConfig = FilterConfig()
                ) -> dict[str, Any]:
    """`sublearn filter`: `raw` is a raw.jsonl file or a folder holding one."""
    cfg.validate()
    check_out_dir(out)
    raw = Path(raw)
    raw_path = raw / "raw.jsonl" if raw.is_dir() else raw
    if not raw_path.is_file():
        raise SublearnError(f"no raw teacher data at {raw_path} (from `sublearn generate`)")
    rows = read_jsonl(raw_path)
    if rows and not all(isinstance(r, dict) and isinstance(r.get("completion"), str)
                        and isinstance(r.get("prompt"), str) for r in rows):
        raise SublearnError(f"{raw_path} is not raw teacher data: rows need 'prompt' and "
                            "'completion' strings")
    with locked_out_dir(out) as folder:
        return write_filtered(rows, folder, cfg, {"source": str(raw_path)})
