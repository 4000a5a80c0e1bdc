"""Training checkpoints without pickle: trainable tensors and AdamW state in safetensors,
scalars in JSON, written into a temp folder and renamed so a kill never leaves half of one.
`state.json`, written last, holds the SHA-256 of both tensor files: a checkpoint that was
damaged on disk is detected before anything is copied from it, and dropped (training then
restarts from step 0, which gives the same student, only later)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sublearn.files import atomic_dir, file_sha256

FILES = ("params.safetensors", "optimizer.safetensors")


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
        hashes = {f: file_sha256(tmp / f) for f in FILES}
        (tmp / "state.json").write_text(json.dumps({**state, "sha256": hashes}))


def load_checkpoint(path: Path, params: dict[str, torch.nn.Parameter],
                    opt: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The saved step state, after restoring params and optimizer; None when there is no
    checkpoint or it is damaged (then it is removed and nothing is restored)."""
    if not (path / "state.json").is_file():
        return None
    try:
        meta = json.loads((path / "state.json").read_text())
        hashes = meta.pop("sha256")
        if any(file_sha256(path / f) != hashes[f] for f in FILES):
            raise ValueError("hash mismatch")
        saved = load_file(path / "params.safetensors")
        flat = load_file(path / "optimizer.safetensors")
        if set(saved) != set(params):
            raise ValueError("other parameters")
    except Exception as e:  # any damage: a restart is always safe, a crash never is
        print(f"sublearn: dropping damaged checkpoint {path} ({type(e).__name__}: {e}); "
              "training restarts from step 0", file=sys.stderr)
        shutil.rmtree(path, ignore_errors=True)
        return None
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])
    sd = opt.state_dict()
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, val in flat.items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = val
    sd["state"] = opt_state
    opt.load_state_dict(sd)
    return meta
