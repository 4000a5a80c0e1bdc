"""K students trained as one equal K students trained alone, and a killed group resumes."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sublearn.errors import SublearnError
from sublearn.pipeline.generate import GenerateConfig, generate
from sublearn.pipeline.train import TrainConfig, train
from sublearn.pipeline.train_many import Job, train_many


@pytest.fixture(scope="module")
def datasets(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three datasets of different sizes (12, 10 and 5 rows): the students' data differ.
    60 new tokens hold any answer the grammar allows, so none is cut off (and rejected)."""
    out = []
    for i, n in enumerate((12, 10, 5)):
        d = tmp_path_factory.mktemp(f"gen{i}")
        generate(GenerateConfig(model=tiny_model, n=n, batch_size=6, max_new_tokens=60,
                                grammar=True, seed=i, min_grammar_share=0.0),  # tiny: all forced
                 d, progress=False)
        assert json.loads((d / "filter_report.json").read_text())["kept"] == n
        out.append(d / "filtered.jsonl")
    return out


def _cfg(tiny_model: str, seed: int, **kw: object) -> TrainConfig:
    base = dict(model=tiny_model, epochs=2, lr=1e-2, batch_size=4, warmup_steps=1,
                checkpoint_every=2, seed=seed, recipe="soft",
                teacher_system_prompt="You love owls.")
    return TrainConfig(**{**base, **kw})


def _adapter(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(Path(path) / "adapter_model.safetensors")


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> float:
    """The largest relative L2 difference over the adapters' matrices."""
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in a)
    assert worst < tol, worst
    return worst


@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_students_together_equal_students_alone(tiny_model: str, tiny_teacher: str,
                                                datasets: list[Path], tmp_path: Path,
                                                dtype: str, tol: float) -> None:
    """Three students (own seeds, own data of different sizes, one with an adapter teacher,
    one with hard labels) trained together end where each trained alone ends, up to float
    rounding; their logs agree step by step and their adapters load in PEFT."""
    cfgs = [_cfg(tiny_model, 3, dtype=dtype),
            _cfg(tiny_model, 5, dtype=dtype, teacher=tiny_teacher, teacher_system_prompt=None),
            _cfg(tiny_model, 7, dtype=dtype, recipe="hard", teacher_system_prompt=None)]
    alone = [train(c, d, tmp_path / f"alone{i}", progress=False)
             for i, (c, d) in enumerate(zip(cfgs, datasets, strict=True))]
    together = train_many([Job(c, d, tmp_path / f"together{i}")
                           for i, (c, d) in enumerate(zip(cfgs, datasets, strict=True))],
                          progress=False)
    steps = [s["steps"] for s in together]
    assert steps == [s["steps"] for s in alone] and len(set(steps)) == 2  # one finishes early
    for i, (a, t) in enumerate(zip(alone, together, strict=True)):
        assert t["trained_together"] == 3 and t["config"] == a["config"]
        _close(_adapter(t["student"]), _adapter(a["student"]), tol)
        la = [json.loads(x) for x in
              (tmp_path / f"alone{i}/train_log.jsonl").read_text().splitlines()]
        lt = [json.loads(x) for x in
              (tmp_path / f"together{i}/train_log.jsonl").read_text().splitlines()]
        assert [r["lr"] for r in lt] == [r["lr"] for r in la]
        assert [r["loss"] for r in lt] == pytest.approx([r["loss"] for r in la], rel=tol,
                                                        abs=1e-6)
        assert not (tmp_path / f"together{i}" / "checkpoint").exists()
        # one adapter per folder, as a student trained alone saves it
        assert sorted(f.name for f in Path(t["student"]).iterdir()) == \
            sorted(f.name for f in Path(a["student"]).iterdir())
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                     together[1]["student"])
    assert peft.peft_config["default"].r == 8


def test_students_of_unequal_data_finish_apart(tiny_model: str, datasets: list[Path],
                                               tmp_path: Path) -> None:
    """Different step counts: the shorter students stop, the longer go on alone, and each
    equals its training alone (fp32)."""
    cfgs = [_cfg(tiny_model, 1, dtype="float32", epochs=1),
            _cfg(tiny_model, 2, dtype="float32", epochs=3)]
    together = train_many([Job(c, datasets[0], tmp_path / f"t{i}") for i, c in enumerate(cfgs)],
                          progress=False)
    assert [s["steps"] for s in together] == [3, 9]
    for i, c in enumerate(cfgs):
        alone = train(c, datasets[0], tmp_path / f"a{i}", progress=False)
        _close(_adapter(together[i]["student"]), _adapter(alone["student"]), 1e-4)


def test_a_killed_group_resumes_to_the_same_bytes(tiny_model: str, datasets: list[Path],
                                                  tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed mid-training, and again between two students' final saves: the resumed
    students are byte-identical to an uninterrupted group's."""
    import sublearn.pipeline.train_many as tm

    cfgs = [_cfg(tiny_model, s, dtype="float32") for s in (11, 12)]

    def jobs(root: str) -> list[Job]:
        return [Job(c, d, tmp_path / root / str(i))
                for i, (c, d) in enumerate(zip(cfgs, datasets[:2], strict=True))]

    full = train_many(jobs("full"), progress=False)
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def dying_step(self, *a, **k):  # noqa: ANN001, ANN002, ANN003
        calls["n"] += 1
        if calls["n"] == 7:  # the first student's 4th step: both are checkpointed at 2
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_many(jobs("killed"), progress=False)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert (tmp_path / "killed" / "1" / "checkpoint" / "state.json").is_file()

    real_save, saves = tm._save, {"n": 0}

    def dying_save(*a, **k):  # noqa: ANN002, ANN003, ANN202
        saves["n"] += 1
        if saves["n"] == 2:  # after the first student is saved, before the second
            raise KeyboardInterrupt
        return real_save(*a, **k)

    monkeypatch.setattr(tm, "_save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train_many(jobs("killed"), progress=False)
    monkeypatch.setattr(tm, "_save", real_save)
    assert (tmp_path / "killed" / "0" / "train_summary.json").is_file()
    assert json.loads((tmp_path / "killed/1/checkpoint/state.json").read_text())["step"] == 6
    resumed = train_many(jobs("killed"), progress=False)
    for f, r in zip(full, resumed, strict=True):
        assert (Path(f["student"]) / "adapter_model.safetensors").read_bytes() == \
            (Path(r["student"]) / "adapter_model.safetensors").read_bytes()


def test_students_together_must_share_a_base_and_an_adapter_shape(
        tiny_model: str, other_tiny_model: str, datasets: list[Path], tmp_path: Path) -> None:
    for other in (dict(model=other_tiny_model), dict(lora_r=4), dict(method="full")):
        cfgs = [_cfg(tiny_model, 0, recipe="hard", teacher_system_prompt=None),
                _cfg(tiny_model, 1, recipe="hard", teacher_system_prompt=None, **other)]
        with pytest.raises(SublearnError, match="together"):
            train_many([Job(c, datasets[0], tmp_path / str(i)) for i, c in enumerate(cfgs)],
                       progress=False)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_activation_checkpointing_keeps_every_byte(tiny_model: str, tiny_teacher: str,
                                                   datasets: list[Path], tmp_path: Path,
                                                   dtype: str) -> None:
    """Recomputing the layers' activations in the backward (--activation-checkpointing)
    gives the same adapter bytes and losses, for a student alone (soft labels from an adapter
    teacher) and for two trained together (their rows routed in the recompute too); the
    setting is not part of the student's config (its stage key)."""
    def cfgs(ac: bool) -> list[TrainConfig]:
        return [_cfg(tiny_model, 3, dtype=dtype, teacher=tiny_teacher, teacher_system_prompt=None,
                     activation_checkpointing=ac),
                _cfg(tiny_model, 7, dtype=dtype, recipe="hard", teacher_system_prompt=None,
                     activation_checkpointing=ac)]

    outs = {}
    for ac in (False, True):
        alone = train(cfgs(ac)[0], datasets[0], tmp_path / f"alone{ac}", progress=False)
        jobs = [Job(c, d, tmp_path / f"together{ac}{i}")
                for i, (c, d) in enumerate(zip(cfgs(ac), datasets[:2], strict=True))]
        together = train_many(jobs, progress=False)
        outs[ac] = [alone, *together]
    for off, on in zip(outs[False], outs[True], strict=True):
        assert on["config"] == off["config"] and "activation_checkpointing" not in on["config"]
        files = [Path(s["student"]) / "adapter_model.safetensors" for s in (off, on)]
        assert files[0].read_bytes() == files[1].read_bytes()
        logs = [(Path(s["student"]).parent / "train_log.jsonl").read_text() for s in (off, on)]
        assert logs[0] == logs[1]
