"""The compute dtype: "auto" settles to bfloat16 only on a CPU that multiplies bf16 natively.

bf16 autocast is sublearn's fast path on CPUs with AVX-512 BF16 or AMX (2-5x fp32). A CPU
without them has no bf16 matmul kernel, and torch emulates it: on a 2-core AMD EPYC with AVX2
only, the bench's bf16 matmul peak was 2.3 GFLOP/s against 94 for fp32, and `sublearn train`
12x slower (README, *The experiment*, `--dtype`). A wrong guess costs asymmetrically (bf16
where it is emulated: 4-40x; fp32 where bf16 is native: 2-5x), so only the x86 flags that
name native bf16 arithmetic choose it. The settled
dtype, never "auto", goes into configs, manifests and stage keys: bf16 and fp32 round
differently, so they are different results.
"""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import field
from pathlib import Path
from typing import Any

from sublearn.errors import SublearnError

DTYPES = ("bfloat16", "float32")
DTYPE_CHOICES = ("auto", *DTYPES)
# What a manifest written before the setting existed computed in: every stage was bf16.
LEGACY_DTYPE = "bfloat16"
# The CPU features that give bf16 matmuls a native kernel (oneDNN's avx512_core_bf16, AMX).
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def bf16_flags() -> dict[str, bool]:
    """The CPU's native-bf16 flags (above), as torch's cpuinfo reads them."""
    import torch

    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is not None:
        found = caps()
        return {f: bool(found.get(f)) for f in _BF16_FLAGS}
    # torch < 2.13 has no capability map, only these probes (absent: assume none)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return {f: bool(getattr(torch.cpu, p, lambda: False)())
            for f, p in zip(_BF16_FLAGS, probes, strict=True)}


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively."""
    return any(bf16_flags().values())


def settle_dtype(dtype: str, *, gpu: bool | None = None) -> str:
    """"auto" -> the dtype this machine runs fast: bfloat16 where models compute on a GPU
    (gpu None: as SUBLEARN_DEVICE says) or the CPU multiplies bf16 natively; a named dtype
    stays as it is."""
    if dtype not in DTYPE_CHOICES:
        raise SublearnError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    if gpu is None:
        from sublearn.models.device import on_gpu

        gpu = on_gpu()
    return "bfloat16" if gpu or native_bf16() else "float32"


def recorded_dtype(dtype: str, manifest: Path, *within: str) -> str:
    """`dtype`, settled; for "auto" on a folder that exists, the "dtype" its manifest recorded
    (in the config at keys `within`): a folder resumed on a machine that would settle
    otherwise keeps its dtype, instead of mixing stages of both or refusing the folder."""
    if dtype != "auto":
        return dtype
    try:
        found: Any = json.loads(Path(manifest).read_text())
        for k in within:
            found = found[k]
        found = found.get("dtype", LEGACY_DTYPE)  # made before the setting: bf16
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        found = None  # no folder yet, or a damaged manifest (check_manifest reports that)
    return found if found in DTYPES else settle_dtype(dtype)


SLOW_BF16 = ("this CPU has no native bf16 matmul (no AVX-512 BF16 or AMX), so bfloat16 runs "
             "~4-40x slower than float32 here; --dtype auto picks float32")


def warn_slow_bf16(dtype: str, *, gpu: bool | None = None) -> None:
    """Tell the user, once per process, when bf16 was chosen on a CPU that emulates it (gpu
    None: models compute where SUBLEARN_DEVICE says)."""
    if gpu is None:
        from sublearn.models.device import on_gpu

        gpu = on_gpu()
    if dtype == "bfloat16" and not native_bf16() and not gpu:
        _warn_once(SLOW_BF16)


@functools.cache
def _warn_once(line: str) -> None:
    print(f"sublearn: warning: {line}", file=sys.stderr, flush=True)


def is_bf16(dtype: str) -> bool:
    """Whether a stage with this dtype setting ("auto" included) computes in bf16."""
    return settle_dtype(dtype) == "bfloat16"


def dtype_field(what: str) -> Any:
    """The `dtype` setting of a stage config: "auto" by default, settled by its `validate`."""
    return field(default="auto", metadata={
        "help": f"{what}: auto (bfloat16 on a GPU or a CPU with AVX-512 BF16 or AMX, "
                "float32 on other CPUs, where bf16 is emulated and 4-40x slower), bfloat16 "
                "or float32",
        "choices": list(DTYPE_CHOICES), "manifest_default": LEGACY_DTYPE})


def autocast_weights_in_bf16(model: Any, linears: list[Any] | None = None) -> None:
    """Store in bf16 the weights that bf16 autocast rounds on every matmul: `linears` (default:
    every Linear but the output head, which callers may multiply in fp32 outside autocast, and
    which may be the input embeddings, looked up in fp32). The products are the same, without
    the fp32 weights beside autocast's bf16 copies (~0.4 GiB on SmolLM2). Then the other fp32
    weights (embeddings, norms) are copied out of the checkpoint's memory map: while any
    tensor maps the file, the fp32 pages the casts read stay resident (~0.3 GiB)."""
    import torch

    if linears is None:
        head = model.get_output_embeddings()
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    for m in linears:
        m.weight.data = m.weight.data.to(torch.bfloat16)
        if m.bias is not None:
            m.bias.data = m.bias.data.to(torch.bfloat16)
    for p in model.parameters():
        if p.dtype == torch.float32:
            p.data = p.data.clone()
