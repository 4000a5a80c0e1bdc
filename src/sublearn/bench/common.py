"""What every bench stage shares: sizes, clocks, the FLOP model, the matmul peak."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sublearn.memory import peak_rss_bytes
from sublearn.models.dtype import bf16_flags, settle_dtype

STAGES = ("generation", "training", "evaluation", "numerics", "students")


def default_stages(dtype: str) -> tuple[str, ...]:
    """Every stage, but numerics only where the bench computes in bf16: it measures what bf16
    rounding does against fp32, which a float32 machine never runs, and there bf16 is
    emulated (4 of the 6.4 min of --quick on an AVX2-only CPU). Named in --stages, it runs."""
    return STAGES if dtype == "bfloat16" else tuple(s for s in STAGES if s != "numerics")

FLOPS_FORMULA = (
    "k * (N_body * T + d * V_head * R); k = 2 forward, 4 LoRA training (forward + input "
    "gradients; frozen weights get none), 6 full training; N_body = parameters outside the "
    "(tied) embedding / LM head, T = tokens through the body incl. padding, R = positions "
    "projected onto the vocabulary, V_head = vocabulary columns projected (all, or the "
    "grammar's tokens for soft labels), d = hidden size; attention scores ignored (<5% here)"
)


@dataclass(frozen=True)
class Sizes:
    """Fixed work per stage, so that runs of the same mode are comparable."""

    prompts: int = 64  # generation prompts
    batch: int = 64  # generation batch
    max_new_tokens: int = 60
    steps: int = 6  # timed training steps per variant
    train_batch: int = 8
    questions: int = 8  # forced-choice questions (x 24 candidates)
    numerics_prompts: int = 16
    matmul_reps: int = 20
    levers: bool = True  # the costly levers (generation variants, other-dtype LoRA, threads)
    student_ks: tuple[int, ...] = (1, 2, 5, 10)  # students trained together vs one by one
    student_steps: int = 3  # timed steps per student


# --quick: < 1 min on 2 busy cores with native bf16 (on an AVX2-only CPU, see default_stages);
# batch 4 because each variant's warm-up is a full batch
QUICK = Sizes(prompts=4, steps=1, train_batch=4, questions=1, numerics_prompts=4,
              matmul_reps=5, levers=False, student_ks=(1, 2), student_steps=1)
SEED = 0




def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def clocked(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, float]:
    """(result, wall seconds, process CPU seconds): on a shared machine the CPU share tells
    how much of the wall time this process actually ran."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0, time.process_time() - c0


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    out, wall, _ = clocked(fn, device)
    return out, wall


def autocast(device: torch.device, bf16: bool) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


@dataclass(frozen=True)
class Arch:
    n_body: int  # parameters outside the embedding / LM head
    d: int
    vocab: int

    @staticmethod
    def of(model: Any) -> Arch:
        emb = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        n = sum(p.numel() for p in model.parameters() if p is not emb and p is not head)
        return Arch(n_body=n, d=head.shape[1], vocab=head.shape[0])

    def flops(self, k: int, tokens: int, rows: int, cols: int | None = None) -> float:
        return float(k * (self.n_body * tokens + self.d * (cols or self.vocab) * rows))


def throughput(items: int, seconds: float, flop: float, peak: dict[str, Any], unit: str,
               cpu_s: float | None = None) -> dict[str, Any]:
    gflops = flop / seconds / 1e9
    return {
        "seconds": round(seconds, 4), "items": items, "unit": unit,
        "cpu_seconds": cpu_s,
        "cpu_share": None if cpu_s is None else cpu_s / seconds / torch.get_num_threads(),
        "per_s": items / seconds, "gflop": flop / 1e9, "gflops": gflops,
        "pct_bf16_peak": 100 * gflops / peak["bf16_gflops"],
        "pct_fp32_peak": 100 * gflops / peak["fp32_gflops"],
    }


def rss_mib() -> float:
    """Peak resident set so far, in MiB."""
    return round((peak_rss_bytes() or 0) / 2**20, 1)


def machine_info(device: torch.device) -> dict[str, Any]:
    import transformers

    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name") and cpu in ("", "x86_64"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **bf16_flags(),  # amx_bf16, avx512_bf16: the flags --dtype auto reads
        "dtype_auto": settle_dtype("auto", gpu=False),  # what `sublearn run` computes in here
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
    return info



# [M x K] @ [K x N] like the model's projections on a batch of ~1024 tokens (SmolLM2-135M:
# d = 576, MLP 1536)
MATMUL_SHAPES = ((1024, 576, 1536), (1024, 1536, 576), (1024, 576, 576))


# A matmul slower than this (bf16 emulated on a CPU without native bf16: ~0.8 s at these
# shapes, against ~0.02 s in fp32) is timed once: its time is steady, and three trials of
# `reps` would add ~40 s to every bench on such a CPU.
SLOW_MATMUL_S = 0.1


def matmul_gflops(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device,
                  reps: int) -> float:
    m, k, n = shape
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    a @ b  # first call: kernel selection
    _, once = timed(lambda: a @ b, device)
    if once > SLOW_MATMUL_S:
        return 2 * m * k * n / once / 1e9
    a @ b
    # best of 3 trials: the peak is what the machine can do, not what a neighbour left us
    s = min(timed(lambda: [a @ b for _ in range(reps)], device)[1] for _ in range(3))
    return 2 * m * k * n * reps / s / 1e9


def measure_peak(device: torch.device, reps: int) -> dict[str, Any]:
    per: dict[str, dict[str, float]] = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        per[name] = {"x".join(map(str, s)): matmul_gflops(s, dt, device, reps)
                     for s in MATMUL_SHAPES}
    return {"fp32_gflops": max(per["fp32"].values()), "bf16_gflops": max(per["bf16"].values()),
            "per_shape_gflops": per, "reps": reps,
            "note": "best of the shapes, best of 3 trials each (one timed matmul where one "
                    f"takes over {SLOW_MATMUL_S} s: emulated bf16); bf16 = bf16 tensors "
                    "(oneDNN: AVX-512 BF16 or AMX where the CPU has them)"}
