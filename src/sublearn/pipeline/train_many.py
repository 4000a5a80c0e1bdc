"""Many LoRA students of one base, trained as one: each step is one forward and one backward
of the frozen base over every student's batch, each row through its own student's adapter
(`sublearn.models.lora.routed`).

Each student keeps everything of its own that `sublearn train` gives it: its seed (LoRA
init and data order), its data and soft labels, its optimiser, learning-rate schedule and
gradient clipping, its `out/` folder with log, checkpoints and `adapter/`. A student trained
here equals the same student trained alone up to float rounding (the batch is padded to the
longest row of all students, and the adapters' matmuls are batched), tested; its checkpoints
resume alone or together. Students whose data differ in size finish at different steps; the
others go on without them.

A student group resumes exactly when its members resume together: every member is
checkpointed at its last step before any of them is saved, and the checkpoints are removed
only when all are saved, so a kill between two members' saves leaves the rest to save their
final state, not to train again.
"""

from __future__ import annotations

import copy
import json
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sublearn.config import check_manifest
from sublearn.errors import SublearnError
from sublearn.files import atomic_write_json, check_out_dir, locked_out_dir
from sublearn.models import load_model
from sublearn.models.dtype import is_bf16
from sublearn.models.lora import adapter_names, adapter_params, add_loras, routed
from sublearn.pipeline.train import (
    StudentRun,
    _save,
    batch_losses,
    check_teacher,
    eager_attention,
    load_rows,
    optimizer_step,
    recompute_activations,
)
from sublearn.pipeline.train_config import TrainConfig, result_config

# the settings that the students of one group share: one base, one adapter shape, one autocast
SHARED = ("model", "method", "lora_r", "lora_alpha", "dtype")


@dataclass(frozen=True)
class Job:
    """One student: its recipe, its training data (filtered.jsonl) and its output folder."""
    cfg: TrainConfig
    data: str | Path
    out: str | Path


def train_many(jobs: list[Job], progress: bool = True,
               student: Any = None) -> list[dict[str, Any]]:
    """Train the jobs' LoRA students together; each job's `train_summary.json`, in order.
    A job already trained is skipped; the others resume from their checkpoints."""
    if not jobs:
        return []
    cfgs = [j.cfg.validate() for j in jobs]
    for name in SHARED:
        if len({getattr(c, name) for c in cfgs}) > 1:
            raise SublearnError(f"students trained together share --{name.replace('_', '-')}; "
                                "these differ: train them apart")
    if cfgs[0].method != "lora":
        raise SublearnError("students trained together are LoRA students (--method lora)")
    for j in jobs:
        check_out_dir(j.out)
    rows = [load_rows(j.data)[: c.max_examples] for j, c in zip(jobs, cfgs, strict=True)]
    if student is None:
        for c in cfgs:
            check_teacher(c)
    with ExitStack() as locks:
        outs = [locks.enter_context(locked_out_dir(j.out)) for j in jobs]
        return _train_many(cfgs, rows, [str(j.data) for j in jobs], outs, progress, student)


def _train_many(cfgs: list[TrainConfig], rows: list[list[dict]], data: list[str],
                outs: list[Path], progress: bool, student: Any) -> list[dict[str, Any]]:
    from tqdm import tqdm

    summaries: dict[int, dict[str, Any]] = {}
    for i, (cfg, d, out) in enumerate(zip(cfgs, data, outs, strict=True)):
        check_manifest(out, "train_config.json", {**result_config(cfg), "data": str(Path(d))})
        if (out / "train_summary.json").is_file():
            summaries[i] = json.loads((out / "train_summary.json").read_text())
            shutil.rmtree(out / "checkpoint", ignore_errors=True)  # a kill left it: not needed
    todo = [i for i in range(len(cfgs)) if i not in summaries]
    if todo:
        lm = student or load_model(cfgs[0].model)
        model = copy.deepcopy(lm.model) if student is not None else lm.model
        eager_attention(model)
        runs = [StudentRun(cfgs[i], lm, rows[i], outs[i]) for i in todo]
        model, names = start_together(model, runs)
        pad, bf16 = lm.tokenizer.pad_token_id, is_bf16(runs[0].cfg.dtype)
        bar = tqdm(total=sum(r.total for r in runs), initial=sum(r.step for r in runs),
                   unit="step", desc=f"train {len(runs)} students together",
                   disable=not progress, dynamic_ncols=True)
        try:
            while any(r.running for r in runs):
                bar.update(len(step_together(model, runs, names, pad=pad, bf16=bf16)))
        finally:
            bar.close()
        model.eval()
        for run in runs:  # all at their last step before any is saved: see the module doc
            run.checkpoint()
        for i, name, run in zip(todo, names, runs, strict=True):
            saved = _save(model, lm.tokenizer, run.cfg, run.out, lm.path, adapter=name)
            summaries[i] = run.summary(saved, trained_together=len(runs))
            atomic_write_json(run.out / "train_summary.json", summaries[i])
        for run in runs:
            shutil.rmtree(run.out / "checkpoint", ignore_errors=True)
    return [summaries[i] for i in range(len(cfgs))]


def start_together(model: Any, runs: list[StudentRun]) -> tuple[Any, list[str]]:
    """`model` with one adapter per student (its seed's init), each student's last checkpoint
    restored, in training mode; and the adapters' names, in the runs' order (`train_many` and
    `sublearn bench` call this)."""
    cfg = runs[0].cfg
    model = add_loras(model, cfg.lora_r, cfg.lora_alpha, [r.cfg.seed for r in runs],
                      bf16_base=is_bf16(cfg.dtype))
    names = adapter_names(len(runs))
    for name, run in zip(names, runs, strict=True):
        run.start(adapter_params(model, name))
    model.train()
    recompute_activations(model, cfg)
    return model, names


def step_together(model: Any, runs: list[StudentRun], names: list[str], *, pad: int,
                  bf16: bool) -> list[float]:
    """One optimiser step of every running student (runs[k] on adapter names[k]), from one
    forward and one backward: their losses (the loop above and `sublearn bench` call this)."""
    active = [k for k, r in enumerate(runs) if r.running]
    parts = [runs[k].part() for k in active]
    with routed([names[k] for k in active], [len(b) for b, _, _ in parts]):
        losses = batch_losses(model, parts, pad=pad, bf16=bf16)
    torch.stack(losses).sum().backward()  # the students' parameters are disjoint
    values = []
    for k, loss in zip(active, losses, strict=True):
        lr = runs[k].lr()
        optimizer_step(runs[k].opt, lr, runs[k].cfg)
        values.append(loss.item())
        runs[k].stepped(values[-1], lr)
        if not runs[k].running:  # done before others: its last state kept for a resume
            runs[k].checkpoint()
    return values
