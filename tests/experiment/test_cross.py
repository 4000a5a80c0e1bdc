"""`sublearn cross` on two tiny bases with different tokenizers (schema, not the science)."""

from pathlib import Path

import pytest

from sublearn.cli import main

ARGS = ["--target", "owl", "--n", "8", "--runs", "2", "--epochs", "1", "--batch-size", "4",
        "--teacher-epochs", "1", "--icl", "0"]


@pytest.mark.parametrize("extra, message", [
    (["--labels", "tokens"], "token-level soft labels need one tokenizer"),
    (["--defence", "sort"], "defences score the data"),
])
def test_run_refuses_cross_model_settings(tiny_model: str, other_tiny_model: str,
                                          tmp_path: Path, extra: list[str],
                                          message: str, capsys: pytest.CaptureFixture) -> None:
    other = other_tiny_model
    assert main(["run", "--model", tiny_model, "--student-model", other, *ARGS, *extra,
                 "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_theorem_refuses_another_student_base(tiny_model: str, other_tiny_model: str,
                                              tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    other = other_tiny_model
    assert main(["theorem", "--model", tiny_model, "--student-model", other, *ARGS,
                 "--out", str(tmp_path / "t")]) == 2
    assert "one weight space" in capsys.readouterr().err
