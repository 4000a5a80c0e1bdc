"""Numerics: how far bf16 moves teacher distributions, shares and LoRA gradients."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from sublearn.bench.common import SEED, autocast
from sublearn.bench.training import TrainData, _lora_student


@torch.no_grad()
def bench_numerics(lm: Any, data: TrainData, n: int, device: torch.device) -> dict[str, Any]:
    """fp32 vs bf16 teacher next-token distributions at the answer positions of n prompts:
    under autocast, full vocabulary with the head in bf16 and over the grammar's tokens with
    the head in fp32 (the soft labels, as teacher_soft_labels); with bf16 weights (what
    generation samples from), full vocabulary and grammar tokens."""
    from sublearn.pipeline.train import _core, answer_hidden

    ex = data.examples[:n]
    seqs = [(e.prompt_ids, e.answer_ids) for e in ex]
    head = _core(lm.model).get_output_embeddings().weight
    pad = data.pad
    h32 = answer_hidden(lm.model, seqs, pad).float()
    with autocast(device, True):
        h16 = answer_hidden(lm.model, seqs, pad)
        gen16 = (h16 @ head.T).float()
    logp32 = torch.log_softmax(h32 @ head.T, -1)
    full = _kl(logp32, torch.log_softmax(gen16, -1))
    vid = data.vocab_ids.to(device)
    mask = torch.cat(data.masks[:n]).to(device)

    def restricted(h: torch.Tensor, w: torch.Tensor = head) -> torch.Tensor:
        return torch.log_softmax((h @ w[vid].T).float().masked_fill(~mask, -math.inf), -1)

    soft = _kl(restricted(h32), restricted(h16.float()), mask)
    # generation samples from a bf16 copy of the weights (HFBackend), not from autocast
    bf16 = copy.deepcopy(_core(lm.model)).to(torch.bfloat16)
    hb, head16 = answer_hidden(bf16, seqs, pad), bf16.get_output_embeddings().weight
    weights = _kl(logp32, torch.log_softmax((hb @ head16.T).float(), -1))
    gen_grammar = _kl(restricted(h32), restricted(hb, head16), mask)
    del bf16, head16
    return {"prompts": len(ex), "answer_positions": int(h32.shape[0]),
            "lora_grad_rel_error_vs_fp32": lora_grad_errors(lm, data, n, device),
            "kl_full_vocab_head_bf16": full, "kl_grammar_tokens_head_fp32": soft,
            "kl_generation_bf16_weights_full_vocab": weights,
            "kl_generation_bf16_weights_grammar_tokens": gen_grammar,
            "note": "KL(fp32 || bf16) in nats per answer position; autocast (training soft "
                    "labels, evaluation) and bf16 weights (generation, HFBackend)"}


def lora_grad_errors(lm: Any, data: TrainData, n: int, device: torch.device
                     ) -> dict[str, float]:
    """||g - g_fp32|| / ||g_fp32|| of one hard-label LoRA gradient (all adapter parameters,
    random nonzero B) under bf16 autocast: our LoRA layer and PEFT's stock one, against the
    same student in fp32. Hard labels: the bench's soft labels come from the student's own
    base model, so their gradient is mostly bf16 noise whatever the layer."""
    from sublearn.pipeline.train import batch_loss

    idx = list(range(min(n, len(data.examples))))

    def grad(stock: bool, bf16: bool) -> torch.Tensor:
        torch.manual_seed(SEED)  # the same LoRA A init in every student
        student, _ = _lora_student(lm, stock=stock, bf16=bf16)
        student.to(device)
        gen = torch.Generator().manual_seed(SEED)
        with torch.no_grad():
            for name, p in student.named_parameters():
                if "lora_B" in name:  # at B = 0 only B gets a gradient
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        with torch.enable_grad():  # the numerics stage runs under no_grad
            batch_loss(student, [data.examples[i] for i in idx], None, pad=data.pad,
                       norm=None, bf16=bf16).backward()
        return torch.cat([p.grad.flatten() for p in student.parameters() if p.requires_grad])

    ref = grad(False, False)
    return {name: float((grad(stock, True) - ref).norm() / ref.norm())
            for name, stock in (("ours", False), ("stock_peft", True))}


def _kl(logp: torch.Tensor, logq: torch.Tensor, mask: torch.Tensor | None = None
        ) -> dict[str, float]:
    term = logp.exp() * (logp - logq)
    if mask is not None:
        term = torch.where(mask, term, 0.0)
    kl = term.sum(-1)
    return {"mean": float(kl.mean()), "max": float(kl.max())}
