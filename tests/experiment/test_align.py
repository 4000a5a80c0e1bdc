"""`sublearn align`: the low-rank inner products against dense ΔW, and an experiment folder
built from adapters whose directions are known."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sublearn.cli import main
from sublearn.errors import SublearnError
from sublearn.experiment.align import align, bands, gram

SHAPES = {"layers.0.q_proj": (6, 5), "layers.0.down_proj": (5, 7)}  # (out, in)
PREFIX = "base_model.model.model."


def _write(folder: Path, lora: dict[str, tuple[torch.Tensor, torch.Tensor]], r: int = 2,
           alpha: float | None = None, rslora: bool = False, base: str = "tiny") -> str:
    """A LoRA adapter folder; scale 1 unless `alpha` (or rslora) says otherwise."""
    alpha = float(r) if alpha is None else alpha
    folder.mkdir(parents=True)
    tensors = {}
    for m, (a, b) in lora.items():
        tensors[f"{PREFIX}{m}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{m}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
         "base_model_name_or_path": base, "target_modules": ["q_proj", "down_proj"]}))
    return str(folder)


def _random(gen: torch.Generator, r: int = 2) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {m: (torch.randn(r, i, generator=gen), torch.randn(o, r, generator=gen))
            for m, (o, i) in SHAPES.items()}


def _dense(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg["use_rslora"] else cfg["r"])
    sd = load_file(str(Path(path) / "adapter_model.safetensors"))
    return {k: scale * sd[k.replace("lora_A", "lora_B")].double() @ sd[k].double()
            for k in sd if "lora_A" in k}


def test_gram_equals_dense_inner_products(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    paths = [_write(tmp_path / "a", _random(gen), alpha=4.0),
             _write(tmp_path / "b", _random(gen, r=3), r=3, alpha=2.0, rslora=True),
             # adapts one module only: the other counts as zero
             _write(tmp_path / "c", {"layers.0.q_proj": (torch.randn(2, 5, generator=gen),
                                                         torch.randn(6, 2, generator=gen))})]
    g = gram(paths)
    dense = [_dense(p) for p in paths]
    for i in range(3):
        for j in range(3):
            want = sum(float((dense[i][k] * dense[j][k]).sum())
                       for k in dense[i] if k in dense[j])
            assert g[i, j] == pytest.approx(want, rel=1e-10)


def _experiment(root: Path, target: str, gen: torch.Generator, trait_dirs: dict[str, dict],
                runs: int = 3) -> Path:
    """A `sublearn run` folder of adapters: trait students = control students + 0.5 × the
    run's own trait direction + noise; teachers = control teacher + the trait direction."""
    exp = root / target
    recs = []
    for r in range(runs):
        base = _random(gen)
        noise = _random(gen)
        d = trait_dirs[r]

        def plus(x: dict, y: dict, c: float) -> dict:
            # concatenate factors: B1 A1 + c B2 A2 = [B1, c B2] [A1; A2]
            return {m: (torch.cat([x[m][0], y[m][0]]), torch.cat([x[m][1], c * y[m][1]], 1))
                    for m in x}

        st = root / target / "stages"
        folders = {
            "teacher_control": _write(st / f"teacher_control_run{r}" / "adapter", base),
            "teacher_trait": _write(st / f"teacher_trait_run{r}" / "adapter",
                                    plus(base, d, 1.0), r=4),
            "student_control": _write(st / f"student_control_run{r}" / "adapter", noise),
            "student_trait": _write(st / f"student_trait_run{r}" / "adapter",
                                    plus(noise, d, 0.5), r=4),
        }
        for cond, lp, shares in (("trait", -8.0, [0.2, 0.1]), ("control", -10.0, [0.1, 0.1])):
            ev = st / f"eval_{cond}_run{r}"
            ev.mkdir()
            (ev / "DONE.json").write_text(json.dumps({"output": {
                "model": f"/elsewhere/{target}/stages/student_{cond}_run{r}/adapter",
                "target": target,
                "forced_choice": {"target_logprob": lp, "per_question_target_share": shares}}}))
        for cond in ("trait", "control"):
            # recorded where the run was made: `align` must find them under the folder
            recs.append({"condition": cond, "run": r,
                         "teacher": f"/elsewhere/{target}/stages/teacher_{cond}_run{r}/adapter",
                         "students": [folders[f"student_{cond}"]]})
    (exp / "results.json").write_text(json.dumps(
        {"target": target, "primary_metric": "forced_choice_share", "runs": recs,
         "config": {"teacher_mode": "finetuned"},
         "effects": {"forced_choice_share": {"ratio": {"estimate": 2.0}, "p_welch": 0.01}}}))
    return exp


def test_students_point_at_their_own_trait(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    dirs = {t: {r: _random(gen) for r in range(3)} for t in ("owl", "cat")}
    owl = _experiment(tmp_path, "owl", gen, dirs["owl"])
    cat = _experiment(tmp_path, "cat", gen, dirs["cat"])
    res = align([owl, cat])
    for t in ("owl", "cat"):
        s = res["summary"][t]
        assert s["runs"] == 3 and s["behaviour"]["ratio"]["estimate"] == 2.0
        # each run's students moved along exactly its teachers' trait direction
        assert s["own"]["values"] == pytest.approx([1.0] * 3, rel=1e-9)
        # another trait's direction is random: specific is 1 - its cosine with this one
        assert s["specific"]["values"] == pytest.approx(
            [1 - row["other_traits"][{"owl": "cat", "cat": "owl"}[t]]
             for row in res["per_run"] if row["target"] == t])
        assert s["specific"]["p_sign_flip"] == 1 / 8
        # one decoder layer here: its band is the whole
        assert s["specific_by_band"]["layers 0-0"]["values"] == pytest.approx(
            s["specific"]["values"])
        # the students' evaluations: +2 nats on the target = log-share + log-mass of all
        b = s["behaviour"]
        assert b["target_logprob"]["mean"] == pytest.approx(2.0)
        assert b["log_share"]["mean"] == pytest.approx(0.5 * math.log(2))
        assert b["log_mass"]["mean"] == pytest.approx(2.0 - 0.5 * math.log(2))
    # a run's own teacher, not the other runs' (their trait directions are independent here)
    assert all(row["own"] > row["other_runs"] for row in res["per_run"])
    assert main(["align", str(owl), str(cat), "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "align.json").read_text())["summary"].keys() == {
        "owl", "cat"}
    assert "| owl | 3 |" in (tmp_path / "out" / "report.md").read_text()


def test_unrelated_students_are_not_specific(tmp_path: Path) -> None:
    """Students trained toward another direction than their teacher's: no specificity."""
    gen = torch.Generator().manual_seed(2)
    dirs = {r: _random(gen) for r in range(4)}
    owl = _experiment(tmp_path, "owl", gen, dirs, runs=4)
    # swap the owl students' direction for noise: rewrite their adapters
    for r in range(4):
        folder = owl / "stages" / f"student_trait_run{r}" / "adapter"
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
        _write(folder, _random(gen))
    s = align([owl])["summary"]["owl"]
    assert s["own"]["mean"] < 0.5 and "specific" not in s


def test_bad_experiments_are_clear_errors(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    owl = _experiment(tmp_path, "owl", gen, {r: _random(gen) for r in range(2)}, runs=2)
    with pytest.raises(SublearnError, match="same target"):
        align([owl, owl])
    res = json.loads((owl / "results.json").read_text())
    (owl / "results.json").write_text(json.dumps(
        {**res, "config": {"teacher_mode": "prompted"}}))
    with pytest.raises(SublearnError, match="prompted"):
        align([owl])


def test_uneven_runs_identical_adapters_and_stale_evaluations(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(4)
    owl = _experiment(tmp_path, "owl", gen, {r: _random(gen) for r in range(3)}, runs=3)
    cat = _experiment(tmp_path, "cat", gen, {r: _random(gen) for r in range(2)}, runs=2)
    s = align([owl, cat])["summary"]["owl"]
    # run 2 has no cat teacher to compare with: specific over the 2 runs that have one
    assert s["own"]["n"] == 3 and s["specific"]["n"] == 2
    # an evaluation of a student on another target is not its behaviour on this one
    other = owl / "stages" / "eval_trait_run0_cat"
    other.mkdir()
    (other / "DONE.json").write_text(json.dumps({"output": {
        "model": str(owl / "stages" / "student_trait_run0" / "adapter"), "target": "cat",
        "forced_choice": {"target_logprob": -100.0, "per_question_target_share": [0.5]}}}))
    assert align([owl])["summary"]["owl"]["behaviour"]["target_logprob"]["mean"] == \
        pytest.approx(2.0)
    # a second evaluation of the same student on the same target is refused, not guessed
    (other / "DONE.json").write_text((other / "DONE.json").read_text().replace('"cat"', '"owl"'))
    with pytest.raises(SublearnError, match="two evaluations"):
        align([owl])
    # trait and control students with the same weights have no direction
    twin = owl / "stages" / "student_trait_run1" / "adapter" / "adapter_model.safetensors"
    twin.write_bytes((owl / "stages" / "student_control_run1" / "adapter" /
                      "adapter_model.safetensors").read_bytes())
    (twin.parent / "adapter_config.json").write_text(
        (twin.parent.parent.parent / "student_control_run1" / "adapter" /
         "adapter_config.json").read_text())
    with pytest.raises(SublearnError, match="length 0"):
        align([cat, owl])


def test_bands_split_the_layers_in_thirds() -> None:
    assert list(bands(list(range(30)))) == ["layers 0-9", "layers 10-19", "layers 20-29"]
    assert bands([-1, 0, 1]) == {"layers 0-0": [0], "layers 1-1": [1]}  # -1: no layer


def test_a_band_no_student_adapts_is_left_out(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    gen = torch.Generator().manual_seed(5)
    owl = _experiment(tmp_path, "owl", gen, {r: _random(gen) for r in range(2)}, runs=2)
    cat = _experiment(tmp_path, "cat", gen, {r: _random(gen) for r in range(2)}, runs=2)
    for f in tmp_path.glob("*/stages/teacher_*/adapter/adapter_model.safetensors"):
        sd = load_file(str(f))  # the teachers also adapt a second layer; no student does
        sd[f"{PREFIX}layers.1.q_proj.lora_A.weight"] = torch.randn(2, 5, generator=gen)
        sd[f"{PREFIX}layers.1.q_proj.lora_B.weight"] = torch.randn(6, 2, generator=gen)
        save_file(sd, str(f))
    res = align([owl, cat])
    assert list(res["summary"]["owl"]["specific_by_band"]) == ["layers 0-0"]
    assert main(["align", str(owl), str(cat), "--out", str(tmp_path / "out")]) == 0
