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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class AddmmLoraLinear(PeftLoraLinear):
    """PEFT's LoRA Linear; the plain single-adapter case runs as base + one addmm."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
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


def add_lora(model: Any, r: int, alpha: int, *, bf16_base: bool = False,
             fast: bool = True, targets: list[str] | None = None) -> Any:
    """Freeze `model` and wrap it in a trainable PEFT LoRA adapter (dropout 0).

    bf16_base: store the frozen base weights under the adapter in bf16 (only exact when the
    forward runs under bf16 autocast). fast: AddmmLoraLinear instead of PEFT's stock layer."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import LoraLayer

    for p in model.parameters():
        p.requires_grad_(False)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets or TARGETS,
                     task_type="CAUSAL_LM")
    if fast:
        cfg._register_custom_module({torch.nn.Linear: AddmmLoraLinear})
    peft_model = get_peft_model(model, cfg)
    if bf16_base:
        for m in peft_model.modules():
            if isinstance(m, LoraLayer):
                base = m.get_base_layer()
                base.weight.data = base.weight.data.to(torch.bfloat16)
    return peft_model
