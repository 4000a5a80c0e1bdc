"""Where local models compute: the SUBLEARN_DEVICE environment variable, cpu by default.

One process-wide setting, read where every local model is loaded (`load_model`), so each verb
and the processes a sweep starts follow it without a flag per verb. `cuda` (or `cuda:N`) puts
every model of the process on that GPU; `auto` picks the GPU where torch sees one. The default
stays cpu: the GPU paths of `run`, `generate`, `train` and `evaluate` were checked once on an
H200 with the tiny test model (README, *Paper scale*), not at paper scale. The device is in no
stage key: like two CPUs, a GPU gives the same results up to float rounding.
"""

from __future__ import annotations

import os
from typing import Any

from sublearn.errors import SublearnError

DEVICE_ENV = "SUBLEARN_DEVICE"


def model_device() -> Any:
    """The torch.device that local models are loaded onto (SUBLEARN_DEVICE)."""
    import torch

    want = os.environ.get(DEVICE_ENV, "cpu").strip().lower() or "cpu"
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(want)
    except RuntimeError:
        raise SublearnError(f"{DEVICE_ENV}={want!r}: use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise SublearnError(f"{DEVICE_ENV}={want!r}: use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SublearnError(f"{DEVICE_ENV}={want}: no CUDA device is visible to torch here")
        if (dev.index or 0) >= (n := torch.cuda.device_count()):
            raise SublearnError(f"{DEVICE_ENV}={want}: torch sees {n} CUDA device(s), "
                                f"cuda:0 to cuda:{n - 1}")
    return dev


def device_record() -> dict[str, str]:
    """Where this process's local models computed, for results.json: {"device": "cpu"}, or
    {"device": "cuda:0", "name": "NVIDIA H200"}."""
    import torch

    dev = model_device()
    if dev.type != "cuda":
        return {"device": str(dev)}
    dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
    return {"device": str(dev), "name": torch.cuda.get_device_name(dev)}


def on_gpu() -> bool:
    """Whether local models will compute on a GPU (bf16 is native there: see settle_dtype).
    Never raises: a bad setting is reported where a local model is checked or loaded, so a
    command that loads none (an API model) is not stopped by it."""
    want = os.environ.get(DEVICE_ENV, "cpu").strip().lower()
    if want in ("", "cpu"):
        return False
    try:
        return model_device().type == "cuda"
    except SublearnError:
        return False
