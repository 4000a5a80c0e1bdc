"""Defences keep the strict filter's guarantees, are seeded and deterministic, and do what
they say; `sublearn run --defence` adds defended students and the share of the effect left."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from sublearn.cli import main
from sublearn.defences import DEFENCES, DefendConfig, defend_data
from sublearn.defences.methods import Context, answer
from sublearn.domains import numbers
from sublearn.files import read_jsonl, write_jsonl

ANSWERS = ["96, 436, 758, 495, 489.", "[12;3;7]", "5 6 3", "(1,2, 30)", "7\n1\n9", "403",
           "12, 911, 4"]


def _rows(answers: list[str] = ANSWERS) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"Continue: {i}, {i + 1}"}],
             "completion": [{"role": "assistant", "content": a}]} for i, a in enumerate(answers)]


def test_rewrite_and_keep_numbers_keep_the_layout() -> None:
    a = "[96, 436,758, 495, 489]."
    assert numbers.rewrite_numbers(a, ["1", "2", "3", "4", "5"]) == "[1, 2,3, 4, 5]."
    assert numbers.keep_numbers(a, [0, 2, 4]) == "[96, 758,489]."
    assert numbers.keep_numbers("1\n2\n3", [2]) == "3"
    assert numbers.keep_numbers(a, []) is None
    with pytest.raises(ValueError):
        numbers.rewrite_numbers(a, ["1"])


@pytest.mark.parametrize("method", ["sort", "shuffle"])
def test_model_free_defences_are_valid_and_seeded(method: str) -> None:
    rows = _rows()
    out1, _ = DEFENCES[method].fn(rows, Context(rng=random.Random(3)))
    out2, _ = DEFENCES[method].fn(rows, Context(rng=random.Random(3)))
    assert out1 == out2 and len(out1) == len(rows)
    for before, after in zip(rows, out1, strict=True):
        assert numbers.reject_reason(answer(after)) is None
        assert sorted(numbers.parse_answer(answer(after))) == sorted(
            numbers.parse_answer(answer(before)))  # the same numbers, reordered
    if method == "sort":
        assert [numbers.parse_answer(answer(r)) for r in out1][0] == [96, 436, 489, 495, 758]
    assert rows[0]["completion"][0]["content"] == ANSWERS[0]  # the input is not modified


def test_mix_teachers_takes_equal_shares() -> None:
    a, b = _rows(["1, 2"] * 6), _rows(["3, 4"] * 6)
    out, info = DEFENCES["mix-teachers"].fn(a, Context(rng=random.Random(0), mix=[b]))
    assert len(out) == 6 and info["teachers"] == 2
    assert sorted(answer(r) for r in out) == ["1, 2"] * 3 + ["3, 4"] * 3
    odd, _ = DEFENCES["mix-teachers"].fn(_rows(["1, 2"] * 7), Context(rng=random.Random(0),
                                                                      mix=[b]))
    assert len(odd) == 7  # the remainder goes to the first source


def test_written_answers_the_grammar_forced_are_dropped() -> None:
    """resample/paraphrase: a writer's answer the grammar forced (None) is dropped like one
    that fails the strict filter, and counted apart."""
    rows = _rows(["1, 2", "3, 4", "5, 6"])
    ctx = Context(rng=random.Random(0), writer=lambda prompts, drafts: ["7, 8", None, "9x"])
    out, info = DEFENCES["resample"].fn(rows, ctx)
    assert [answer(r) for r in out] == ["7, 8"]
    assert info == {"rows_rejected": 2, "rows_forced": 1}


def test_eval_keys_of_older_experiments_are_unchanged() -> None:
    """Settings added to EvalConfig since experiments were cached stay out of the stage key at
    their defaults, so an older folder's evaluations are reused."""
    from dataclasses import asdict

    from sublearn.experiment.run import eval_key
    from sublearn.pipeline.evaluate import EvalConfig

    key = eval_key(EvalConfig())
    assert "trait" not in key and "judge" not in key
    assert key == {k: v for k, v in asdict(EvalConfig()).items() if k not in ("trait", "judge")}
    assert eval_key(EvalConfig(trait="misalignment"))["trait"] == "misalignment"


class _Score:
    def __init__(self, tokens: list[str], kl: list[float], lls: float) -> None:
        self.tokens, self.token_kl, self.lls_mean = tokens, kl, lls


def _digit_scores(rows: list[dict]) -> list[_Score]:
    """One token per character, KL = the digit's value (9s most divergent)."""
    out = []
    for i, r in enumerate(rows):
        a = answer(r)
        toks = [c.replace(" ", "Ġ").replace("\n", "Ċ") for c in a] + ["<|im_end|>"]
        out.append(_Score(toks, [float(c) if c.isdigit() else 0.0 for c in a] + [0.0], i))
    return out


def test_scored_defences_act_on_the_most_divergent() -> None:
    rows = _rows(ANSWERS[:-1])  # inputs pass the banned list, as `defend` checks
    scores = _digit_scores(rows)
    banned = numbers.FilterRules(banned=numbers.misalignment_banned())
    rep, info = DEFENCES["replace-divergent"].fn(
        rows, Context(rng=random.Random(0), q=0.2, scores=scores, rules=banned))
    digits = sum(c.isdigit() for a in ANSWERS[:-1] for c in a)
    assert info["digits_scored"] == digits and info["digits_replaced"] == round(0.2 * digits)
    assert all(numbers.reject_reason(answer(r), banned) is None for r in rep)
    changed = sum(x != y for r0, r1 in zip(rows, rep, strict=True)
                  for x, y in zip(answer(r0), answer(r1), strict=True))
    assert 0 < changed <= info["digits_replaced"]
    assert all(len(answer(a)) == len(answer(b)) for a, b in zip(rows, rep, strict=True))
    masked, info = DEFENCES["mask-divergent"].fn(
        rows, Context(rng=random.Random(0), q=0.2, scores=scores))
    assert info["numbers_removed"] > 0
    assert all(numbers.reject_reason(answer(r)) is None for r in masked)
    assert all("9" not in answer(r) for r in masked[:1])  # 96, 758, 495, 489 held 9s and 8s
    dropped, info = DEFENCES["drop-top-lls"].fn(
        rows, Context(rng=random.Random(0), q=0.3, scores=scores))
    assert info["rows_dropped"] == 2 and dropped == rows[:4]  # the two highest LLS go


def test_defend_with_models_on_tiny(tiny_model: str, tmp_path: Path) -> None:
    data = tmp_path / "filtered.jsonl"
    write_jsonl(data, _rows())
    from sublearn.errors import SublearnError

    # the tiny tokenizer merges digits ("123" is one token): the digit defences refuse it
    with pytest.raises(SublearnError, match="splits digits"):
        defend_data(DefendConfig(method="replace-divergent", teacher=tiny_model,
                                 base=tiny_model), data, tmp_path / "rd", progress=False)
    for method in ("drop-top-lls", "resample", "paraphrase"):
        cfg = DefendConfig(method=method, teacher=tiny_model, base=tiny_model,
                           writer=tiny_model, q=0.3, seed=1)
        rep = defend_data(cfg, data, tmp_path / method, progress=False)
        out = read_jsonl(tmp_path / method / "filtered.jsonl")
        assert rep["rows_out"] == len(out) and out
        assert all(numbers.reject_reason(answer(r)) is None for r in out)
        again = defend_data(cfg, data, tmp_path / f"{method}-again", progress=False)
        assert (tmp_path / f"{method}-again" / "filtered.jsonl").read_bytes() == \
            (tmp_path / method / "filtered.jsonl").read_bytes(), method
        assert again["rows_out"] == rep["rows_out"]
    assert main(["defend", str(data), "--method", "sort", "--out", str(tmp_path / "s")]) == 0
    assert json.loads((tmp_path / "s" / "defence_report.json").read_text())["rows_out"] == 7


def test_run_defence_adds_defended_students(tiny_model: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "exp"
    common = ["run", "--model", tiny_model, "--target", "owl", "--n", "8", "--runs", "2",
              "--epochs", "1", "--batch-size", "4", "--teacher-epochs", "1", "--icl", "0",
              "--min-grammar-share", "0", "--out", str(out)]  # tiny: every answer forced
    assert main(common) == 0
    capsys.readouterr()
    # the same folder takes a defence: the undefended stages are reused
    assert main([*common, "--defence", "sort,drop-top-lls", "--defence-q", "0.25"]) == 0
    log = capsys.readouterr().out
    assert "[cached] student_trait_run1" in log and "[stage] student_trait_sort_run0" in log
    res = json.loads((out / "results.json").read_text())
    for c in ("trait_sort", "control_sort", "trait_drop-top-lls", "control_drop-top-lls"):
        assert len(res["conditions"][c]["forced_choice_share"]["values"]) == 2
    d = res["defence_effects"]["sort"]
    assert d["seconds_per_dataset"] is not None
    m = d["metrics"]["forced_choice_share"]
    assert {"difference", "ratio", "p_welch", "p_permutation", "remaining"} <= set(m)
    assert "Fieller" in m["remaining"]["method"]
    assert "## Defences" in (out / "report.md").read_text()
    # scored defences share one scoring of each dataset by its teacher (a stage of its own)
    assert main([*common, "--defence", "drop-top-lls", "--defence-q", "0.5"]) == 0
    log = capsys.readouterr().out
    assert "[cached] scores_trait_run0" in log and "[stage] defend_drop-top-lls_trait_run0" in log
    res = json.loads((out / "results.json").read_text())
    cost = res["defence_effects"]["drop-top-lls"]["seconds_per_dataset"]
    scoring = [json.loads(f.read_text())["seconds"]
               for f in (out / "stages").glob("scores_*/DONE.json")]
    assert len(scoring) == 4 and cost >= min(scoring)  # the scoring counts in its cost
    assert main([*common, "--defence", "drop-top-lls", "--defence-q", "0.5"]) == 0  # all done
    assert "[stage]" not in capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())["defence_effects"]["drop-top-lls"]
    assert again["seconds_per_dataset"] == cost  # still counted, from the stage records
    # q is read by the scored defences alone: sort, made at 0.25, is not redone at 0.5
    assert main([*common, "--defence", "sort", "--defence-q", "0.5"]) == 0
    assert "[stage]" not in capsys.readouterr().out
    # a folder from before the scoring stage (its defences scored inside their own stage):
    # done defences are not scored again
    import shutil

    for d in (out / "stages").glob("scores_*"):
        shutil.rmtree(d)
    assert main([*common, "--defence", "drop-top-lls", "--defence-q", "0.5"]) == 0
    assert "scores_" not in capsys.readouterr().out
    # the label-level defence: the same data, students on the base's labels at half the
    # positions; its cost is the base's forward inside each student's stage
    assert main([*common, "--defence", "base-labels", "--defence-q", "0.5"]) == 0
    log = capsys.readouterr().out
    assert "[stage] student_trait_base-labels_run0" in log and "defend_base-labels" not in log
    res = json.loads((out / "results.json").read_text())
    d = res["defence_effects"]["base-labels"]
    assert d["seconds_per_dataset"] > 0
    for run in res["runs"]:
        assert run["defended"]["base-labels"]["data"] == run["data"]
        summary = Path(run["defended"]["base-labels"]["students"][0]).parent / \
            "train_summary.json"
        assert json.loads(summary.read_text())["base_labels"]["replaced"] > 0
