"""Training checkpoints without pickle: trainable tensors and AdamW state in safetensors,
scalars in JSON, written into a temp folder and renamed so a kill never leaves half of one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sublearn.files import atomic_dir


def save_checkpoint(path: Path, params: dict[str, torch.nn.Parameter],
                    opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    with atomic_dir(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in params.items()},
                  tmp / "params.safetensors")
        opt_sd = opt.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        for idx, st in opt_sd["state"].items():
            for key, val in st.items():
                tensors[f"{idx}.{key}"] = torch.as_tensor(val).contiguous()
        save_file(tensors, tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps(state))


def load_checkpoint(path: Path, params: dict[str, torch.nn.Parameter],
                    opt: torch.optim.Optimizer) -> dict[str, Any] | None:
    if not (path / "state.json").is_file():
        return None
    saved = load_file(path / "params.safetensors")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])
    flat = load_file(path / "optimizer.safetensors")
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, val in flat.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = val
    sd["state"] = state
    opt.load_state_dict(sd)
    return json.loads((path / "state.json").read_text())
