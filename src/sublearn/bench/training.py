"""Training: our LoRA student steps vs the baselines, on the same examples."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sublearn.bench.common import SEED, Arch, Sizes, autocast, clocked, throughput
from sublearn.bench.generation import padding_overhead


def number_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Paper number prompts with fixed synthetic in-grammar answers (3-10 numbers, as the
    teacher's answers), so every run trains on identical batches."""
    from sublearn.domains.numbers import make_prompts, random_answers

    return [{"prompt": [{"role": "user", "content": p}],
             "completion": [{"role": "assistant", "content": a}]}
            for p, a in zip(make_prompts(n, seed), random_answers(n, seed), strict=True)]


@dataclass
class TrainData:
    examples: list[Any]  # train.Example
    vocab_ids: torch.Tensor  # soft labels: the grammar's tokens
    masks: list[torch.Tensor]
    labels: list[torch.Tensor]  # teacher log-probs (bf16 autocast, as train.py computes them)
    pad: int

    @staticmethod
    def build(lm: Any, n: int) -> TrainData:
        from sublearn.pipeline.train import TrainConfig, _compute_soft, tokenize

        examples = tokenize(number_rows(n, SEED), lm.tokenizer)
        vocab_ids, masks, labels = _compute_soft(TrainConfig(recipe="soft"), lm, examples)
        return TrainData(examples, vocab_ids, masks, labels, lm.tokenizer.pad_token_id)


def _answer_hidden(model: Any, seqs: list[tuple[list[int], list[int]]], pad: int,
                   device: torch.device) -> torch.Tensor:
    from sublearn.pipeline.train import _batch, _core, answer_hidden

    if device.type == "cpu":
        return answer_hidden(model, seqs, pad)
    ids, mask, rows, cols = _batch(seqs, pad)  # answer_hidden builds CPU tensors
    h = _core(model).model(input_ids=ids.to(device), attention_mask=mask.to(device))
    return h.last_hidden_state[rows.to(device), cols.to(device)]


def lora_step(model: Any, opt: Any, data: TrainData, idx: list[int], soft: bool, bf16: bool,
              device: torch.device) -> float:
    """One optimiser step as train.py's loop (answer positions only; soft: KL over the
    grammar's tokens; hard: cross-entropy); the loss is a per-batch mean where train.py
    divides grouped batches by a dataset constant, a scalar that costs no time."""
    from sublearn.pipeline.train import _core

    ex, pad = data.examples, data.pad
    head = _core(model).get_output_embeddings().weight
    seqs = [(ex[i].prompt_ids, ex[i].answer_ids) for i in idx]
    with autocast(device, bf16):
        h = _answer_hidden(model, seqs, pad, device)
        if not soft:
            targets = torch.tensor([t for i in idx for t in ex[i].answer_ids], device=device)
            loss = F.cross_entropy((h @ head.T).float(), targets)
        else:
            vocab_ids = data.vocab_ids.to(device)
            logits = (h @ head[vocab_ids].T).float()
            mask = torch.cat([data.masks[i] for i in idx]).to(device)
            logq = torch.log_softmax(logits.masked_fill(~mask, -math.inf), dim=-1)
            logp = torch.cat([data.labels[i] for i in idx]).to(device)
            loss = torch.where(mask, logp.exp() * (logp - logq), 0.0).sum(-1).mean()
    loss.backward()
    if opt is None:  # gradients only (numerics)
        return float(loss.detach())
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def full_step(model: Any, opt: Any, data: TrainData, idx: list[int],
              device: torch.device) -> float:
    """Baseline: plain fp32 full fine-tuning, loss over full-vocabulary logits everywhere."""
    from sublearn.pipeline.train import _batch

    seqs = [(data.examples[i].prompt_ids, data.examples[i].answer_ids) for i in idx]
    ids, mask, _, _ = _batch(seqs, data.pad)
    labels = ids.masked_fill(mask == 0, -100)
    loss = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                 labels=labels.to(device)).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def training_work(data: TrainData, batches: list[list[int]]) -> tuple[int, int]:
    """(tokens incl. right padding, answer positions) over the timed batches."""
    tokens = answers = 0
    for idx in batches:
        lens = [data.examples[i].length for i in idx]
        tokens += max(lens) * len(idx)
        answers += sum(len(data.examples[i].answer_ids) for i in idx)
    return tokens, answers


def bench_training(lm: Any, data: TrainData, sizes: Sizes, peak: dict[str, Any],
                   device: torch.device, levers: bool) -> dict[str, Any]:
    """Our LoRA steps and the baseline's, interleaved step by step so that a busy machine
    slows every variant alike. All variants train on the same examples: the baseline on
    random batches, ours on the length-grouped batches train.py makes of them. Each variant
    first takes an untimed step on a full batch: a smaller warm-up leaves the first
    full-size step 20-100% slower (measured)."""
    from sublearn.pipeline.train import epoch_batches

    arch = Arch.of(lm.model)
    bs = sizes.train_batch
    warm, *plain = [list(range(s * bs, (s + 1) * bs)) for s in range(sizes.steps + 1)]
    pool = [i for b in plain for i in b]
    lengths = [data.examples[i].length for i in pool]
    grouped = [[pool[j] for j in b] for b in epoch_batches(lengths, bs, SEED)]
    student, s_opt = _lora_student(lm)
    base, b_opt = _full_model(lm)
    # (step function, batches); the levers reuse our student or a stock PEFT one
    steps: dict[str, tuple[Callable[[list[int]], float], list[list[int]]]] = {
        "ours_soft": (lambda b: lora_step(student, s_opt, data, b, True, True, device),
                      grouped),
        "ours_hard": (lambda b: lora_step(student, s_opt, data, b, False, True, device),
                      grouped),
        "baseline": (lambda b: full_step(base, b_opt, data, b, device), plain),
    }
    if levers:
        peft, p_opt = _lora_student(lm, stock=True)
        fp32, f_opt = _lora_student(lm, bf16=False)
        steps["lora_soft_fp32"] = (
            lambda b: lora_step(fp32, f_opt, data, b, True, False, device), grouped)
        steps["lora_soft_ungrouped"] = (
            lambda b: lora_step(student, s_opt, data, b, True, True, device), plain)
        steps["lora_soft_stock_peft"] = (
            lambda b: lora_step(peft, p_opt, data, b, True, True, device), grouped)
    work = {name: training_work(data, batches) for name, (_, batches) in steps.items()}
    flops = {name: arch.flops(6, tokens, tokens) if name == "baseline" else
             arch.flops(4, tokens, answers, None if name == "ours_hard" else len(data.vocab_ids))
             for name, (tokens, answers) in work.items()}
    for name, (step, _) in steps.items():
        # the hard step reuses the student and shapes the soft warm-up primed (measured warm)
        step(warm[:1] if name in ("ours_hard", "lora_soft_ungrouped") else warm)
    wall, cpu, loss = dict.fromkeys(steps, 0.0), dict.fromkeys(steps, 0.0), {}
    for k in range(sizes.steps):
        for name, (step, batches) in steps.items():
            loss[name], w, c = clocked(lambda st=step, bb=batches[k]: st(bb), device)
            wall[name] += w
            cpu[name] += c
    n = len(pool)
    res: dict[str, Any] = {
        name: {**throughput(n, wall[name], flops[name], peak, "samples", cpu[name]),
               "loss": loss[name]} for name in steps}
    b = res["baseline"]
    lev: dict[str, Any] = {"length_batching": length_batching_train(lm.tokenizer, sizes)}
    for name, key in (("lora_soft_fp32", "bf16_autocast_speedup"),
                      ("lora_soft_ungrouped", "length_grouping_speedup"),
                      ("lora_soft_stock_peft", "lora_layer_speedup")):
        if name in res:
            other = res.pop(name)
            lev[name] = {k: other[k] for k in ("per_s", "gflops", "seconds", "cpu_seconds")}
            lev[key] = res["ours_soft"]["per_s"] / other["per_s"]
    res.update(ratio=res["ours_soft"]["per_s"] / b["per_s"],
               ratio_hard=res["ours_hard"]["per_s"] / b["per_s"],
               ratio_cpu=cpu["baseline"] / cpu["ours_soft"], steps=sizes.steps,
               batch=bs, tokens_per_step={name: tokens / sizes.steps
                                          for name, (tokens, _) in work.items()}, levers=lev)
    return res


def _lora_student(lm: Any, stock: bool = False, bf16: bool = True) -> tuple[Any, Any]:
    """A LoRA student as train.py builds it (eager attention, default LoRA config); stock:
    PEFT's own LoRA layer on fp32 frozen weights instead (the lora_layer lever); bf16=False:
    as train.py builds it for fp32 training."""
    from sublearn.models.lora import add_lora
    from sublearn.pipeline.train import TrainConfig, _trainable

    student = copy.deepcopy(lm.model)
    if hasattr(student, "set_attn_implementation"):
        student.set_attn_implementation("eager")
    cfg = TrainConfig(dtype="bfloat16" if bf16 else "float32")
    student = (add_lora(student, cfg.lora_r, cfg.lora_alpha, fast=False) if stock
               else _trainable(student, cfg))
    student.train()
    return student, torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad], lr=2e-4)


def _full_model(lm: Any) -> tuple[Any, Any]:
    model = copy.deepcopy(lm.model)
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-5)


def length_batching_train(tok: Any, sizes: Sizes) -> dict[str, Any]:
    """Counted, not timed: right padding of random vs length-sorted training batches."""
    from sublearn.pipeline.train import tokenize

    ex = tokenize(number_rows(256, SEED + 1), tok)
    rand, srt = padding_overhead([e.length for e in ex],
                                 sizes.train_batch)
    return {"padding_random": rand, "padding_sorted": srt,
            "est_speedup": (1 + rand) / (1 + srt)}
