"""A command refuses an --out where it would overwrite another command's work (the standard:
bad input loses nothing): a stage folder of an experiment, a file another command wrote there,
or its own input. Adding files to another's folder stays allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from sublearn.cli import main


def _folder(root: Path, name: str, *files: str) -> Path:
    d = root / name
    d.mkdir()
    for f in files:
        (d / f).write_text("{}")
    return d


@pytest.mark.parametrize(("made", "argv", "says"), [
    # a stage of an experiment: its DONE.json would describe files that changed under it
    (("DONE.json", "filtered.jsonl", "raw.jsonl"), ["filter", "{d}", "--out", "{d}"],
     "stage folder"),
    (("DONE.json", "scores.json"), ["evaluate", "--out", "{d}"], "stage folder"),
    # refiltering in place over generate's own filtered.jsonl
    (("generate_config.json", "raw.jsonl", "filtered.jsonl"),
     ["filter", "{d}", "--banned", "misalignment", "--out", "{d}"],
     "sublearn generate's filtered.jsonl"),
    # an audit over an experiment's report
    (("experiment_config.json", "results.json", "report.md"),
     ["audit", "x.jsonl", "--probe", "--out", "{d}"], "sublearn run's report.md"),
    # a defence writing over its own input, or over one of the datasets it mixes in
    (("defence_report.json", "filtered.jsonl"),
     ["defend", "{d}/filtered.jsonl", "--method", "sort", "--out", "{d}"],
     "would overwrite the input"),
    (("defence_report.json", "filtered.jsonl"),
     ["defend", "x.jsonl", "--method", "mix-teachers", "--mix", "y.jsonl,{d}/filtered.jsonl",
      "--out", "{d}"], "would overwrite the input"),
    # a defence over a refiltered folder (filter's own manifest is its report)
    (("filter_report.json", "filtered.jsonl"),
     ["defend", "x.jsonl", "--method", "sort", "--out", "{d}"], "sublearn filter's filtered"),
])
def test_refused_before_anything_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            made: tuple[str, ...], argv: list[str],
                                            says: str) -> None:
    d = _folder(tmp_path, "out", *made)
    before = {f.name: f.read_text() for f in d.iterdir()}
    assert main([a.replace("{d}", str(d)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1
    assert {f.name: f.read_text() for f in d.iterdir()} == before


def test_a_command_may_add_to_another_folder_and_redo_its_own(tmp_path: Path) -> None:
    from sublearn.files import check_no_overwrite

    student = _folder(tmp_path, "s0", "train_config.json", "train_summary.json")
    check_no_overwrite(student, "evaluate")  # scores beside the adapter (README)
    (student / "scores.json").write_text("{}")
    check_no_overwrite(student, "evaluate")  # and again: its own file
    data = _folder(tmp_path, "data", "generate_config.json", "raw.jsonl", "filtered.jsonl")
    check_no_overwrite(data, "generate")  # generate resuming its own folder
    check_no_overwrite(tmp_path / "new", "evaluate")  # a folder yet to be made
    refiltered = _folder(tmp_path, "refiltered", "filter_report.json", "filtered.jsonl")
    check_no_overwrite(refiltered, "filter")  # filter redoing its own folder
