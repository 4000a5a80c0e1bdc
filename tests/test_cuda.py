"""On a GPU only (skipped without CUDA): a tiny `sublearn run` with SUBLEARN_DEVICE=cuda, one
after another and with students trained together, against the same run on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sublearn.cli import main
from sublearn.models.device import DEVICE_ENV

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ARGS = ["--target", "owl", "--n", "8", "--runs", "2", "--epochs", "1", "--batch-size", "4",
        "--teacher-epochs", "1", "--dtype", "bfloat16"]


def _shares(tiny_model: str, out: Path, device: str, monkeypatch: pytest.MonkeyPatch,
            *extra: str) -> dict[str, list[float]]:
    monkeypatch.setenv(DEVICE_ENV, device)
    assert main(["run", "--model", tiny_model, *ARGS, "--out", str(out), *extra]) == 0
    res = json.loads((out / "results.json").read_text())
    return {c: v["forced_choice_share"]["values"] for c, v in res["conditions"].items()}


def test_a_run_on_cuda_matches_the_cpu(tiny_model: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    torch.cuda.reset_peak_memory_stats()
    gpu = _shares(tiny_model, tmp_path / "cuda", "cuda", monkeypatch)
    assert torch.cuda.max_memory_allocated() > 0  # the models were on the GPU
    together = _shares(tiny_model, tmp_path / "together", "cuda", monkeypatch, "--together", "2")
    cpu = _shares(tiny_model, tmp_path / "cpu", "cpu", monkeypatch)
    assert gpu.keys() == cpu.keys() == together.keys()
    for c in gpu:
        # float rounding only: the same stages, other kernels
        assert gpu[c] == pytest.approx(cpu[c], rel=1e-3), c
        assert together[c] == pytest.approx(gpu[c], rel=1e-3), c
