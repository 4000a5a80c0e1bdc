"""Training: `sublearn train`'s step vs TRL `SFTTrainer` + PEFT (hard labels) and a plain PEFT
KL loop (soft labels), on the same examples."""

from __future__ import annotations

import copy
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from sublearn.bench.common import SEED, Arch, Sizes, autocast, clocked, sync, throughput
from sublearn.models.dtype import is_bf16


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
    labels: list[torch.Tensor]  # teacher log-probs (in the bench's dtype, as train.py's)
    pad: int
    rows: list[dict[str, Any]]  # the same examples as chat records (the TRL baseline's input)
    teacher: Any  # the model the soft labels come from (the base: only the cost matters)

    @staticmethod
    def build(lm: Any, n: int, dtype: str) -> TrainData:
        from sublearn.pipeline.train import TrainConfig, _compute_soft, tokenize

        rows = number_rows(n, SEED)
        examples = tokenize(rows, lm.tokenizer)
        vocab_ids, masks, labels = _compute_soft(TrainConfig(recipe="soft", dtype=dtype), lm,
                                                examples)
        return TrainData(examples, vocab_ids, masks, labels, lm.tokenizer.pad_token_id, rows,
                         lm.model)

    @property
    def mean_answer_tokens(self) -> float:
        return sum(len(e.answer_ids) for e in self.examples) / len(self.examples)


def _soft(data: TrainData, idx: list[int]) -> list[Any]:
    from sublearn.pipeline.train import soft_rows

    return [soft_rows((data.vocab_ids, data.masks, data.labels), i) for i in idx]


def ours_step(model: Any, opt: Any, data: TrainData, idx: list[int], soft: bool,
              cfg: Any) -> float:
    """`sublearn train`'s own optimiser step (imported, not copied). Soft labels: the
    teacher's distributions for the batch are computed inside the timing, as the baseline's
    are (train.py computes them once per dataset, so an epoch of ours costs less than this)."""
    from sublearn.pipeline.train import teacher_soft_labels, train_step

    batch = [data.examples[i] for i in idx]
    labels = None
    if soft:
        masks = [data.masks[i] for i in idx]
        logp = teacher_soft_labels(data.teacher, batch, masks, data.vocab_ids, data.pad,
                                   cfg.dtype, batch_size=len(batch))
        labels = [(data.vocab_ids, m, lp) for m, lp in zip(masks, logp, strict=True)]
    norm = cfg.batch_size * data.mean_answer_tokens
    return train_step(model, opt, batch, labels, pad=data.pad, norm=norm, lr=cfg.lr, cfg=cfg)


def peft_kl_step(model: Any, opt: Any, data: TrainData, idx: list[int],
                 device: torch.device, bf16: bool) -> float:
    """Baseline, soft labels: a stock PEFT LoRA model in a plain loop (bf16: autocast). The
    teacher and the student each run one ordinary forward with full-vocabulary logits at
    every position; the KL is then restricted to the answer positions and the grammar's
    tokens (renormalised), the same loss as ours."""
    from sublearn.pipeline.train import _batch

    seqs = [(data.examples[i].prompt_ids, data.examples[i].answer_ids) for i in idx]
    ids, mask, rows, cols = (t.to(device) for t in _batch(seqs, data.pad))
    vocab_ids = data.vocab_ids.to(device)
    allowed = torch.cat([data.masks[i] for i in idx]).to(device)
    with autocast(device, bf16):
        with torch.no_grad():
            t_logits = data.teacher(input_ids=ids, attention_mask=mask).logits
        s_logits = model(input_ids=ids, attention_mask=mask).logits
    logp = torch.log_softmax(t_logits[rows, cols][:, vocab_ids].float()
                             .masked_fill(~allowed, -math.inf), dim=-1)
    logq = torch.log_softmax(s_logits[rows, cols][:, vocab_ids].float()
                             .masked_fill(~allowed, -math.inf), dim=-1)
    loss = torch.where(allowed, logp.exp() * (logp - logq), 0.0).sum(-1).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
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


class _StepClock:
    """Times a Trainer's steps end to end (from one step's end to the next's: collation,
    forward, backward, optimiser); the first step is left out as a warm-up."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.last, self.cpu_last = device, 0.0, 0.0
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def callback(self) -> Any:
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_step_end(self, *a: Any, **kw: Any) -> None:
                clock.tick()

        return Clock()

    def tick(self) -> None:
        sync(self.device)
        now, cpu = time.perf_counter(), time.process_time()
        if self.last:
            self.wall.append(now - self.last)
            self.cpu.append(cpu - self.cpu_last)
        self.last, self.cpu_last = now, cpu


def _name(obj: Any, name: str) -> str:
    """transformers 5.2x renamed gradient to activation checkpointing; whichever it has."""
    return name if hasattr(obj, name) or name in getattr(obj, "__dataclass_fields__", {}) \
        else name.replace("activation", "gradient")


# TRL in the bench's dtype with gradient checkpointing off (with the costly levers)
NO_RECOMPUTE = "trl_sft_no_checkpointing"


def trl_sft(lm: Any, data: TrainData, n_rows: int, batch: int, bf16: bool,
            device: torch.device, checkpointing: bool = True) -> dict[str, Any]:
    """Baseline, hard labels: TRL `SFTTrainer` with a PEFT LoRA config (r=8, alpha=8, every
    projection, no dropout), completion-only loss, otherwise TRL's defaults, on the same
    examples; `bf16` sets SFTConfig(bf16=True) (autocast over fp32 weights). TRL's default
    recomputes activations (gradient checkpointing); checkpointing=False keeps them, as our
    headline step does."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from sublearn.models.lora import TARGETS

    clock = _StepClock(device)
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp, per_device_train_batch_size=batch, max_steps=n_rows // batch,
            learning_rate=2e-4, bf16=bf16, completion_only_loss=True, report_to=[],
            save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=SEED,
            use_cpu=device.type == "cpu", dataloader_num_workers=0,
            **{_name(SFTConfig, "activation_checkpointing"): checkpointing})
        trainer = SFTTrainer(
            model=copy.deepcopy(lm.model), args=args,
            train_dataset=Dataset.from_list(data.rows[:n_rows]),
            processing_class=lm.tokenizer, callbacks=[clock.callback()],
            peft_config=LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0,
                                   target_modules=list(TARGETS), task_type="CAUSAL_LM"))
        clock.tick()
        trainer.train()
        recomputed = bool(getattr(trainer.model,
                                  _name(trainer.model, "is_activation_checkpointing"), False))
    # the first interval holds trainer start-up and the warm-up step
    return {"wall": sum(clock.wall[1:]), "cpu": sum(clock.cpu[1:]), "steps": len(clock.wall) - 1,
            "gradient_checkpointing": recomputed}


def bench_training(lm: Any, data: TrainData, sizes: Sizes, peak: dict[str, Any],
                   device: torch.device, dtype: str, levers: bool) -> dict[str, Any]:
    """Our training step (imported from `sublearn.pipeline.train`) against what a user would
    run instead, on the same examples: hard labels, TRL `SFTTrainer` + PEFT (its fp32
    defaults, and bf16 when `dtype` is: on a CPU that emulates bf16 nobody would pick it);
    soft labels, a stock PEFT model in a plain full-vocabulary KL loop. Ours and the
    KL loop are interleaved step by step so that a busy machine slows both alike; the TRL
    runs sit between the two halves of those steps. Each variant first takes an untimed
    step on a full batch."""
    from sublearn.pipeline.train import TrainConfig, epoch_batches

    data = replace(data, teacher=lm.model)  # the teacher on this stage's device
    arch = Arch.of(lm.model)
    bs = sizes.train_batch
    warm, *plain = [list(range(s * bs, (s + 1) * bs)) for s in range(sizes.steps + 1)]
    pool = [i for b in plain for i in b]
    lengths = [data.examples[i].length for i in pool]
    grouped = [[pool[j] for j in b] for b in epoch_batches(lengths, bs, SEED)]
    bf16 = is_bf16(dtype)
    cfg = TrainConfig(batch_size=bs, lr=2e-4, dtype=dtype)
    student, s_opt = _lora_student(lm, bf16=bf16)
    peft, p_opt = _lora_student(lm, stock=True)
    steps: dict[str, tuple[Callable[[list[int]], float], list[list[int]]]] = {
        "ours_soft": (lambda b: ours_step(student, s_opt, data, b, True, cfg), grouped),
        "ours_hard": (lambda b: ours_step(student, s_opt, data, b, False, cfg), grouped),
        "peft_kl_loop": (lambda b: peft_kl_step(peft, p_opt, data, b, device, bf16), plain),
    }
    other = "lora_soft_fp32" if bf16 else "lora_soft_bf16"  # the bf16 lever: the other dtype
    if levers:
        o_student, o_opt = _lora_student(lm, bf16=not bf16)
        o_cfg = TrainConfig(batch_size=bs, lr=2e-4, dtype="float32" if bf16 else "bfloat16")
        steps[other] = (lambda b: ours_step(o_student, o_opt, data, b, True, o_cfg), grouped)
        steps["lora_soft_ungrouped"] = (
            lambda b: ours_step(student, s_opt, data, b, True, cfg), plain)
        steps["lora_soft_stock_peft"] = (
            lambda b: ours_step(peft, p_opt, data, b, True, cfg), grouped)
        r_student, r_opt = _lora_student(lm, bf16=bf16, recompute=True)
        steps["lora_soft_recompute"] = (
            lambda b: ours_step(r_student, r_opt, data, b, True, cfg), grouped)
    work = {name: training_work(data, batches) for name, (_, batches) in steps.items()}
    n_vocab = len(data.vocab_ids)

    def flop(name: str, tokens: int, answers: int) -> float:
        if name == "peft_kl_loop":  # teacher forward + student step, full vocabulary everywhere
            return arch.flops(2, tokens, tokens) + arch.flops(4, tokens, tokens)
        if name == "ours_hard":
            return arch.flops(4, tokens, answers)
        return arch.flops(2, tokens, answers, n_vocab) + arch.flops(4, tokens, answers, n_vocab)

    flops = {name: flop(name, *w) for name, w in work.items()}
    for name, (step, _) in steps.items():
        step(warm[:1] if name in ("ours_hard", "lora_soft_ungrouped") else warm)
    wall, cpu, loss = dict.fromkeys(steps, 0.0), dict.fromkeys(steps, 0.0), {}
    trl: dict[str, dict[str, Any]] = {}
    for k in range(sizes.steps):
        if k == sizes.steps // 2:  # TRL between the halves: a drifting machine hits both
            for tag, half in (("trl_sft_fp32", False), ("trl_sft_bf16", True)):
                if bf16 or not half:
                    trl[tag] = trl_sft(lm, data, len(pool) + bs, bs, half, device)
            if levers:  # like for like: TRL in our dtype keeping its activations, as ours does
                trl[NO_RECOMPUTE] = trl_sft(lm, data, len(pool) + bs, bs, bf16, device,
                                            checkpointing=False)
        for name, (step, batches) in steps.items():
            loss[name], w, c = clocked(lambda st=step, bb=batches[k]: st(bb), device)
            wall[name] += w
            cpu[name] += c
    n = len(pool)
    res: dict[str, Any] = {
        name: {**throughput(n, wall[name], flops[name], peak, "samples", cpu[name]),
               "loss": loss[name]} for name in steps}
    tokens_plain = training_work(data, plain)[0]
    for tag, r in trl.items():  # TRL: full-vocabulary logits at every position
        items = r["steps"] * bs
        res[tag] = {**throughput(items, r["wall"], arch.flops(4, tokens_plain, tokens_plain)
                                 * items / n, peak, "samples", r["cpu"]), "steps": r["steps"],
                    "gradient_checkpointing": r["gradient_checkpointing"]}
    lev: dict[str, Any] = {"length_batching": length_batching_train(lm.tokenizer, sizes)}
    for name, key in ((other, "bf16_autocast_speedup"),
                      ("lora_soft_ungrouped", "length_grouping_speedup"),
                      ("lora_soft_stock_peft", "lora_layer_speedup"),
                      ("lora_soft_recompute", "activation_checkpointing_speedup")):
        if name in res:
            var = res.pop(name)
            lev[name] = {k: var[k] for k in ("per_s", "gflops", "seconds", "cpu_seconds")}
            lev[key] = res["ours_soft"]["per_s"] / var["per_s"]
    if other in lev and not bf16:  # the variant ran in bf16: the lever is bf16 over fp32
        lev["bf16_autocast_speedup"] = lev[other]["per_s"] / res["ours_soft"]["per_s"]

    def cpu_rate(r: dict[str, Any]) -> float:
        return r["items"] / r["cpu_seconds"]

    same = "trl_sft_bf16" if bf16 else "trl_sft_fp32"  # TRL in our dtype: the headline
    res.update(
        dtype=dtype, baseline_hard=same,
        ratio_hard=res["ours_hard"]["per_s"] / res[same]["per_s"],
        ratio_hard_fp32=res["ours_hard"]["per_s"] / res["trl_sft_fp32"]["per_s"],
        ratio_soft=res["ours_soft"]["per_s"] / res["peft_kl_loop"]["per_s"],
        ratio_cpu_hard=cpu_rate(res["ours_hard"]) / cpu_rate(res[same]),
        ratio_cpu_soft=cpu_rate(res["ours_soft"]) / cpu_rate(res["peft_kl_loop"]),
        steps=sizes.steps, batch=bs,
        **({"ratio_hard_no_checkpointing": res["ours_hard"]["per_s"]
            / res[NO_RECOMPUTE]["per_s"]} if NO_RECOMPUTE in res else {}),
        tokens_per_step={name: tokens / sizes.steps for name, (tokens, _) in work.items()},
        levers=lev)
    return res


def _lora_student(lm: Any, stock: bool = False, bf16: bool = True,
                  recompute: bool = False) -> tuple[Any, Any]:
    """A LoRA student as train.py builds it (eager attention, default LoRA config); stock:
    PEFT's own LoRA layer on fp32 frozen weights instead (the lora_layer lever); bf16=False:
    as train.py builds it for fp32 training; recompute: with --activation-checkpointing, as a
    two-worker `sublearn run` trains its students (the activation_checkpointing lever: ours,
    which keeps the activations, over it)."""
    from sublearn.models.lora import add_lora
    from sublearn.pipeline.train import TrainConfig, _trainable, recompute_activations

    student = copy.deepcopy(lm.model)
    if hasattr(student, "set_attn_implementation"):
        student.set_attn_implementation("eager")
    cfg = TrainConfig(dtype="bfloat16" if bf16 else "float32", activation_checkpointing=recompute)
    student = (add_lora(student, cfg.lora_r, cfg.lora_alpha, fast=False) if stock
               else _trainable(student, cfg))
    student.train()
    recompute_activations(student, cfg)
    return student, torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad], lr=2e-4)


def length_batching_train(tok: Any, sizes: Sizes) -> dict[str, Any]:
    """Counted, not timed: right padding of random vs length-sorted training batches."""
    from sublearn.pipeline.train import tokenize

    ex = tokenize(number_rows(256, SEED + 1), tok)
    rand, srt = padding_overhead([e.length for e in ex],
                                 sizes.train_batch)
    return {"padding_random": rand, "padding_sorted": srt,
            "est_speedup": (1 + rand) / (1 + srt)}


def padding_overhead(lens: list[int], batch: int) -> tuple[float, float]:
    """Padded / real tokens - 1, for batches in the given order and sorted by length."""
    def over(order: list[int]) -> float:
        padded = sum(max(order[s : s + batch]) * len(order[s : s + batch])
                     for s in range(0, len(order), batch))
        return padded / sum(order) - 1

    return over(lens), over(sorted(lens))
