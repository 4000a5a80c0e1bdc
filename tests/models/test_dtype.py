"""--dtype auto: bf16 only where the CPU multiplies it natively; a folder keeps its dtype."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from sublearn.experiment.run import ExperimentConfig, settled
from sublearn.models import dtype as dt
from sublearn.pipeline.evaluate import EvalConfig
from sublearn.pipeline.generate import GenerateConfig
from sublearn.pipeline.train_config import TrainConfig, result_config


@pytest.fixture(params=[True, False], ids=["native-bf16", "no-bf16"])
def native(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Pretend the CPU has (or lacks) native bf16 matmuls."""
    monkeypatch.setattr(dt, "native_bf16", lambda: request.param)
    return bool(request.param)


def test_native_bf16_reads_the_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    dt.bf16_flags.cache_clear()
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "avx512_f": True})
    assert not dt.native_bf16()  # AVX-512 without its BF16 extension emulates bf16
    dt.bf16_flags.cache_clear()
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    assert dt.native_bf16()
    dt.bf16_flags.cache_clear()
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True})
    assert dt.native_bf16()
    dt.bf16_flags.cache_clear()


def test_every_stage_config_settles_auto(native: bool) -> None:
    want = "bfloat16" if native else "float32"
    assert dt.settle_dtype("auto") == want
    for cfg in (TrainConfig(), GenerateConfig(), EvalConfig(target="owl"), ExperimentConfig()):
        assert cfg.dtype == "auto"
        assert cfg.validate().dtype == want, type(cfg).__name__
        for named in dt.DTYPES:  # a named dtype is never overridden
            assert replace(cfg, dtype=named).validate().dtype == named


def test_auto_keys_equal_the_named_dtypes_keys(native: bool) -> None:
    """A folder made before "auto" existed (dtype bfloat16) keeps its stage keys where auto
    settles to bfloat16: the settled dtype, never "auto", goes into keys."""
    want = "bfloat16" if native else "float32"
    assert result_config(TrainConfig().validate()) == result_config(TrainConfig(dtype=want))
    assert ExperimentConfig().validate() == ExperimentConfig(dtype=want).validate()
    g = ExperimentConfig().validate().generate_config(0, None, None)
    assert g.dtype == want


def test_uses_bf16_follows_the_setting(native: bool) -> None:
    assert dt.is_bf16("auto") is native
    assert dt.is_bf16("bfloat16") and not dt.is_bf16("float32")


def test_a_folder_keeps_its_recorded_dtype(tmp_path: Path, native: bool,
                                           capsys: pytest.CaptureFixture) -> None:
    """Resumed with auto on a machine that would settle otherwise, a folder keeps the dtype
    its manifest recorded (no mixed stages, no refused folder); a bf16 folder on a CPU that
    emulates bf16 gets a warning, not a silent 25x slowdown. A named dtype still wins."""
    other = "float32" if native else "bfloat16"
    manifest = tmp_path / "experiment_config.json"
    manifest.write_text(json.dumps({"dtype": other}))
    dt._warn_once.cache_clear()
    assert settled(ExperimentConfig(), manifest).dtype == other
    warned = "no native bf16" in capsys.readouterr().err
    assert warned is (other == "bfloat16")
    settled(ExperimentConfig(), manifest)  # once per process, not once per config
    assert "no native bf16" not in capsys.readouterr().err
    assert settled(ExperimentConfig(dtype="bfloat16"), manifest).dtype == "bfloat16"
    assert settled(ExperimentConfig(), tmp_path / "missing.json").dtype == dt.settle_dtype("auto")
    nested = tmp_path / "matrix_config.json"
    nested.write_text(json.dumps({"experiment": {"dtype": other}}))
    assert dt.recorded_dtype("auto", nested, "experiment") == other
    nested.write_text("not json")  # a damaged manifest is check_manifest's to report
    assert dt.recorded_dtype("auto", nested, "experiment") == dt.settle_dtype("auto")


def test_bad_dtype_is_a_clean_error() -> None:
    from sublearn.errors import SublearnError

    with pytest.raises(SublearnError, match="--dtype"):
        EvalConfig(target="owl", dtype="float16").validate()


def test_a_manifest_from_before_the_setting_is_bf16(tmp_path: Path, native: bool) -> None:
    """Manifests written before `dtype` existed ran in bf16 (the only dtype then). With auto,
    such a folder resumes in bf16 on any machine, and its manifest still matches: plain
    (run, theorem) and nested with explicit defaults (matrix, cross)."""
    from sublearn.config import check_manifest, config_dict, field_defaults
    from sublearn.experiment.run import FREE, manifest_config

    old = config_dict(manifest_config(ExperimentConfig(dtype="bfloat16").validate()))
    del old["dtype"]
    (tmp_path / "experiment_config.json").write_text(json.dumps(old))
    cfg = settled(ExperimentConfig(), tmp_path / "experiment_config.json")
    assert cfg.dtype == "bfloat16"
    check_manifest(tmp_path, "experiment_config.json", manifest_config(cfg), FREE)  # no error
    (tmp_path / "matrix_config.json").write_text(json.dumps({"experiment": old}))
    cfg = settled(ExperimentConfig(), tmp_path / "matrix_config.json", "experiment")
    assert cfg.dtype == "bfloat16"
    check_manifest(tmp_path, "matrix_config.json", {"experiment": config_dict(cfg)},
                   defaults={"experiment": field_defaults(ExperimentConfig)})


def test_vllm_sampling_is_bf16(native: bool) -> None:
    """vLLM samples on a GPU: auto is bf16 there whatever the host CPU has."""
    assert GenerateConfig(model="vllm:some/model").validate().dtype == "bfloat16"
    assert GenerateConfig(model="vllm:some/model", dtype="float32").validate().dtype == "float32"


def test_every_config_refuses_an_unknown_dtype() -> None:
    from sublearn.errors import SublearnError

    for cfg in (TrainConfig(), GenerateConfig(), ExperimentConfig()):
        with pytest.raises(SublearnError, match="--dtype must be one of auto"):
            replace(cfg, dtype="float16").validate()
