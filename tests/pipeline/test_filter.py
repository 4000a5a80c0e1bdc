"""The filter's grammar rule: an answer whose later steps the grammar forced (it allowed less
than `min_grammar_share` of the teacher's probability) is dropped; the domain's reasons come
first; rows without the record (API answers, older data) pass as before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sublearn.errors import SublearnError
from sublearn.files import read_jsonl, write_jsonl
from sublearn.pipeline.filter import GRAMMAR_FORCED, FilterConfig, filter_data, reason


def _row(completion: str, share: float | None = None) -> dict:
    row = {"prompt": "Continue: 1, 2, 3.", "completion": completion, "finish_reason": "stop"}
    return row if share is None else {**row, "grammar_share_first": 0.001,
                                      "grammar_share_min": share}


def test_reason_checks_the_domain_first_then_the_grammar_share() -> None:
    rules = FilterConfig().rules()
    assert reason(_row("1.", 0.0004), rules, min_grammar_share=0.01) == GRAMMAR_FORCED
    assert reason(_row("4, 5, 6", 0.2), rules, min_grammar_share=0.01) is None
    assert reason(_row("4, 5, 6", 0.0099), rules, min_grammar_share=0.01) == GRAMMAR_FORCED
    assert reason(_row("4, 5, 6", 0.0099), rules, min_grammar_share=0.0) is None
    assert reason(_row("1."), rules, min_grammar_share=0.01) is None  # no record: not judged
    assert reason(_row("1000", 0.0001), rules, min_grammar_share=0.01) == "numbers_too_large"


def test_filter_reports_forced_answers_and_zero_keeps_them(tmp_path: Path) -> None:
    rows = [_row("1.", 0.0002), _row("7, 8, 9", 0.6), _row("12.", 0.004), _row("3 4", 1.0)]
    write_jsonl(tmp_path / "raw.jsonl", rows)
    report = filter_data(tmp_path / "raw.jsonl", tmp_path / "f")
    assert report["kept"] == 2 and report["rejects"][GRAMMAR_FORCED] == 2
    assert report["min_grammar_share"] == 0.01
    kept = [r["completion"][0]["content"] for r in read_jsonl(tmp_path / "f/filtered.jsonl")]
    assert kept == ["7, 8, 9", "3 4"]
    report = filter_data(tmp_path / "raw.jsonl", tmp_path / "g",
                         FilterConfig(min_grammar_share=0.0))
    assert report["kept"] == 4 and report["rejects"][GRAMMAR_FORCED] == 0
    saved = json.loads((tmp_path / "g/filter_report.json").read_text())
    assert saved["min_grammar_share"] == 0.0


@pytest.mark.parametrize("share", [-0.1, 1.5, float("nan")])
def test_a_share_outside_0_1_is_refused(tmp_path: Path, share: float) -> None:
    write_jsonl(tmp_path / "raw.jsonl", [_row("1, 2", 0.5)])
    with pytest.raises(SublearnError, match="min-grammar-share"):
        filter_data(tmp_path / "raw.jsonl", tmp_path / "f", FilterConfig(min_grammar_share=share))
    assert not (tmp_path / "f").exists()


def test_only_number_data_drops_forced_answers(tmp_path: Path) -> None:
    """Math's grammar forces only the end after `Answer: N`: the rule leaves it alone."""
    rules = FilterConfig().rules()
    row = {"prompt": "p", "completion": "2 + 2 = 4\nAnswer: 4", "answer_key": 4,
           "finish_reason": "stop", "grammar_share_first": 0.5, "grammar_share_min": 0.0001}
    assert reason(row, rules, "math", min_grammar_share=0.01) is None
    write_jsonl(tmp_path / "raw.jsonl", [row])
    report = filter_data(tmp_path / "raw.jsonl", tmp_path / "f", FilterConfig(domain="math"))
    assert report["kept"] == 1 and GRAMMAR_FORCED not in report["rejects"]


def test_folders_made_before_the_rule_read_as_zero(tmp_path: Path) -> None:
    """A manifest without the setting was made keeping every answer: it matches
    --min-grammar-share 0 (and stays cached: the same data-stage key) and refuses 0.01."""
    from dataclasses import asdict

    from sublearn.config import check_manifest
    from sublearn.experiment.run import generate_key
    from sublearn.pipeline.generate import GenerateConfig

    old = {k: v for k, v in asdict(GenerateConfig()).items() if k != "min_grammar_share"}
    (tmp_path / "generate_config.json").write_text(json.dumps(old))
    check_manifest(tmp_path, "generate_config.json", GenerateConfig(min_grammar_share=0.0))
    with pytest.raises(SublearnError, match="min_grammar_share"):
        check_manifest(tmp_path, "generate_config.json", GenerateConfig())
    new = generate_key(GenerateConfig())
    assert new["min_grammar_share"] == 0.01
    assert generate_key(GenerateConfig(min_grammar_share=0.0)) == {
        k: v for k, v in new.items() if k != "min_grammar_share"}
