"""report.md and results.png from a results dict, tolerant of extra and missing entries."""

from __future__ import annotations

import pytest

from sublearn.experiment.report import format_report, plotted_metrics, write_report
from sublearn.experiment.stats import summarize

PNG = b"\x89PNG\r\n\x1a\n"


def results(**extra):
    conds = {
        "base": {"forced_choice_share": summarize([0.005]), "target_logprob": summarize([-6.0])},
        "teacher": {"forced_choice_share": summarize([0.31])},
        "control": {"forced_choice_share": summarize([0.005, 0.006, 0.0055]),
                    "sampled_rate": summarize([0.01, 0.02, 0.0])},
        "trait": {"forced_choice_share": summarize([0.012, 0.011, 0.013]),
                  "sampled_rate": summarize([0.05, 0.04, 0.03])},
    }
    r = {"target": "owl", "primary_metric": "forced_choice_share", "conditions": conds,
         "p_value": 0.0042, "test": "welch_t_one_sided", "config": {"n": 256},
         "stage_seconds": {"teacher_trait": 61.0, "eval_base": 4.5}}
    r.update(extra)
    return r


def test_write_report(tmp_path) -> None:
    r = results()
    r["conditions"]["cross_target_cat"] = {"forced_choice_share": summarize([0.004, 0.006]),
                                           "new_metric": summarize([1.0, 2.0])}
    path = write_report(tmp_path / "out", r)
    text = path.read_text()
    assert path.name == "report.md"
    assert (tmp_path / "out" / "results.png").read_bytes()[:8] == PNG
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    header = rows[0]
    assert header.split("|")[2].strip() == "forced_choice_share"  # primary metric first
    for m in ("target_logprob", "sampled_rate", "new_metric"):
        assert m in header
    names = [row.split("|")[1].strip() for row in rows[1:6]]
    assert names == ["base", "teacher", "control", "trait", "cross_target_cat"]  # paper order
    trait = next(row for row in rows if row.startswith("| trait |"))
    s = r["conditions"]["trait"]["forced_choice_share"]
    assert f"{s['mean']:.4f} [{s['ci95'][0]:.4f}, {s['ci95'][1]:.4f}] (n=3)" in trait
    assert "| cross_target_cat |" in text
    assert "welch_t_one_sided" in text and "p = 0.0042" in text
    assert "| teacher | 1 | 61.0 |" in text and "| total (stages) | 2 | 65.5 |" in text
    assert '"n": 256' in text and "![results](results.png)" in text


def test_plotted_metrics_primary_first_and_probabilities_only() -> None:
    r = results(primary_metric="sampled_rate")
    assert plotted_metrics(r) == ["sampled_rate", "forced_choice_share"]  # no log-probs


def test_tolerates_missing_pieces(tmp_path) -> None:
    r = results()
    r["conditions"]["teacher"] = {"target_logprob": summarize([-1.0])}  # no primary metric
    r["conditions"]["control"]["forced_choice_share"]["ci95"] = [None, None]
    del r["p_value"], r["stage_seconds"]
    write_report(tmp_path, r)
    assert (tmp_path / "results.png").stat().st_size > 1000
    bare = {"target": "owl", "conditions": {"base": {"target_logprob": summarize([-2.0])}}}
    text = write_report(tmp_path / "bare", bare).read_text()
    assert not (tmp_path / "bare" / "results.png").exists() and "results.png" not in text
    assert "| base | -2.0000 (n=1) |" in text


@pytest.mark.parametrize("value,shown", [(0.012345, "0.0123"), (0.00012345, "0.0001234")])
def test_small_values_keep_significant_digits(value, shown) -> None:
    r = {"target": "owl", "conditions": {"base": {"x_share": summarize([value])}}}
    assert shown in format_report(r, None)
