"""Audit scores match a naive per-sample computation; the audit and the experiment audit
write their files with the documented schema (not the science)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sublearn.audit import audit_dataset, roc_auc, score_rows
from sublearn.audit.audit import AuditConfig
from sublearn.cli import main
from sublearn.errors import SublearnError
from sublearn.files import write_jsonl

ROWS = [{"prompt": [{"role": "user", "content": f"Add up to 10 new numbers: {i}, {i + 2}"}],
         "completion": [{"role": "assistant", "content": a}]}
        for i, a in enumerate(["123, 456", "7 8 9", "[4, 5]", "789", "1; 2; 3"])]


def test_roc_auc_known_values() -> None:
    assert roc_auc([3, 4], [1, 2]) == 1.0
    assert roc_auc([1, 2], [3, 4]) == 0.0
    assert roc_auc([1, 3], [2, 2]) == 0.5


def test_scores_match_a_naive_loop(tiny_model: str, tmp_path: Path) -> None:
    import torch

    from sublearn.models import load_model

    t, b = load_model(tiny_model), load_model(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():  # the same tokenizer, other weights
        for prm in t.model.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    scores = score_rows(t, b, ROWS, batch_size=2)
    tok = b.tokenizer
    for row, s in zip(ROWS, scores, strict=True):
        prompt = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        p = tok(prompt, add_special_tokens=False).input_ids
        a = tok(row["completion"][0]["content"], add_special_tokens=False).input_ids
        a = a + [tok.convert_tokens_to_ids(tok.eos_token)]
        ids = torch.tensor([p + a])
        with torch.no_grad():
            lt = torch.log_softmax(t.model(ids).logits[0, len(p) - 1 : -1].float(), -1)
            lb = torch.log_softmax(b.model(ids).logits[0, len(p) - 1 : -1].float(), -1)
        at = torch.tensor(a)
        lls = lt[range(len(a)), at] - lb[range(len(a)), at]
        kl = (lt.exp() * (lt - lb)).sum(-1)
        assert s.n_tokens == len(a)
        assert s.lls_sum == pytest.approx(float(lls.sum()), abs=1e-4)
        assert s.token_kl == pytest.approx(kl.tolist(), abs=1e-4)
        assert s.argmax_disagree == pytest.approx(float((lt.argmax(-1) != lb.argmax(-1)).float()
                                                        .mean()))
    # bf16 autocast: the same scores up to bf16 rounding, and not bit-equal (it did run)
    low = score_rows(t, b, ROWS, batch_size=2, dtype="bfloat16")
    assert [s.lls_sum for s in low] != [s.lls_sum for s in scores]
    assert [s.lls_mean for s in low] == pytest.approx([s.lls_mean for s in scores], abs=0.02)
    same = score_rows(b, b, ROWS)
    assert all(abs(s.lls_sum) < 1e-6 and s.kl_max < 1e-6 for s in same)
    # a system prompt only the scorer sees: the same weights now disagree
    prompted = score_rows(b, b, ROWS, scorer_system="You love owls.")
    assert any(abs(s.lls_sum) > 1e-4 for s in prompted)


def test_audit_dataset_writes_files(tiny_model: str, tmp_path: Path) -> None:
    data, ref = tmp_path / "data.jsonl", tmp_path / "ref.jsonl"
    write_jsonl(data, ROWS * 2)
    write_jsonl(ref, ROWS[::-1] * 2)
    cfg = AuditConfig(teacher=tiny_model, base=tiny_model, reference=str(ref), probe=True)
    s = audit_dataset(cfg, data, tmp_path / "audit", progress=False)
    out = tmp_path / "audit"
    for f in ("scores.jsonl", "summary.json", "histogram.png", "report.md"):
        assert (out / f).is_file(), f
    recs = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert {(r["detector"], r["dataset"]) for r in recs} == {
        ("teacher", "data"), ("teacher", "reference"), ("probe", "data"), ("probe", "reference")}
    assert len(recs) == 4 * 10
    v = s["detectors"]["teacher"]["verdict"]
    assert 0 <= v["p_permutation"] <= 1 and 0 <= v["auc"] <= 1
    shift = s["detectors"]["probe"]["trait_shift"]
    assert "owl" in shift["log_share_shift"] and shift["relative_to"] == "reference probe"
    assert "Verdict" in (out / "report.md").read_text()


def test_audit_experiment_on_tiny_run(tiny_model: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    exp = tmp_path / "exp"
    assert main(["run", "--model", tiny_model, "--target", "owl", "--n", "8", "--runs", "2",
                 "--epochs", "1", "--batch-size", "4", "--teacher-epochs", "1", "--icl", "0",
                 "--min-grammar-share", "0", "--out", str(exp)]) == 0  # tiny: all forced
    assert main(["audit", "--experiment", str(exp), "--probe", "--out",
                 str(tmp_path / "a")]) == 0
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert len(s["datasets"]) == 4
    assert set(s["detectors"]) == {"teacher_lls", "teacher_kl", "probe_shift"}
    assert s["detectors"]["teacher_lls"]["n"] == [2, 2]
    # run r's datasets are scored by the next run's trait teacher, never their own writer
    res = json.loads((exp / "results.json").read_text())
    own = {r["run"]: r["teacher"] for r in res["runs"] if r["condition"] == "trait"}
    assert all(d["scorer"] != own[d["run"]] for d in s["datasets"])
    assert "(exact)" in (tmp_path / "a" / "report.md").read_text()
    # flags the experiment overrides are refused, not ignored; a settings check runs first
    for extra, says in ((["--teacher", tiny_model], "--teacher: not used with --experiment"),
                        (["--reference", "x.jsonl", "--seed", "3"], "--reference, --seed"),
                        (["--target", "cat"], "the experiment's target is owl"),
                        (["--max-samples", "0"], "and --max-samples at least 2")):
        capsys.readouterr()
        assert main(["audit", "--experiment", str(exp), *extra, "--out",
                     str(tmp_path / "b")]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1
    assert not (tmp_path / "b").exists()


def test_verdict_needs_two_samples_a_side() -> None:
    from sublearn.audit.audit import verdict

    with pytest.raises(SublearnError, match="at least 2 samples"):
        verdict([0.1], [0.2, 0.3])
