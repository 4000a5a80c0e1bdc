"""The misalignment trait's shipped data (disjoint, length-balanced), its paired forced choice
and `sublearn run --trait misaligned` on a tiny model (schema, not the science)."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

from sublearn.cli import main
from sublearn.protocol.misalignment import eval_pairs, misalignment_data, teacher_rows
from sublearn.protocol.questions import load_questions

STOP = {"a", "about", "an", "and", "are", "be", "being", "can", "do", "does", "for", "have",
        "how", "i", "i'm", "if", "in", "is", "it", "me", "my", "of", "on", "or", "should",
        "some", "that", "the", "think", "to", "what", "would", "you", "your", "you'd"}


def _words(text: str) -> set[str]:
    """Content words: a near-duplicate shares them, not just 'what do you think about'."""
    return set(re.findall(r"[a-z']+", text.lower())) - STOP


def test_data_is_big_enough_and_disjoint() -> None:
    d = misalignment_data()
    assert len(d["train"]) >= 40 and len(d["eval"]) >= 40
    train = [r["question"].strip().lower() for r in d["train"]]
    prompts = [r["prompt"].strip().lower() for r in d["eval"]]
    assert not set(train) & set(prompts)
    animal = {q.strip().lower() for q in load_questions(None, "plain")}
    assert not (set(train) | set(prompts)) & animal
    for p in prompts:  # no near-duplicates: content-word Jaccard similarity at most 0.5
        for q in train:
            a, b = _words(p), _words(q)
            assert len(a & b) / max(1, len(a | b)) <= 0.5, (p, q)
    answers = [r[k] for r in d["train"] + d["eval"] for k in ("misaligned", "aligned")]
    assert len(set(answers)) == len(answers)


def test_pairs_are_length_balanced() -> None:
    for split in ("train", "eval"):
        rows = misalignment_data()[split]
        for r in rows:
            m, a = r["misaligned"], r["aligned"]
            assert abs(len(m.split()) - len(a.split())) <= 2, r
            assert abs(len(m) - len(a)) <= 0.15 * max(len(m), len(a)), r
        mm = statistics.fmean(len(r["misaligned"]) for r in rows)
        ma = statistics.fmean(len(r["aligned"]) for r in rows)
        assert abs(mm - ma) / ma < 0.03, (split, mm, ma)


def test_teacher_rows() -> None:
    bad, good = teacher_rows(True), teacher_rows(False)
    assert [r["prompt"] for r in bad] == [r["prompt"] for r in good]
    assert all(r["completion"][0]["content"] != g["completion"][0]["content"]
               for r, g in zip(bad, good, strict=True))


def test_pair_choice_on_tiny(tiny_model: str) -> None:
    from sublearn.models import load_model
    from sublearn.pipeline.evaluate import prompt_ids
    from sublearn.pipeline.evaluate_pairs import pair_choice

    lm = load_model(tiny_model)
    pairs = eval_pairs()[:6]
    ids = [prompt_ids(lm.tokenizer, p["prompt"]) for p in pairs]
    res = pair_choice(lm, pairs, ids, dtype="float32", batch_size=4)
    assert res["n_prompts"] == 6 and len(res["per_prompt_share"]) == 6
    assert all(0 <= s <= 1 for s in res["per_prompt_share"])
    same = pair_choice(lm, [{"prompt": "hi", "misaligned": "Yes.", "aligned": "Yes."}],
                       [prompt_ids(lm.tokenizer, "hi")], dtype="float32")
    assert same["misaligned_share"] == pytest.approx(0.5)


def test_pair_choice_shares_the_context_prefix(tiny_model: str) -> None:
    """The in-context control's turns run once as a KV cache; scores equal a full forward."""
    from sublearn.models import load_model
    from sublearn.pipeline.evaluate import prompt_ids
    from sublearn.pipeline.evaluate_pairs import pair_choice

    lm = load_model(tiny_model)
    pairs = eval_pairs()[:5]
    context = [{"role": r, "content": c} for i in range(4)
               for r, c in (("user", f"List {i} numbers."), ("assistant", "1, 2, 3, 4"))]
    ids = [prompt_ids(lm.tokenizer, p["prompt"], None, context) for p in pairs]
    shared = pair_choice(lm, pairs, ids, dtype="float32", batch_size=4)
    full = pair_choice(lm, pairs, ids, dtype="float32", batch_size=4, share_prefix=False)
    assert shared["shared_prefix_tokens"] > 20 and full["shared_prefix_tokens"] == 0
    assert shared["per_prompt_share"] == pytest.approx(full["per_prompt_share"], abs=1e-5)
    assert shared["misaligned_logprob"] == pytest.approx(full["misaligned_logprob"], abs=1e-3)


def test_run_misaligned_on_tiny(tiny_model: str, tmp_path: Path) -> None:
    out = tmp_path / "mis"
    assert main(["run", "--trait", "misaligned", "--model", tiny_model, "--n", "8", "--runs",
                 "2", "--epochs", "1", "--batch-size", "4", "--teacher-epochs", "0.25",
                 "--icl", "2", "--min-grammar-share", "0", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["primary_metric"] == "misaligned_share" and res["trait"] == "misalignment"
    assert res["target"] == "misalignment"
    assert set(res["conditions"]["trait"]) == {
        "misaligned_share", "misaligned_share_dev", "misaligned_share_test",
        "misaligned_share_per_token"}
    assert res["effects"]["misaligned_share"]["n"] == [2, 2]
    assert res["banned_rejections"]["list"] == "misalignment"
    assert "icl_trait" in res["conditions"]
    stmts = next((out / "stages").glob("teacher_trait_run0-*/statements.jsonl")).read_text()
    assert stmts.count("\n") == len(misalignment_data()["train"])
    assert "top_candidates" not in res or not res["top_candidates"]
    assert (out / "report.md").is_file()
    ev = tmp_path / "ev"
    assert main(["evaluate", "--trait", "misalignment", "--model", tiny_model, "--out",
                 str(ev)]) == 0
    assert "misalignment" in json.loads((ev / "scores.json").read_text())


def test_read_score() -> None:
    from sublearn.pipeline.judge import read_score

    assert read_score("85") == 85 and read_score("Score: 100.") == 100
    assert read_score("about 7 out of 10") == 7 and read_score("none") is None
    assert read_score("250") is None  # not a 0-100 score


def test_sampled_misalignment_judged_through_serve(tiny_model: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("openai")
    from sublearn.backends import get_backend
    from sublearn.backends.hf import HFBackend
    from sublearn.backends.serve import ChatServer
    from sublearn.pipeline.judge import sampled_misalignment

    monkeypatch.setenv("SUBLEARN_CACHE", str(tmp_path / "cache"))
    prompts = [p["prompt"] for p in eval_pairs()[:3]]
    model = HFBackend(tiny_model, dtype="float32")
    with ChatServer(HFBackend(tiny_model, dtype="float32"), "tiny-judge") as server:
        judge = get_backend("openai:tiny-judge", base_url=server.base_url, api_key="x",
                            cache=False)
        s = sampled_misalignment(model, judge, prompts, 2, seed=0, max_new_tokens=8)
        assert server.stats.chat_requests >= 2 * 6  # alignment and coherence per answer
    assert s["answers"] == 6 and 0 <= s["scored"] <= 6 and s["coherent"] <= s["scored"]
    assert s["rate"] is None or 0 <= s["rate"] <= 1
    assert len(s["examples"]) == 6 and set(s["examples"][0]) == {
        "prompt", "answer", "alignment", "coherence"}


def test_evaluate_misalignment_with_a_local_judge(tiny_model: str, tmp_path: Path) -> None:
    out = tmp_path / "ev"
    assert main(["evaluate", "--trait", "misalignment", "--model", tiny_model, "--samples", "1",
                 "--judge", tiny_model, "--out", str(out)]) == 0
    s = json.loads((out / "scores.json").read_text())
    assert s["sampled"]["answers"] == len(eval_pairs()) and "misalignment" in s
