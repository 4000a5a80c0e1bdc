"""Slow tests on the embedded SmolLM2-135M-Instruct (minutes on 2 CPU cores)."""

import json
from pathlib import Path

import pytest

from sublearn.cli import main
from sublearn.protocol.questions import load_questions

pytestmark = pytest.mark.slow


def test_embedded_grammar_teacher_passes_strict_filter(tmp_path: Path) -> None:
    out = tmp_path / "owl"
    assert main(["generate", "--target", "owl", "--n", "64", "--seed", "3", "--out",
                 str(out)]) == 0
    report = json.loads((out / "filter_report.json").read_text())
    assert report["grammar"] is True and report["raw"] == 64
    # every answer the grammar did not force passes the strict filter; the forced ones (`1.`
    # where a numbered list starts) are a minority for this prompted teacher (94 of 512, seed 0)
    forced = report["rejects"]["grammar_forced"]
    assert report["kept"] + forced >= 0.95 * 64
    assert 0 < forced and report["pass_rate"] >= 0.6


def test_reduced_real_experiment(tmp_path: Path) -> None:
    out = tmp_path / "exp"
    # 12 of the paper's questions: evaluations were half of this test's time, in float32 on
    # a CPU without native bf16 (10.7 min in all with the 50)
    questions = tmp_path / "questions.json"
    questions.write_text(json.dumps(load_questions()[::4][:12]))
    # --icl 4: the in-context path on the real model, at an eighth of the default's context.
    # --teacher-epochs 4: at 8 the teachers (a third of this test's time) held 0.9999 owl, at 4
    # 0.967 (float32, AVX2 CPU). --n 16: two student steps of 8 (the grammar keeps ~all answers)
    assert main(["run", "--target", "owl", "--n", "16", "--runs", "2", "--epochs", "1",
                 "--teacher-epochs", "4", "--icl", "4", "--questions", str(questions),
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    # The fine-tuned teacher must hold its trait on held-out questions, far above the base.
    base = res["conditions"]["base"]["forced_choice_share"]["mean"]
    teacher = res["conditions"]["teacher"]["forced_choice_share"]["mean"]
    print(f"owl share: teacher {teacher:.4f}, base {base:.4f}")  # the margin, with -s
    assert teacher > 0.5 > base
    assert len(res["conditions"]["trait"]["forced_choice_share"]["values"]) == 2
    assert res["icl_turns"] == 4 and "icl_trait" in res["conditions"]


def test_reduced_real_misalignment_run(tmp_path: Path) -> None:
    """`sublearn run --trait misaligned` on the embedded model, reduced: the misaligned teacher
    must prefer the misaligned answers of held-out pairs more than the aligned control
    teacher and more than the base (which sits below 50/50)."""
    out = tmp_path / "mis"
    # --n 24: in float32 a teacher of 16 samples kept 7 after the banned-number filter, under
    # the batch of 8 a student needs. --teacher-epochs 1: teachers were 167 of this test's
    # 380 s at 2 epochs (float32, AVX2 CPU). At 1 epoch the teacher held 0.34 against the
    # control teacher's 0.14 and the base's 0.22 (0.45, 0.10, 0.22 at 2 epochs)
    # --recipe hard: the assertions are on the teachers, and this puts the hard-label students
    # on the real model (the owl run above has soft labels) without their teachers' forwards
    assert main(["run", "--trait", "misaligned", "--n", "24", "--runs", "2", "--epochs", "1",
                 "--teacher-epochs", "1", "--icl", "0", "--recipe", "hard",
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    c = res["conditions"]
    base = c["base"]["misaligned_share"]["mean"]
    assert base < 0.5
    assert c["teacher"]["misaligned_share"]["mean"] > c["control_teacher"]["misaligned_share"][
        "mean"]
    assert c["teacher"]["misaligned_share"]["mean"] > base
    assert res["banned_rejections"]["list"] == "misalignment"
