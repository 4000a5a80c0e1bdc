"""SUBLEARN_DEVICE: where local models compute (cpu unless set)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sublearn.cli import main
from sublearn.errors import SublearnError
from sublearn.models import load_model
from sublearn.models.device import DEVICE_ENV, model_device, on_gpu
from sublearn.models.dtype import native_bf16, settle_dtype


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


@pytest.mark.parametrize("value", ["tpu", "gpu", "cuda:x"])
def test_a_bad_value_is_a_clean_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(DEVICE_ENV, value)
    with pytest.raises(SublearnError, match=DEVICE_ENV):
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
