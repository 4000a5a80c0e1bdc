"""LoRA students for CPU training: PEFT adapters with a leaner forward.

The adapter is PEFT's own (same parameters, same saved `adapter/` folder, loadable by PEFT and
vLLM); only its training-time forward differs, in two ways measured to matter on a 2-core CPU
(`sublearn bench`, lever `lora_layer`):
- the update is added inside one addmm, `y + s * (x A^T) B^T`, instead of PEFT's separate
  matmul, scale and add over the full [tokens, out] output (rank 8 makes those passes the cost);
- the layer input is cast to bf16 once for the base and the adapter matmul, where PEFT and
  autocast cast it three times (to the adapter's fp32, then to bf16 for each matmul). The
  forward is bit-identical; in the backward the two input gradients are summed in bf16
  before the cast back. One hard-label gradient on SmolLM2 is 2.31% (relative L2) from fp32
  with this layer and 2.33% with PEFT's (`sublearn bench`, numerics).
Frozen base weights under the adapter are stored in bf16 when training under bf16 autocast:
autocast would round them the same way on every forward, so the results are unchanged.

Many students of one base (`add_loras`, `routed`): K adapters on one model, and a batch whose
rows are the students' batches one after another; each row goes through its own student's
adapter (one batched matmul over the stacked A and B when the students' batches are equally
large), so K students share each forward and backward of the frozen base.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# (adapter names, rows of each): the batch's rows, in that order, go through those adapters
_ROUTE: ContextVar[tuple[list[str], list[int]] | None] = ContextVar("lora_route", default=None)


@contextmanager
def routed(names: list[str], rows: list[int]) -> Iterator[None]:
    """Forwards inside this block send the first rows[0] rows of the batch through adapter
    names[0], the next rows[1] through names[1], and so on."""
    token = _ROUTE.set((names, rows))
    try:
        yield
    finally:
        _ROUTE.reset(token)


def replay_route() -> tuple[Any, Any]:
    """Activation checkpointing's `context_fn`: the recompute of a forward, run during the
    backward (on CUDA in autograd's own thread, which does not see this thread's context),
    routes the rows as the forward did."""
    route = _ROUTE.get()
    return nullcontext(), (routed(*route) if route is not None else nullcontext())


class AddmmLoraLinear(PeftLoraLinear):
    """PEFT's LoRA Linear; the plain single-adapter case runs as base + one addmm."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if (route := _ROUTE.get()) is not None and not (args or kwargs):
            return self._routed(x, *route)
        active = self.active_adapters
        if (self.disable_adapters or self.merged or args or kwargs or len(active) != 1
                or active[0] not in self.lora_A or active[0] in self.lora_variant):
            return super().forward(x, *args, **kwargs)
        name = active[0]
        device = x.device.type
        if torch.is_autocast_enabled(device):
            x = x.to(torch.get_autocast_dtype(device))  # once for both matmuls, not twice
        elif x.dtype != self.lora_A[name].weight.dtype:
            return super().forward(x)  # mixed dtypes need PEFT's casts
        y = self.base_layer(x)
        xa = F.linear(self.lora_dropout[name](x), self.lora_A[name].weight)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), xa.reshape(-1, xa.shape[-1]),
                          self.lora_B[name].weight.t(), alpha=self.scaling[name])
        return out.view(y.shape)

    def _routed(self, x: torch.Tensor, names: list[str], rows: list[int]) -> torch.Tensor:
        """Each student's rows through its own adapter (dropout is 0 in training here)."""
        device = x.device.type
        if torch.is_autocast_enabled(device):
            x = x.to(torch.get_autocast_dtype(device))
        y = self.base_layer(x)
        scale = self.scaling[names[0]]
        if len(set(rows)) == 1:  # equal batches: one bmm per matrix over the stacked adapters
            k = len(names)
            a = torch.stack([self.lora_A[n].weight for n in names])  # [k, r, in]
            b = torch.stack([self.lora_B[n].weight for n in names])  # [k, out, r]
            xa = torch.bmm(x.reshape(k, -1, x.shape[-1]), a.transpose(1, 2))
            out = torch.baddbmm(y.reshape(k, -1, y.shape[-1]), xa, b.transpose(1, 2),
                                alpha=scale)
            return out.view(y.shape)
        parts = []
        for n, xs, ys in zip(names, x.split(rows), y.split(rows), strict=True):
            xa = F.linear(xs, self.lora_A[n].weight)
            parts.append(torch.addmm(ys.reshape(-1, ys.shape[-1]), xa.reshape(-1, xa.shape[-1]),
                                     self.lora_B[n].weight.t(), alpha=scale).view(ys.shape))
        return torch.cat(parts)


def lora_config(r: int, alpha: int, targets: list[str] | None = None, fast: bool = True) -> Any:
    """sublearn's LoRA adapter: PEFT's config, dropout 0; fast: AddmmLoraLinear layers."""
    from peft import LoraConfig

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets or TARGETS,
                     task_type="CAUSAL_LM")
    if fast:
        cfg._register_custom_module({torch.nn.Linear: AddmmLoraLinear})
    return cfg


def _bf16_base(peft_model: Any) -> None:
    from peft.tuners.lora.layer import LoraLayer

    from sublearn.models.dtype import autocast_weights_in_bf16

    autocast_weights_in_bf16(peft_model, [m.get_base_layer() for m in peft_model.modules()
                                          if isinstance(m, LoraLayer)])


@contextmanager
def quiet_peft() -> Iterator[None]:
    """PEFT reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a
    model: a FutureWarning on every teacher and student that a user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated",
                                FutureWarning)
        yield


def add_lora(model: Any, r: int, alpha: int, *, bf16_base: bool = False,
             fast: bool = True, targets: list[str] | None = None) -> Any:
    """Freeze `model` and wrap it in a trainable PEFT LoRA adapter (dropout 0).

    bf16_base: store the frozen base weights under the adapter in bf16 (only exact when the
    forward runs under bf16 autocast). fast: AddmmLoraLinear instead of PEFT's stock layer."""
    from peft import get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    with quiet_peft():
        peft_model = get_peft_model(model, lora_config(r, alpha, targets, fast))
    if bf16_base:
        _bf16_base(peft_model)
    return peft_model


def adapter_names(k: int) -> list[str]:
    """The names of `add_loras`' adapters: PEFT's default first."""
    return ["default", *(f"s{i}" for i in range(1, k))]


def adapter_params(model: Any, name: str) -> dict[str, torch.nn.Parameter]:
    """One adapter's trainable parameters, named as in a one-adapter model (PEFT's default),
    so that a student's checkpoint is the same whether it trained alone or together."""
    return {n.replace(f".{name}.", ".default."): p for n, p in model.named_parameters()
            if f".{name}." in n and "lora_" in n}


def add_loras(model: Any, r: int, alpha: int, seeds: list[int], *,
              bf16_base: bool = False) -> Any:
    """Freeze `model` and add one trainable LoRA adapter per seed (`adapter_names`), each
    initialised as `add_lora` initialises it after `torch.manual_seed(seed)` (tested)."""
    torch.manual_seed(seeds[0])
    peft_model = add_lora(model, r, alpha)  # the base goes to bf16 after every adapter is made
    for name, seed in zip(adapter_names(len(seeds))[1:], seeds[1:], strict=True):
        torch.manual_seed(seed)
        peft_model.add_adapter(name, lora_config(r, alpha))
    for n, p in peft_model.named_parameters():
        p.requires_grad_("lora_" in n)
    if bf16_base:
        _bf16_base(peft_model)
    return peft_model


def merge_and_unload(peft_model: Any, into: torch.dtype | None = None) -> Any:
    """PEFT's `merge_and_unload`, the same sums (W + its `get_delta_weight`), written into new
    tensors instead of in place. The base weights map the checkpoint file, and PEFT's in-place
    add first copies every page it writes: for SmolLM2 about 0.9-1.1 s of a 1.1-1.5 s merge,
    against 0.2-0.3 s out of place. Any adapter but plain LoRA linears on weights in memory
    (variants such as DoRA, biases, trainable tokens, layer replication, quantised or offloaded
    layers, several adapters) goes to PEFT's own merge. into: the dtype the merged weights are
    stored in (bf16 for use under bf16 autocast only: rounded once, after the sum, as autocast
    rounds them), the output head's excepted; None: the base's."""
    from peft.tuners.lora.layer import LoraLayer

    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    configs = list(peft_model.peft_config.values())
    plain = (len(configs) == 1 and not getattr(configs[0], "trainable_token_indices", None)
             and not getattr(configs[0], "layer_replication", None)
             and not getattr(configs[0], "modules_to_save", None)
             and all(type(m) in (PeftLoraLinear, AddmmLoraLinear) and not m.lora_variant
                     and not any(m.lora_bias.values()) and not m.merged
                     and m.get_base_layer().weight.device.type != "meta" for m in layers))
    if not plain:
        return peft_model.merge_and_unload()
    head = peft_model.get_output_embeddings()
    for m in layers:
        w = m.get_base_layer().weight
        for name in m.active_adapters:
            if name in m.lora_A:
                w.data = (w.data + m.get_delta_weight(name)).to(w.dtype)  # += rounds so
        if into is not None and m is not head and m.get_base_layer() is not head:
            w.data = w.data.to(into)
    return peft_model.unload()
