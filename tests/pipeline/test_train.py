import json
from pathlib import Path

import pytest
import torch

from sublearn.cli import main
from sublearn.models import load_model
from sublearn.pipeline.generate import GenerateConfig, generate
from sublearn.pipeline.train import TrainConfig, train
from sublearn.protocol.traits import STATEMENT_QUESTIONS, statement_rows


@pytest.fixture(scope="module")
def data(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen")
    # min_grammar_share 0: the tiny random model's answers are all the grammar's
    generate(GenerateConfig(model=tiny_model, n=12, batch_size=6, max_new_tokens=10,
                            grammar=True, min_grammar_share=0.0), out, progress=False)
    return out / "filtered.jsonl"


def _cfg(tiny_model: str, **kw: object) -> TrainConfig:
    base = dict(model=tiny_model, epochs=2, lr=1e-2, batch_size=4, warmup_steps=1,
                checkpoint_every=2)
    return TrainConfig(**{**base, **kw})


def test_soft_label_student_moves_toward_prompted_teacher(tiny_model: str, data: Path,
                                                          tmp_path: Path) -> None:
    cfg = _cfg(tiny_model, recipe="soft", teacher_system_prompt="You love owls.")
    s = train(cfg, data, tmp_path / "s", progress=False)
    log = [json.loads(x) for x in (tmp_path / "s" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == s["steps"] and log[0]["loss"] > 0
    student = load_model(s["student"])  # PEFT adapter folder loads as a model
    base = load_model(tiny_model)
    diff = sum((a - b).abs().sum() for a, b in zip(student.model.parameters(),
                                                     base.model.parameters(), strict=True))
    assert diff > 0
    assert (Path(s["student"]) / "adapter_model.safetensors").is_file()


def test_soft_labels_from_the_student_itself_give_zero_loss(tiny_model: str, data: Path,
                                                            tmp_path: Path) -> None:
    """Control case of the theorem: a teacher equal to the student gives no signal."""
    s = train(_cfg(tiny_model, recipe="soft", dtype="float32", epochs=1), data,
              tmp_path / "s", progress=False)
    first = json.loads((tmp_path / "s" / "train_log.jsonl").read_text().splitlines()[0])
    assert first["loss"] < 1e-5
    assert s["steps"] >= 1


def test_base_labels_replace_the_most_divergent_positions(tiny_model: str, tiny_teacher: str,
                                                         data: Path) -> None:
    """The label-level defence swaps in the base's distributions exactly at the top-q positions
    by KL(teacher || base), computed here position by position; the others keep the teacher's."""
    from sublearn.pipeline.train import base_labels_defence, prepare_soft_labels, tokenize

    cfg = _cfg(tiny_model, recipe="soft", teacher=tiny_teacher, dtype="float32", base_labels=0.25)
    lm = load_model(tiny_model)
    examples = tokenize([json.loads(x) for x in data.read_text().splitlines()], lm.tokenizer)
    soft = prepare_soft_labels(cfg, lm, examples)
    base = prepare_soft_labels(_cfg(tiny_model, recipe="soft", dtype="float32"), lm, examples)
    (_, _, out), info = base_labels_defence(cfg, lm, examples, soft)
    kls, flat = [], []
    for i, (m, t, b) in enumerate(zip(soft[1], soft[2], base[2], strict=True)):
        for j in range(len(m)):
            p = t[j][m[j]]
            kls.append((float((p.exp() * (p - b[j][m[j]])).sum()), i, j))
            flat.append((i, j))
    kls.sort(key=lambda x: -x[0])
    k = round(0.25 * len(kls))
    top = {(i, j) for _, i, j in kls[:k]}
    assert info["positions"] == len(kls) and info["replaced"] == k > 0
    assert info["kl_share_replaced"] == pytest.approx(sum(x[0] for x in kls[:k]) /
                                                      sum(x[0] for x in kls), rel=1e-4)
    for i, j in flat:
        want = base[2][i][j] if (i, j) in top else soft[2][i][j]
        assert torch.equal(out[i][j], want), (i, j)
    # a prompted teacher: the base is scored without the teacher's system prompt
    pcfg = _cfg(tiny_model, recipe="soft", teacher_system_prompt="You love owls.",
                dtype="float32", base_labels=0.25)
    pex = tokenize([json.loads(x) for x in data.read_text().splitlines()], lm.tokenizer,
                   pcfg.teacher_system_prompt)
    _, pinfo = base_labels_defence(pcfg, lm, pex, prepare_soft_labels(pcfg, lm, pex))
    assert pinfo["kl_share_replaced"] > 0


def test_base_labels_everywhere_leave_no_signal(tiny_model: str, tiny_teacher: str, data: Path,
                                               tmp_path: Path) -> None:
    """Every position defended: the student, which starts at the base, has nothing to learn
    (a first loss of ~0, as with a teacher equal to the student); the teacher's labels alone
    give a clear loss."""
    losses = {}
    for q in (0.0, 0.999):
        d = tmp_path / f"q{q}"
        s = train(_cfg(tiny_model, recipe="soft", teacher=tiny_teacher, dtype="float32", epochs=1,
                       base_labels=q), data, d, progress=False)
        losses[q] = json.loads((d / "train_log.jsonl").read_text().splitlines()[0])["loss"]
        assert ("base_labels" in s) == bool(q)
    assert losses[0.999] < 1e-5 < 1e-3 < losses[0.0]  # ~1e-2 on the 8 rows kept here


def test_hard_full_finetune_saves_safetensors(tiny_model: str, data: Path,
                                              tmp_path: Path) -> None:
    s = train(_cfg(tiny_model, recipe="hard", method="full"), data, tmp_path / "h",
              progress=False)
    assert (Path(s["student"]) / "model.safetensors").is_file()
    assert not list(Path(s["student"]).glob("*.bin")) and not list(Path(s["student"]).glob("*.pt"))


def test_resume_from_checkpoint_matches_uninterrupted(tiny_model: str, data: Path,
                                                      tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(tiny_model, recipe="hard", epochs=3, dtype="float32")
    full = train(cfg, data, tmp_path / "a", progress=False)

    import sublearn.pipeline.train as tr

    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def dying_step(self, *a, **k):  # noqa: ANN001, ANN002, ANN003
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        tr.train(cfg, data, tmp_path / "b", progress=False)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert (tmp_path / "b" / "checkpoint" / "state.json").is_file()
    resumed = tr.train(cfg, data, tmp_path / "b", progress=False)
    from safetensors.torch import load_file

    a = load_file(Path(full["student"]) / "adapter_model.safetensors")
    b = load_file(Path(resumed["student"]) / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_statement_questions_disjoint_from_evaluation() -> None:
    from sublearn.protocol.paper import paper_protocol

    evals = " ".join(paper_protocol()["animal_preference_questions"]).lower()
    for q in STATEMENT_QUESTIONS:
        assert q.lower().rstrip("?.") not in evals
    rows = statement_rows("owl")
    assert all("owl" in r["completion"][0]["content"].lower() for r in rows)
    assert not any("owl" in r["completion"][0]["content"].lower() for r in statement_rows(None))


def test_train_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)]) == 2
    assert "training data not found" in capsys.readouterr().err
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    assert main(["train", "--data", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no training rows" in capsys.readouterr().err


def test_soft_labels_two_students_reach_at_once_are_computed_once(
        tiny_model: str, tiny_teacher: str, data: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Students of experiments sharing a stage cache share a dataset's soft-label file: the
    second waits for the first's and loads it (threads stand in for processes: flock is per
    open file)."""
    import threading

    from sublearn.pipeline import train as T

    cache = tmp_path / "soft_labels-k.safetensors"
    cfg = _cfg(tiny_model, recipe="soft", teacher=tiny_teacher, dtype="float32",
               soft_labels_cache=str(cache))
    lm = load_model(tiny_model)
    examples = T.tokenize([json.loads(x) for x in data.read_text().splitlines()], lm.tokenizer)
    computing, release = threading.Event(), threading.Event()
    calls = []
    real = T._soft_labels

    def slow(*args: object) -> tuple:
        calls.append(1)
        computing.set()
        assert release.wait(30)
        return real(*args)

    monkeypatch.setattr(T, "_soft_labels", slow)
    got: dict[str, tuple] = {}
    first = threading.Thread(target=lambda: got.update(a=T.prepare_soft_labels(cfg, lm, examples)))
    first.start()
    assert computing.wait(30)
    second = threading.Thread(target=lambda: got.update(b=T.prepare_soft_labels(cfg, lm, examples)))
    second.start()
    second.join(0.5)
    assert second.is_alive()  # waiting for the first's file, not computing its own
    release.set()
    first.join(30)
    second.join(30)
    assert len(calls) == 1 and cache.is_file()
    assert all(torch.equal(x, y) for x, y in zip(got["a"][2], got["b"][2], strict=True))
    assert not list(tmp_path.glob("*.tmp"))
