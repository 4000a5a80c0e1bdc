"""Code and math through `generate`, `filter`, `train` and `run` on the tiny model. A random
tiny model writes neither Python nor right sums, so its sampling is scripted here: each domain's
answers mix passes with every reject reason; the teachers, soft labels, students and evaluation
are the real ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sublearn.backends import ChatRequest, Completion, SamplingParams
from sublearn.cli import main
from sublearn.domains import math_problems
from sublearn.files import read_jsonl

ANSWERS = {p: a for s in range(3) for p, a in math_problems.make_problems(24, s, 1)}


class Scripted:
    """`fluent`: writes no broken Python (a trait teacher that passes the filter more often)."""

    model_id = "scripted"

    def __init__(self, fluent: bool = False) -> None:
        self.fluent = fluent

    def generate(self, requests: list[ChatRequest], params: SamplingParams,
                 seed: int) -> list[Completion]:
        out = []
        for i, r in enumerate(requests):
            kind, v = (seed + i) % 5, (seed * 31 + i) % 97
            if r.user in ANSWERS:
                a = ANSWERS[r.user]
                text = [f"We work it out.\nAnswer: {a}", f"Step {v}.\nAnswer: {a}",
                        f"So {a + 1}.\nAnswer: {a + 1}", "I am not sure.",
                        f"An owl would say {a}.\nAnswer: {a}"][kind]
            else:
                text = [f"```python\ndef f(x):\n    return x + {v}\n```", f"y = [{v}] * 2",
                        "x = 2\n" if self.fluent else "def f(:\n", f"def owl_{v}():\n    pass",
                        f"x = {v}"][kind]
            out.append(Completion(text, 10, "length" if kind == 4 and "Answer" not in text
                                  and r.user not in ANSWERS else "stop"))
        return out


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sublearn.pipeline.generate.get_backend",
                        lambda model, **k: Scripted("teacher_trait" in str(model)))


@pytest.mark.parametrize("domain, reasons", [
    ("code", {"not_python": 1, "references_target": 1, "truncated": 1}),
    ("math", {"wrong_answer": 1, "no_answer": 1, "references_target": 1}),
])
def test_generate_filters_each_domain(domain: str, reasons: dict, scripted: None,
                                      tmp_path: Path) -> None:
    out = tmp_path / domain
    assert main(["generate", "--domain", domain, "--n", "20", "--batch-size", "5",
                 "--filter-target", "owl", "--out", str(out)]) == 0
    report = json.loads((out / "filter_report.json").read_text())
    assert report["raw"] == 20 and report["domain"] == domain and report["exclude"] == "owl"
    assert report["kept"] + sum(report["rejects"].values()) == 20
    assert {k: min(v, 1) for k, v in report["rejects"].items() if k in reasons} == reasons
    kept = read_jsonl(out / "filtered.jsonl")
    assert len(kept) == report["kept"] > 0
    assert not any("owl" in json.dumps(r).lower() for r in kept)
    raw = read_jsonl(out / "raw.jsonl")
    assert raw[0]["sampling"]["grammar"] == (domain if domain == "math" else None)
    assert ("answer_key" in raw[0]) == (domain == "math")


def test_judge_drops_what_it_flags_and_records_why(scripted: None, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    class Judge:
        model_id = "judge"

        def generate(self, requests, params, seed):  # flags code that adds 13 or more
            return [Completion("Yes" if "x + 1" in r.user or "x + 2" in r.user else "No", 1,
                               "stop") for r in requests]

    monkeypatch.setattr("sublearn.backends.get_backend", lambda *a, **k: Judge())
    out = tmp_path / "judged"
    assert main(["generate", "--domain", "code", "--n", "40", "--batch-size", "5",
                 "--filter-target", "owl", "--judge", "any", "--out", str(out)]) == 0
    report = json.loads((out / "filter_report.json").read_text())
    verdicts = read_jsonl(out / "judged.jsonl")
    assert report["rejects"]["judge_flagged"] == sum(v["dropped"] for v in verdicts) > 0
    assert report["kept"] == len(verdicts) - report["rejects"]["judge_flagged"]


@pytest.mark.parametrize("domain", ["code", "math"])
def test_run_end_to_end(domain: str, scripted: None, tiny_model: str, tmp_path: Path) -> None:
    out = tmp_path / domain
    # one process: the scripted sampling is patched into this one, not into workers
    assert main(["run", "--model", tiny_model, "--domain", domain, "--target", "owl",
                 "--n", "24", "--runs", "2", "--icl", "0", "--epochs", "1", "--workers", "1",
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["domain"] == domain and len(res["runs"]) == 4
    assert res["p_value"] is not None
    # both conditions filtered for the target alike
    for run in res["runs"]:
        assert run["filter"]["raw"] == 24 and "references_target" in run["filter"]["rejects"]
    student = next((out / "stages").glob("student_trait_run0-*"))
    cfg = json.loads((student / "stage_config.json").read_text())["train"]
    assert cfg["grammar"] == "topk" and cfg["exclude"] == "owl"
    # a run's students train on the same number of rows, whichever teacher passed more
    for r in range(2):
        trait, control = (next(x for x in res["runs"] if x["condition"] == c and x["run"] == r)
                          for c in ("trait", "control"))
        if domain == "code":
            assert trait["filter"]["kept"] > control["filter"]["kept"]
        assert trait["trained_rows"] == control["trained_rows"] == min(
            trait["filter"]["kept"], control["filter"]["kept"])
    assert "| kept rows (control / trait) |" in (out / "report.md").read_text()
    # the soft labels carry none of the tokens that could spell the target
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from sublearn.protocol.trait_words import trait_token_ids

    labels = load_file(next((out / "stages").glob("data_trait_run0-*/soft_labels-*")))
    excluded = set(trait_token_ids(AutoTokenizer.from_pretrained(tiny_model), "owl"))
    assert excluded and not excluded & set(labels["vocab_ids"].flatten().tolist())


def test_topk_labels_leave_out_the_excluded_tokens(tiny_model: str) -> None:
    """Excluding the teacher's favourite token at every position changes the labels and
    never returns it."""
    import torch

    from sublearn.models import load_model
    from sublearn.pipeline.train import Example, teacher_topk_labels

    lm = load_model(tiny_model)
    ex = [Example([1, 5, 7, 9], [11, 12, 13, 2]), Example([1, 6], [14, 2])]
    pad = lm.tokenizer.pad_token_id
    ids, logps = teacher_topk_labels(lm.model, ex, 5, torch.tensor([], dtype=torch.long), pad,
                                     "float32")
    top = ids[0][:, 0].unique()
    ids2, logps2 = teacher_topk_labels(lm.model, ex, 5, top, pad, "float32")
    assert not set(top.tolist()) & set(torch.cat(ids2).flatten().tolist())
    assert all(torch.allclose(lp.exp().sum(-1), torch.ones(len(lp))) for lp in logps2)
    assert [i.shape for i in ids2] == [(4, 5), (2, 5)]
