"""Many students as one: K LoRA students stepped together (`train_many.step_together`, one
forward and backward of the base over all their batches) against the same K students stepped
one after another (`train.step_alone`, the step of `sublearn train`). Same rows, same seeds,
same soft labels (the base's: only the cost matters); the first step of each student (or
group) is a warm-up, left out."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch

from sublearn.bench.common import SEED, Sizes, clocked, rss_mib
from sublearn.bench.training import number_rows
from sublearn.models.dtype import is_bf16


def bench_students(lm: Any, sizes: Sizes, device: torch.device,
                   dtype: str) -> dict[str, Any]:
    from sublearn.pipeline.train import (
        StudentRun,
        TrainConfig,
        eager_attention,
        start_alone,
        step_alone,
    )
    from sublearn.pipeline.train_many import start_together, step_together

    steps = sizes.student_steps
    rows = number_rows(sizes.train_batch * (steps + 1), SEED)  # one epoch: warm-up + steps
    pad = lm.tokenizer.pad_token_id
    bf16 = is_bf16(dtype)
    res: dict[str, Any] = {"steps_timed": steps, "batch": sizes.train_batch, "k": {}}
    with tempfile.TemporaryDirectory() as tmp:
        cache = str(Path(tmp) / "soft_labels.safetensors")

        def student_runs(k: int, tag: str) -> list[StudentRun]:
            out = []
            for i in range(k):
                d = Path(tmp) / f"{tag}{k}-{i}"
                d.mkdir()
                cfg = TrainConfig(seed=SEED + i, epochs=1, batch_size=sizes.train_batch,
                                  dtype=dtype, soft_labels_cache=cache,
                                  checkpoint_every=10**6)
                out.append(StudentRun(cfg, lm, rows, d))
            return out

        for k in sizes.student_ks:
            runs = student_runs(k, "together")
            model = copy.deepcopy(lm.model).to(device)
            eager_attention(model)
            model, names = start_together(model, runs)

            def together(m: Any = model, rs: list[StudentRun] = runs,
                         ns: list[str] = names) -> None:
                for _ in range(steps):
                    step_together(m, rs, ns, pad=pad, bf16=bf16)

            step_together(model, runs, names, pad=pad, bf16=bf16)  # warm-up
            _, t_wall, t_cpu = clocked(together, device)
            del model, together, runs  # the closure holds the model too
            a_wall = a_cpu = 0.0
            for run in student_runs(k, "alone"):
                model = copy.deepcopy(lm.model).to(device)
                eager_attention(model)
                model = start_alone(model, run)
                step_alone(model, run, pad=pad)  # warm-up

                def alone(m: Any = model, r: StudentRun = run) -> None:
                    for _ in range(steps):
                        step_alone(m, r, pad=pad)

                _, w, c = clocked(alone, device)
                a_wall, a_cpu = a_wall + w, a_cpu + c
                del model, alone
            samples = k * steps * sizes.train_batch
            res["k"][str(k)] = {
                "together_samples_s": samples / t_wall, "alone_samples_s": samples / a_wall,
                "speedup": a_wall / t_wall, "speedup_cpu": a_cpu / max(1e-9, t_cpu),
                "together_seconds": round(t_wall, 2), "alone_seconds": round(a_wall, 2),
                "rss_mib": rss_mib()}
    return res
