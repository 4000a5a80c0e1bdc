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

from sublearn.domains import numbers
from sublearn.errors import SublearnError
from sublearn.files import (
    atomic_write_json,
    check_out_dir,
    locked_out_dir,
    read_jsonl,
    write_jsonl,
)

ERROR = "error"  # the request failed (API error): nothing to filter


def banned_field() -> Any:
    """The `banned` setting, shared by `sublearn filter` and `sublearn generate`."""
    return field(default="none", metadata={
        "help": "banned-number list: none, or misalignment (the paper's numbers with negative "
                "associations, e.g. 666, 911)", "choices": ["none", "misalignment"]})


@dataclass(frozen=True)
class FilterConfig:
    banned: str = banned_field()

    def rules(self) -> numbers.FilterRules:
        banned = numbers.misalignment_banned() if self.banned == "misalignment" else ()
        return numbers.FilterRules(banned=banned)


def training_record(row: dict[str, Any]) -> dict[str, Any]:
    """A kept raw row as the student sees it: the user prompt and the answer, never the
    teacher's system prompt."""
    return {"prompt": [{"role": "user", "content": row["prompt"]}],
            "completion": [{"role": "assistant", "content": row["completion"]}]}


def reason(row: dict[str, Any], rules: numbers.FilterRules) -> str | None:
    """Why a raw row is rejected, or None if it passes."""
    if row.get("error"):
        return ERROR
    return numbers.reject_reason(row["completion"], rules)


def write_filtered(rows: list[dict[str, Any]], out: Path, cfg: FilterConfig,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Filter raw rows into `out`/filtered.jsonl and write the report (with `extra` fields)."""
    rules = cfg.rules()
    kept, rejects = [], Counter()
    for r in rows:
        why = reason(r, rules)
        if why is None:
            kept.append(training_record(r))
        else:
            rejects[why] += 1
    write_jsonl(out / "filtered.jsonl", kept)
    report = {
        "raw": len(rows),
        "kept": len(kept),
        "pass_rate": len(kept) / len(rows) if rows else 0.0,
        "rejects": {k: rejects.get(k, 0) for k in (*numbers.REJECT_REASONS, ERROR)},
        **asdict(cfg),
        **(extra or {}),
    }
    atomic_write_json(out / "filter_report.json", report)
    return report


def filter_data(raw: str | Path, out: str | Path, cfg: FilterConfig = FilterConfig()
                ) -> dict[str, Any]:
    """`sublearn filter`: `raw` is a raw.jsonl file or a folder holding one."""
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
