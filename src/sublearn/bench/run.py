"""`sublearn bench`: our fast paths against what a user would run instead, in one process.

Every figure is timed against its baseline in the same run, on the same inputs, after a
warm-up, in one compute dtype (`--dtype auto`: the one `sublearn run` settles to on this
machine, bf16 only where the CPU multiplies it natively). On a shared machine read the CPU-time
ratios too (training steps are interleaved; the load average is recorded). Stages:

  generation  HFBackend (numbers grammar, our decoding loop: hf_decode) vs transformers
              `generate` with the same weights and xgrammar grammar; fp32 unconstrained
              `generate` as an extra line
  training    `sublearn train`'s step (imported) vs TRL `SFTTrainer` + PEFT LoRA (hard
              labels; its fp32 defaults, and bf16 when the dtype is bf16) and a plain PEFT
              full-vocabulary KL loop (soft labels, the teacher inside the timing)
  evaluation  `score_candidates` (packed, shared prefix) vs one forward per question with its
              candidates batched; one fp32 forward per (question, candidate) as an extra line
  numerics    fp32 vs bf16 teacher distributions and forced-choice shares
  students    K LoRA students stepped together (one forward/backward) vs one after another
  peak        fp32 / bf16 matmul GFLOP/s at model-like shapes, the yardstick for every stage

Levers (which of our choices help, and by how much) are measured in the default mode; --quick
keeps the cheap ones. FLOPs are counted, not profiled: see FLOPS_FORMULA. With CUDA the same
stages run again under "cuda" (in bf16 unless --dtype names another; --device cuda: there
alone); a stage that fails there is recorded as {"error": ...}. Measured once on an H200
(README, *Speed*).
"""

from __future__ import annotations

import copy
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from typing import Any

import torch

from sublearn.bench.common import (
    FLOPS_FORMULA,
    SEED,
    STAGES,
    Sizes,
    machine_info,
    measure_peak,
    rss_mib,
)
from sublearn.bench.evaluation import bench_evaluation
from sublearn.bench.generation import bench_generation, chat_texts, threads_lever
from sublearn.bench.numerics import bench_numerics
from sublearn.bench.report import lever_summary
from sublearn.bench.students import bench_students
from sublearn.bench.training import TrainData, bench_training


def run_bench(model: str | None, sizes: Sizes, *, stages: Sequence[str] = STAGES,
              dtype: str = "auto", threads: int | None = None, cuda: bool | None = None,
              cpu: bool = True,
              log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)
              ) -> dict[str, Any]:
    """All figures on CPU (and on CUDA as an extra section where available: cuda None), one
    process, in `dtype` ("auto": what `sublearn run` computes in on this machine). cpu False
    skips the CPU section (a GPU machine's user wants the GPU's figures)."""
    from sublearn.models import load_model
    from sublearn.models.dtype import settle_dtype, warn_slow_bf16

    # the CPU's dtype and a model on the CPU: the bench's devices are --device's alone
    dt = settle_dtype(dtype, gpu=False)
    if cpu:
        warn_slow_bf16(dt, gpu=False)
    t0 = time.perf_counter()
    host = torch.device("cpu")
    lm = load_model(model, dtype="float32", device=host)
    log(f"bench: model loaded in {time.perf_counter() - t0:.1f} s")
    res: dict[str, Any] = {"model": lm.model_id, "dtype": dt, "sizes": asdict(sizes),
                           "stages": list(stages), "flops_formula": FLOPS_FORMULA,
                           "machine": machine_info(host)}
    memory = res["memory"] = {"unit": "MiB, peak RSS (ru_maxrss) after each stage",
                              "after_load": rss_mib()}
    data = None
    if "training" in stages or "numerics" in stages:
        # untimed preparation: tokenised batches and the teacher's soft labels (on CPU)
        n = max((sizes.steps + 1) * sizes.train_batch if "training" in stages else 0,
                sizes.numerics_prompts if "numerics" in stages else 0)
        t = time.perf_counter()
        data = TrainData.build(lm, n, dt)
        memory["after_soft_labels"] = rss_mib()
        log(f"bench: {n} training examples and soft labels in {time.perf_counter() - t:.1f} s")
    if cpu:
        res.update(run_section(lm, data, sizes, stages, host, dt, threads, log, memory))
    if torch.cuda.is_available() if cuda is None else cuda:
        dev = torch.device("cuda")
        glm = replace(lm, model=copy.deepcopy(lm.model).to(dev))
        gmem: dict[str, Any] = {"unit": "MiB, peak CUDA memory allocated after each stage"}
        gdt = settle_dtype(dtype, gpu=True)  # the CPU's flags say nothing of a GPU
        res["cuda"] = {"machine": {"device": torch.cuda.get_device_name(dev)}, "memory": gmem,
                       "dtype": gdt,
                       **run_section(glm, data, sizes, stages, dev, gdt, 1, log, gmem, True)}
    res["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def run_section(lm: Any, data: TrainData | None, sizes: Sizes, stages: Sequence[str],
                device: torch.device, dtype: str, threads: int | None,
                log: Callable[[str], None], memory: dict[str, Any],
                tolerant: bool = False) -> dict[str, Any]:
    """The stages on one device, ours and the baselines in `dtype` (settled). tolerant (CUDA,
    untested on CPU-only CI): a failing stage is recorded as {"error": ...} instead of ending
    the run."""
    res: dict[str, Any] = {}
    levers: dict[str, Any] = {}
    seconds: dict[str, float] = {}

    def stage(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        t = time.perf_counter()
        try:
            out = fn()
        except (RuntimeError, ValueError, TypeError, ImportError) as e:
            if not tolerant:
                raise
            out = {"error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
        if device.type == "cuda":
            memory[f"after_{name}"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        else:
            memory[f"after_{name}"] = rss_mib()
        if "levers" in out:
            levers[name] = out["levers"]
        res[name] = out
        seconds[name] = round(time.perf_counter() - t, 2)
        log(f"bench [{device.type}] {name}: {seconds[name]:.1f} s")

    stage("peak", lambda: measure_peak(device, sizes.matmul_reps))
    peak = res["peak"]
    if "error" in peak:
        return res
    if "generation" in stages:
        stage("generation", lambda: bench_generation(lm, sizes, peak, device, dtype, sizes.levers))
    if "training" in stages and data is not None:
        stage("training", lambda: bench_training(lm, data, sizes, peak, device, dtype,
                                                          sizes.levers))
    if "evaluation" in stages:
        stage("evaluation", lambda: bench_evaluation(
            lm, sizes, peak, device, dtype, both_dtypes=sizes.levers or "numerics" in stages))
    if "numerics" in stages and data is not None:
        stage("numerics", lambda: bench_numerics(lm, data, sizes.numerics_prompts, device))
        share = res.get("evaluation", {}).pop("_target_share", None)
        if share is not None:
            res["numerics"]["forced_choice_target_share"] = share
    res.get("evaluation", {}).pop("_target_share", None)
    if "students" in stages:
        stage("students", lambda: bench_students(lm, sizes, device, dtype))
    threads = threads or os.cpu_count() or 1
    if sizes.levers and device.type == "cpu" and threads > 1:
        from sublearn.domains.numbers import make_prompts

        texts = chat_texts(lm.tokenizer, make_prompts(16, SEED))
        stage("threads", lambda: threads_lever(lm, texts, threads, device, dtype,
                                                     sizes.matmul_reps))
        levers["threads"] = res.pop("threads")
    res["levers"] = levers
    res["lever_speedups"] = lever_summary(levers)
    res["stage_seconds"] = seconds
    return res
