"""SUBLEARN_DEVICE: where local models compute (cpu unless set)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sublearn.cli import main
from sublearn.errors import SublearnError
from sublearn.models import dtype, load_model
from sublearn.models.device import DEVICE_ENV, device_record, model_device, on_gpu
from sublearn.models.dtype import native_bf16, settle_dtype, warn_slow_bf16


def test_cpu_unless_set(monkeypatch: pytest.MonkeyPatch, tiny_model: str) -> None:
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert model_device() == torch.device("cpu") and not on_gpu()
    assert next(load_model(tiny_model).model.parameters()).device.type == "cpu"


def test_auto_follows_what_torch_sees(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEVICE_ENV, "auto")
    assert model_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    # dtype auto: bf16 on a GPU, else what the CPU's flags say
    want = "bfloat16" if torch.cuda.is_available() or native_bf16() else "float32"
    assert settle_dtype("auto") == want


@pytest.mark.parametrize("value", ["tpu", "gpu", "cuda:x", "mps", "meta", "cuda:-1"])
def test_a_bad_value_is_a_clean_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(DEVICE_ENV, value)
    with pytest.raises(SublearnError, match=DEVICE_ENV):
        model_device()
    assert not on_gpu()  # reported where a local model loads, not by the dtype rule


def _one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.mark.parametrize("value", ["cuda", " CUDA ", "cuda:0", "auto"])
def test_a_gpu_setting_settles_auto_to_bf16(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str],
                                            value: str) -> None:
    _one_gpu(monkeypatch)
    monkeypatch.setenv(DEVICE_ENV, value)
    assert model_device().type == "cuda" and on_gpu()
    assert settle_dtype("auto") == "bfloat16"
    assert settle_dtype("auto", gpu=False) == ("bfloat16" if native_bf16() else "float32")
    assert settle_dtype("float32") == "float32"
    dtype._warn_once.cache_clear()  # printed once per process: make this call able to print
    warn_slow_bf16("bfloat16")  # bf16 is native on the GPU: no warning
    assert "no native bf16" not in capsys.readouterr().err


def test_a_gpu_index_past_the_last_is_a_clean_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _one_gpu(monkeypatch)
    monkeypatch.setenv(DEVICE_ENV, "cuda:1")
    with pytest.raises(SublearnError, match="sees 1 CUDA device"):
        model_device()


def test_cuda_without_a_gpu_stops_before_any_work(monkeypatch: pytest.MonkeyPatch,
                                                  tiny_model: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    out = tmp_path / "exp"
    assert main(["run", "--model", tiny_model, "--target", "owl", "--n", "8", "--runs", "2",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and len(err.strip().splitlines()) == 1
    assert not (out / "stages").exists()


def test_an_api_model_is_not_stopped_by_a_missing_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """No local model loads, so SUBLEARN_DEVICE does not apply (it errs where one loads)."""
    from sublearn.pipeline.generate import GenerateConfig

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    cfg = GenerateConfig(model="openai:gpt-4.1-nano", target="owl", n=4).validate()
    assert cfg.dtype in ("bfloat16", "float32")


def test_the_record_names_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert device_record() == {"device": "cpu"}
    _one_gpu(monkeypatch)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: f"Fake GPU {d.index}")
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    assert device_record() == {"device": "cuda:0", "name": "Fake GPU 0"}
