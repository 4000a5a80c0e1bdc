"""Student training: hard-label SFT and soft-label distillation, LoRA or full fine-tuning.

One straight-line loop (no Trainer): on a 2-core CPU the wins are computing the vocabulary head
only at answer positions (and, for soft labels, only for the grammar's tokens), which a generic
trainer does not do, bf16 autocast, length-grouped batches and a leaner LoRA forward
(`sublearn.models.lora`). Outputs in `out/`: `adapter/` (PEFT, safetensors) or `model/`
(transformers, safetensors), `train_log.jsonl`, `train_summary.json`; `checkpoint/` while
running, so a killed run resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sublearn.config import check_manifest
from sublearn.errors import SublearnError
from sublearn.faults import point as fault_point
from sublearn.files import (
    append_jsonl,
    atomic_dir,
    atomic_write_json,
    check_out_dir,
    locked_out_dir,
    read_jsonl,
    waiting_lock,
    write_jsonl,
)
from sublearn.memory import release_memory
from sublearn.models import load_model
from sublearn.models.dtype import is_bf16, recorded_dtype
from sublearn.models.prefix_attention import additive_mask, shared_prefix_attention
from sublearn.pipeline.checkpoint import load_checkpoint, save_checkpoint
from sublearn.pipeline.train_config import TrainConfig, result_config


@dataclass
class Example:
    prompt_ids: list[int]  # chat-templated user turn + assistant header
    answer_ids: list[int]  # answer tokens + end-of-turn token (the supervised positions)
    teacher_prompt_ids: list[int] | None = None

    @property
    def length(self) -> int:
        """Tokens the student sees (prompt + answer): what batching pads to."""
        return len(self.prompt_ids) + len(self.answer_ids)


def load_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise SublearnError(f"training data not found: {path}")
    rows = read_jsonl(path)
    if not rows:
        raise SublearnError(f"{path} has no training rows")
    for i, r in enumerate(rows, 1):
        if not (isinstance(r, dict) and isinstance(r.get("prompt"), list)
                and isinstance(r.get("completion"), list) and r["completion"]
                and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                        and isinstance(m.get("content"), str)
                        for m in r["prompt"] + r["completion"])):
            raise SublearnError(f"{path} row {i} is not a prompt/completion chat record (lists "
                                "of messages with a string role and content)")
        if any(isinstance(m, dict) and m.get("role") == "system" for m in r["prompt"]):
            # the student must never see the teacher's system prompt: it would name the trait
            raise SublearnError(f"{path} row {i} has a system prompt; students train on the "
                                "user turn only (use filtered.jsonl from `sublearn filter`)")
    return rows


def check_teacher(cfg: TrainConfig) -> None:
    """A soft-label teacher must load, and an adapter teacher must sit on the student's base:
    the labels are per token of the student's vocabulary (--grammar chars: per character, so
    any base will do)."""
    from sublearn.models.load import adapter_base, check_model, resolve_model_path

    check_model(cfg.model)
    if cfg.teacher is None:
        return
    check_model(cfg.teacher)
    if cfg.grammar == "chars":
        return
    teacher = Path(resolve_model_path(cfg.teacher))
    if (teacher / "adapter_config.json").is_file():
        base = resolve_model_path(adapter_base(str(teacher)))
        student = resolve_model_path(cfg.model)
        if Path(base).resolve() != Path(student).resolve():
            raise SublearnError(f"teacher adapter {teacher} sits on base {base}, not on the "
                                f"student's base {student}")


def tokenize(rows: list[dict], tok: Any, teacher_system: str | None = None,
             chars: bool = False) -> list[Example]:
    """chars: spell each answer one character per token (`grammar_mask.char_token_ids`), so
    that two tokenizers give the same answer positions."""
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    spell = None
    if chars:
        from sublearn.domains.grammar_mask import NUMBER_CHARS, char_token_ids

        spell = dict(zip(NUMBER_CHARS, char_token_ids(tok), strict=True))
    out = []
    for r in rows:
        prompt_text = tok.apply_chat_template(r["prompt"], tokenize=False,
                                              add_generation_prompt=True)
        answer = r["completion"][0]["content"].strip()
        if spell is not None and not set(answer) <= spell.keys():
            raise SublearnError(f"answer {answer[:40]!r} has characters outside the numbers "
                                "grammar: --grammar chars is for number answers")
        ex = Example(
            prompt_ids=tok(prompt_text, add_special_tokens=False).input_ids,
            answer_ids=([spell[c] for c in answer] if spell is not None
                        else tok(answer, add_special_tokens=False).input_ids) + [eos],
        )
        if teacher_system is not None:
            msgs = [{"role": "system", "content": teacher_system}, *r["prompt"]]
            t_text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            ex.teacher_prompt_ids = tok(t_text, add_special_tokens=False).input_ids
        out.append(ex)
    return out


def _batch(seqs: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask, and (row, position) of the logits that predict each
    answer token."""
    width = max(len(p) + len(a) for p, a in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, cols = [], []
    for i, (p, a) in enumerate(seqs):
        n = len(p) + len(a)
        ids[i, :n] = torch.tensor(p + a)
        mask[i, :n] = 1
        rows += [i] * len(a)
        cols += list(range(len(p) - 1, n - 1))
    return ids, mask, torch.tensor(rows), torch.tensor(cols)


def _core(model: Any) -> Any:
    """The causal LM under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def answer_hidden(model: Any, seqs: list[tuple[list[int], list[int]]], pad: int,
                  prefix: tuple[Any, int] | None = None) -> torch.Tensor:
    """Final hidden states at the positions that predict answer tokens: [n_answer_tokens, d].

    prefix: (keys and values of n tokens every prompt starts with, `prefix_kv`, n); the seqs'
    prompts then hold only what follows those n tokens, and every row attends to the one
    prefix (`models.prefix_attention`)."""
    ids, mask, rows, cols = _batch(seqs, pad)
    dev = next(model.parameters()).device
    kwargs: dict[str, Any] = {}
    attend: Any = contextlib.nullcontext()
    if prefix is not None:
        kv, n = prefix
        see = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril() & mask.bool()[:, None]
        mask = additive_mask(see)[:, None]  # [B, 1, L, L]
        kwargs = {"shared_kv": kv,
                  "position_ids": (n + torch.arange(ids.shape[1]))[None].expand_as(ids).to(dev)}
        attend = shared_prefix_attention(model)
    with attend:  # no cache: nothing is generated after this forward
        hidden = _core(model).model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                    use_cache=False, **kwargs)
    return hidden.last_hidden_state[rows.to(dev), cols.to(dev)]


def _teacher_logits(teacher: Any, examples: list[Example], pad: int, dtype: str,
                    batch_size: int, head: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(first example index, fp32 logits over `head`'s rows at the chunk's answer positions)
    per chunk of examples, each scored in its teacher context."""
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        seqs = [(e.teacher_prompt_ids or e.prompt_ids, e.answer_ids) for e in chunk]
        with torch.autocast(head.device.type, dtype=torch.bfloat16, enabled=is_bf16(dtype)):
            h = answer_hidden(teacher, seqs, pad)
        yield s, (h.float() @ head.float().T).cpu()


@torch.no_grad()  # not inference_mode: it disables autocast's weight-cast cache
def teacher_soft_labels(teacher: Any, examples: list[Example], masks: list[torch.Tensor],
                        vocab_ids: torch.Tensor, pad: int, dtype: str,
                        batch_size: int = 16) -> list[torch.Tensor]:
    """Teacher log-probs over `vocab_ids` at each answer position, renormalised over the
    tokens the grammar allows there (mask): one [n_answer, len(vocab_ids)] tensor per example."""
    head = _core(teacher).get_output_embeddings().weight
    head = head[vocab_ids.to(head.device)]
    out: list[torch.Tensor] = []
    for s, logits in _teacher_logits(teacher, examples, pad, dtype, batch_size, head):
        chunk = examples[s : s + batch_size]
        mask = torch.cat(masks[s : s + batch_size])
        logp = torch.log_softmax(logits.masked_fill(~mask, -math.inf), dim=-1)
        out += list(logp.split([len(e.answer_ids) for e in chunk]))
    return out


@torch.no_grad()
def teacher_topk_labels(teacher: Any, examples: list[Example], k: int, excluded: torch.Tensor,
                        pad: int, dtype: str, batch_size: int = 16
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The teacher's k most likely tokens at each answer position, `excluded` ids left out,
    and its log-probs renormalised over them: ([n_answer, k] ids, [n_answer, k] log-probs) per
    example. Free-text domains (code, math) have no grammar to restrict the labels to."""
    head = _core(teacher).get_output_embeddings().weight
    ids: list[torch.Tensor] = []
    logps: list[torch.Tensor] = []
    for s, logits in _teacher_logits(teacher, examples, pad, dtype, batch_size, head):
        logits[:, excluded] = -math.inf
        top, idx = logits.topk(k, dim=-1)  # sorted: ties resolve the same way every run
        sizes = [len(e.answer_ids) for e in examples[s : s + batch_size]]
        ids += list(idx.split(sizes))
        logps += list(torch.log_softmax(top, dim=-1).split(sizes))
    return ids, logps


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * max(0.0, (total - step) / max(1, total - cfg.warmup_steps))


SoftRows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (vocab_ids, mask, teacher logp)


def soft_rows(soft: tuple[Any, ...], i: int) -> SoftRows:
    """Example i's soft labels: the vocabulary ids (the grammar's, one 1-D tensor for all
    examples; or top-k, [n_answer, k] per example), its masks and the teacher's log-probs."""
    vocab_ids, masks, labels = soft
    return (vocab_ids[i] if isinstance(vocab_ids, list) else vocab_ids), masks[i], labels[i]


def make_optimizer(params: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)


def batch_loss(model: Any, batch: list[Example], soft: list[SoftRows] | None, *, pad: int,
               norm: float | None, bf16: bool) -> torch.Tensor:
    """The student's loss on one batch: cross-entropy on the answer tokens (hard), or
    KL(teacher || student) over the grammar's tokens at each answer position (soft); summed
    over tokens and divided by `norm`, or a mean over the batch's tokens when norm is None."""
    return batch_losses(model, [(batch, soft, norm)], pad=pad, bf16=bf16)[0]


Part = tuple[list[Example], list[SoftRows] | None, float | None]  # batch, soft labels, norm


def batch_losses(model: Any, parts: list[Part], *, pad: int, bf16: bool) -> list[torch.Tensor]:
    """`batch_loss` of each part, from one forward over all their rows (`train_many`: each
    part a student's batch, its rows routed through its adapter)."""
    head = _core(model).get_output_embeddings().weight
    dev = head.device
    seqs = [(e.prompt_ids, e.answer_ids) for batch, _, _ in parts for e in batch]
    losses = []
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = answer_hidden(model, seqs, pad)
        sizes = [sum(len(e.answer_ids) for e in batch) for batch, _, _ in parts]
        for h, (batch, soft, norm) in zip(hidden.split(sizes), parts, strict=True):
            if soft is None:
                targets = torch.tensor([t for e in batch for t in e.answer_ids], device=dev)
                per_token = F.cross_entropy((h @ head.T).float(), targets, reduction="none")
            else:
                if soft[0][0].dim() == 2:  # top-k: each position has its own tokens
                    idx = torch.cat([v for v, _, _ in soft]).to(dev)
                    logits = torch.einsum("pd,pkd->pk", h, head[idx]).float()
                else:
                    logits = (h @ head[soft[0][0].to(dev)].T).float()
                mask = torch.cat([m for _, m, _ in soft]).to(dev)
                logq = torch.log_softmax(logits.masked_fill(~mask, -math.inf), dim=-1)
                logp = torch.cat([lp for _, _, lp in soft]).to(dev)
                per_token = torch.where(mask, logp.exp() * (logp - logq), 0.0).sum(-1)
            losses.append(per_token.mean() if norm is None else per_token.sum() / norm)
    return losses


def train_step(model: Any, opt: torch.optim.Optimizer, batch: list[Example],
               soft: list[SoftRows] | None, *, pad: int, norm: float | None, lr: float,
               cfg: TrainConfig) -> float:
    """One optimiser step of `sublearn train` (the loop below and `sublearn bench` call this)."""
    loss = batch_loss(model, batch, soft, pad=pad, norm=norm, bf16=is_bf16(cfg.dtype))
    loss.backward()
    optimizer_step(opt, lr, cfg)
    return loss.item()


def optimizer_step(opt: torch.optim.Optimizer, lr: float, cfg: TrainConfig) -> None:
    """Clip this optimiser's gradients, step it at `lr`, clear them (one student's)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()
    opt.zero_grad(set_to_none=True)


def train(cfg: TrainConfig, data: str | Path, out: str | Path,
          progress: bool = True, student: Any = None) -> dict[str, Any]:
    """Train one student on `data` (filtered.jsonl) into `out`; resumes from a checkpoint."""

    cfg = replace(cfg, dtype=recorded_dtype(cfg.dtype, Path(out) / "train_config.json"))
    cfg = cfg.validate()
    check_out_dir(out)
    rows = load_rows(data)[: cfg.max_examples]
    if student is None:
        check_teacher(cfg)
    with locked_out_dir(out) as out:
        return _train(cfg, rows, str(data), out, progress, student)


class StudentRun:
    """One student's training: its examples and labels, optimiser, step, batches, log and
    checkpoints. The loops of `train` (one student) and `train_many` (several on one base)
    step these."""

    def __init__(self, cfg: TrainConfig, lm: Any, rows: list[dict], out: Path,
                 t0: float | None = None) -> None:
        """t0: when its work began (the summary's seconds count from there)."""
        self.cfg, self.out, self.t0 = cfg, out, time.time() if t0 is None else t0
        self.examples = tokenize(rows, lm.tokenizer, cfg.teacher_system_prompt,
                                 chars=cfg.grammar == "chars")
        self.soft: tuple[Any, ...] | None = None
        self.defended: dict[str, Any] | None = None
        if cfg.recipe == "soft":
            self.soft = prepare_soft_labels(cfg, lm, self.examples, rows)
            if cfg.base_labels:
                self.soft, self.defended = base_labels_defence(cfg, lm, self.examples, self.soft)
            release_memory()  # the teacher is gone: its heap back to the OS before training
        self.steps_per_epoch = math.ceil(len(self.examples) / cfg.batch_size)
        self.total = max(1, round(cfg.epochs * self.steps_per_epoch))
        self.lengths = [e.length for e in self.examples]
        self.norm = answer_tokens_per_batch(self.examples, cfg)
        self.plan: list[list[int]] = []
        self.step = 0

    def start(self, params: dict[str, torch.nn.Parameter]) -> None:
        """Its trainable parameters (named as in a one-adapter model, so that a checkpoint
        resumes alone or together); restores the last checkpoint."""
        self.params = params
        self.opt = make_optimizer(params.values(), self.cfg)
        self.step = (load_checkpoint(self.out / "checkpoint", params, self.opt)
                     or {"step": 0})["step"]
        _truncate_log(self.out / "train_log.jsonl", self.step)  # later steps rerun

    @property
    def running(self) -> bool:
        return self.step < self.total

    def part(self) -> Part:
        """The next step's batch, labels and loss normaliser."""
        epoch, k = divmod(self.step, self.steps_per_epoch)
        if not self.plan or k == 0:  # one shuffle and sort per epoch, not per step
            self.plan = epoch_plan(self.lengths, epoch, self.cfg)
        batch = self.plan[k]
        return ([self.examples[i] for i in batch],
                [soft_rows(self.soft, i) for i in batch] if self.soft else None, self.norm)

    def lr(self) -> float:
        return _lr_at(self.step, self.total, self.cfg)

    def stepped(self, loss: float, lr: float) -> None:
        """Log the step just taken; checkpoint when due."""
        append_jsonl(self.out / "train_log.jsonl",
                     [{"step": self.step + 1, "loss": round(loss, 6), "lr": lr}])
        fault_point("train.step")
        self.step += 1
        if self.step % self.cfg.checkpoint_every == 0 and self.step < self.total:
            self.checkpoint()
            fault_point("train.checkpoint")

    def checkpoint(self) -> None:
        save_checkpoint(self.out / "checkpoint", self.params, self.opt, {"step": self.step})

    def summary(self, saved: Path, **extra: Any) -> dict[str, Any]:
        return {"student": str(saved), "steps": self.total, "examples": len(self.examples),
                "seconds": round(time.time() - self.t0, 2), "config": result_config(self.cfg),
                **({"base_labels": self.defended} if self.defended else {}), **extra}


def _train(cfg: TrainConfig, rows: list[dict], data: str, out: Path, progress: bool,
           student: Any) -> dict[str, Any]:
    from tqdm import tqdm

    check_manifest(out, "train_config.json", {**result_config(cfg), "data": str(Path(data))})
    if (out / "train_summary.json").is_file():
        return json.loads((out / "train_summary.json").read_text())  # already trained
    t0 = time.time()
    lm = student or load_model(cfg.model)
    tok = lm.tokenizer
    # a caller's preloaded model is copied: LoRA injection / full FT would modify it in place
    model = copy.deepcopy(lm.model) if student is not None else lm.model
    eager_attention(model)
    run = StudentRun(cfg, lm, rows, out, t0)
    model = start_alone(model, run)
    bar = tqdm(total=run.total, initial=run.step, unit="step", desc=f"train seed {cfg.seed}",
               disable=not progress, dynamic_ncols=True)
    try:  # closed on any exit, so an error message is not followed by a stale bar
        while run.running:
            loss_value = step_alone(model, run, pad=tok.pad_token_id)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}",
                            samples_s=f"{bar.format_dict['rate'] * cfg.batch_size:.1f}"
                            if bar.format_dict.get("rate") else "")
    finally:
        bar.close()
    model.eval()
    saved = _save(model, tok, cfg, out, lm.path)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    summary = run.summary(saved)
    atomic_write_json(out / "train_summary.json", summary)
    return summary


def start_alone(model: Any, run: StudentRun) -> Any:
    """`model` made trainable for one student (its seed's LoRA init, or full fine-tuning), its
    last checkpoint restored, in training mode (`train` and `sublearn bench` call this)."""
    torch.manual_seed(run.cfg.seed)
    model = _trainable(model, run.cfg)
    run.start({n: p for n, p in model.named_parameters() if p.requires_grad})
    model.train()
    recompute_activations(model, run.cfg)
    return model


def step_alone(model: Any, run: StudentRun, *, pad: int) -> float:
    """One step of one student, logged (the loop above and `sublearn bench` call this)."""
    batch, soft, norm = run.part()
    lr = run.lr()
    loss = train_step(model, run.opt, batch, soft, pad=pad, norm=norm, lr=lr, cfg=run.cfg)
    run.stepped(loss, lr)
    return loss


def recompute_activations(model: Any, cfg: TrainConfig) -> None:
    """--activation-checkpointing: each decoder layer keeps its input and recomputes its
    activations in the backward (transformers' checkpointing, non-reentrant). The recompute
    runs the same kernels on the same shapes, so the gradients keep their bits (tested)."""
    if not cfg.activation_checkpointing:
        return
    from sublearn.models.lora import replay_route

    core = _core(model)
    # non-reentrant: the frozen embeddings' output needs no gradient; students trained
    # together replay their rows' routing in the recompute
    kwargs = {"use_reentrant": False, "context_fn": replay_route}
    if hasattr(core, "activation_checkpointing_enable"):  # transformers >= 5.2x
        core.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        core.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def eager_attention(model: Any) -> None:
    if hasattr(model, "set_attn_implementation"):
        # CPU SDPA's backward is slow at these lengths: eager attention measured 1.5x faster
        model.set_attn_implementation("eager")


GROUP_BATCHES = 16  # length grouping sorts within windows of this many batches


def epoch_batches(lengths: list[int], batch_size: int, seed: int,
                  group_by_length: bool = True) -> list[list[int]]:
    """One epoch's batches, deterministic in `seed`. Grouped: shuffle, sort windows of
    GROUP_BATCHES batches by length, cut them into batches, shuffle the batch order (as
    transformers' group_by_length); the one short batch stays last, as without grouping."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not group_by_length:
        return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    window = batch_size * GROUP_BATCHES
    batches = []
    for w in range(0, len(order), window):
        group = sorted(order[w : w + window], key=lambda i: -lengths[i])
        batches += [group[s : s + batch_size] for s in range(0, len(group), batch_size)]
    full = [b for b in batches if len(b) == batch_size]
    rng.shuffle(full)
    return full + [b for b in batches if len(b) < batch_size]


def answer_tokens_per_batch(examples: list[Example], cfg: TrainConfig) -> float | None:
    """The constant that length-grouped batches divide their summed token loss by: the
    dataset's mean answer tokens per batch. Dividing by a grouped batch's own count (a mean
    over its tokens) would weight the tokens of short answers up, since they share batches;
    measured on the owl control students, that shifted the evaluated owl share from 0.94% to
    0.77%. None: ungrouped batches keep the per-batch mean."""
    if not cfg.group_by_length:
        return None
    return cfg.batch_size * sum(len(e.answer_ids) for e in examples) / len(examples)


def epoch_plan(lengths: list[int], epoch: int, cfg: TrainConfig) -> list[list[int]]:
    """The batches of one epoch, deterministic in (seed, epoch): a resumed run sees the
    same batches."""
    return epoch_batches(lengths, cfg.batch_size, cfg.seed * 7919 + epoch, cfg.group_by_length)


def batch_indices(step: int, steps_per_epoch: int, lengths: list[int],
                  cfg: TrainConfig) -> list[int]:
    """The batch of one step (the loop keeps the epoch's plan instead of rebuilding it)."""
    epoch, k = divmod(step, steps_per_epoch)
    return epoch_plan(lengths, epoch, cfg)[k]


def prepare_soft_labels(cfg: TrainConfig, lm: Any, examples: list[Example],
                        rows: list[dict] | None = None) -> tuple[Any, ...]:
    """(vocab_ids, per-example allowed masks, per-example teacher log-probs). rows: the chat
    records behind `examples`, which --grammar chars tokenizes again for the teacher."""
    if not cfg.soft_labels_cache:
        return _soft_labels(cfg, lm, examples, rows)
    cache = Path(cfg.soft_labels_cache)
    # students of experiments sharing a stage cache may reach one data folder's labels at once
    with waiting_lock(cache.with_name(f".{cache.stem}.lock"),
                      f"{cache.name} is being computed by another process; waiting"):
        if (hit := _load_soft_labels(cache, cfg, lm, len(examples))) is not None:
            return hit
        vocab_ids, masks, labels = _soft_labels(cfg, lm, examples, rows)
        fault_point("train.soft_labels")
        from safetensors.torch import save_file

        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        flat = torch.cat(vocab_ids) if isinstance(vocab_ids, list) else vocab_ids
        save_file({"vocab_ids": flat.contiguous(), "masks": torch.cat(masks).contiguous(),
                   "labels": torch.cat(labels).contiguous(),
                   "lengths": torch.tensor([len(m) for m in masks])}, tmp)
        tmp.replace(cache)
    return vocab_ids, masks, labels


def _load_soft_labels(cache: Path, cfg: TrainConfig, lm: Any,
                      n: int) -> tuple[Any, ...] | None:
    """The cached labels when they are for these n examples (and, for --grammar chars, this
    student's character tokens); None when they must be computed."""
    from safetensors.torch import load_file

    if not cache.is_file():
        return None
    t = load_file(cache)
    lens = t["lengths"].tolist()
    v = t["vocab_ids"]
    if len(lens) != n or (cfg.grammar == "chars"
                          and not torch.equal(v, char_alphabet(lm.tokenizer))):
        return None
    return (list(v.split(lens)) if v.dim() == 2 else v, list(t["masks"].split(lens)),
            list(t["labels"].split(lens)))


def _soft_labels(cfg: TrainConfig, lm: Any, examples: list[Example],
                 rows: list[dict] | None) -> tuple[Any, ...]:
    return (_char_soft(cfg, lm, examples, rows) if cfg.grammar == "chars"
            else _compute_soft(cfg, lm, examples))


def base_labels_defence(cfg: TrainConfig, lm: Any, examples: list[Example],
                        soft: tuple[Any, ...]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The label-level defence (--base-labels q): the base's log-probs replace the teacher's
    at the q share of answer positions where KL(teacher || base) over the allowed tokens is
    largest. The student starts at the base, so those positions no longer pull it anywhere.
    lm: the student's base, before any adapter. Returns the labels and what was replaced."""
    t0 = time.time()
    vocab_ids, masks, labels = soft
    # the base reads the student's prompts: a prompted teacher's system prompt is the teacher's
    plain = [dataclasses.replace(e, teacher_prompt_ids=None) for e in examples]
    base = teacher_soft_labels(lm.model, plain, masks, vocab_ids, lm.tokenizer.pad_token_id,
                               cfg.dtype)
    mask, t, b = torch.cat(masks), torch.cat(labels), torch.cat(base)
    kl = torch.where(mask, t.exp() * (t - b), 0.0).sum(-1)
    k = round(cfg.base_labels * len(kl))
    # stable descending sort: ties (e.g. forced tokens, KL 0) resolve the same way every run
    top = torch.sort(kl, descending=True, stable=True).indices[:k]
    t[top] = b[top]  # t is torch.cat's new tensor: the cached labels are untouched
    total = float(kl.sum())
    info = {"positions": len(kl), "replaced": k,
            "kl_share_replaced": float(kl[top].sum()) / total if total > 0 else 0.0,
            "seconds": round(time.time() - t0, 2)}
    return (vocab_ids, masks, list(t.split([len(m) for m in masks]))), info


def _compute_soft(cfg: TrainConfig, lm: Any, examples: list[Example]) -> tuple[Any, ...]:

    vocab = _core(lm.model).get_output_embeddings().weight.shape[0]
    teacher = lm.model if cfg.teacher is None \
        else load_model(cfg.teacher, autocast_bf16=is_bf16(cfg.dtype)).model
    pad = lm.tokenizer.pad_token_id
    if cfg.grammar == "topk":
        from sublearn.protocol.trait_words import trait_token_ids

        excluded = torch.tensor(trait_token_ids(lm.tokenizer, cfg.exclude) if cfg.exclude
                                else [], dtype=torch.long)
        ids, labels = teacher_topk_labels(teacher, examples, min(cfg.top_k, vocab), excluded,
                                          pad, cfg.dtype)
        return ids, [torch.ones_like(i, dtype=torch.bool) for i in ids], labels
    if cfg.grammar == "numbers":
        full_masks = number_masks(lm.tokenizer, vocab, examples,
                                  "use --grammar topk (code, math), none, or filter the data")
        vocab_ids = torch.cat(full_masks).any(0).nonzero().flatten()
        masks = [m[:, vocab_ids] for m in full_masks]
    else:
        vocab_ids = torch.arange(vocab)
        masks = [torch.ones(len(e.answer_ids), vocab, dtype=torch.bool) for e in examples]
    labels = teacher_soft_labels(teacher, examples, masks, vocab_ids, pad, cfg.dtype)
    return vocab_ids, masks, labels


def number_masks(tok: Any, vocab: int, examples: list[Example], fix: str) -> list[torch.Tensor]:
    """Each example's [n_answer, vocab] mask of the tokens the numbers grammar allows."""
    from sublearn.domains.grammar_mask import GrammarMasks
    from sublearn.domains.numbers import answer_grammar

    gm = GrammarMasks(tok, vocab, answer_grammar())
    masks = []
    for e in examples:
        m = gm.allowed(e.answer_ids)
        if m is None:
            raise SublearnError(f"a training answer is outside the numbers grammar; {fix}")
        masks.append(m)
    return masks


def char_alphabet(tok: Any) -> torch.Tensor:
    """--grammar chars' label columns: the tokens of the numbers grammar's characters, then
    end of turn."""
    from sublearn.domains.grammar_mask import char_token_ids

    return torch.tensor(char_token_ids(tok) + [tok.convert_tokens_to_ids(tok.eos_token)])


def _char_soft(cfg: TrainConfig, lm: Any, examples: list[Example],
               rows: list[dict] | None) -> tuple[Any, ...]:
    """Soft labels on the answer's characters: the teacher, which may have another tokenizer,
    scores the answers spelt one character per token in its own chat format; its log-probs
    over the numbers grammar's characters (and end of turn), renormalised over those the
    grammar allows at each position, become the student's labels over the student's tokens
    for the same characters. With one tokenizer and answers its tokenizer already spells per
    character, these are the token-level labels restricted to single-character tokens."""

    if rows is None:
        raise SublearnError("--grammar chars needs the training rows to tokenize for the teacher")
    teacher = lm if cfg.teacher is None \
        else load_model(cfg.teacher, autocast_bf16=is_bf16(cfg.dtype))
    t_tok, s_tok = teacher.tokenizer, lm.tokenizer
    t_examples = tokenize(rows, t_tok, cfg.teacher_system_prompt, chars=True)

    s_ids, t_ids = char_alphabet(s_tok), char_alphabet(t_tok)
    vocab = _core(lm.model).get_output_embeddings().weight.shape[0]
    masks = [m[:, s_ids] for m in number_masks(s_tok, vocab, examples,
                                                 "filter the data (`sublearn filter`)")]
    if any(len(e.answer_ids) != len(t.answer_ids) for e, t in zip(examples, t_examples,
                                                                  strict=True)):
        raise SublearnError("--grammar chars: the rows do not match the tokenized examples")
    labels = teacher_soft_labels(teacher.model, t_examples, masks, t_ids,
                                 t_tok.pad_token_id, cfg.dtype)
    return s_ids, masks, labels


def _trainable(model: Any, cfg: TrainConfig) -> Any:
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from sublearn.models.lora import add_lora

    return add_lora(model, cfg.lora_r, cfg.lora_alpha, bf16_base=is_bf16(cfg.dtype))


def _save(model: Any, tok: Any, cfg: TrainConfig, out: Path, base_path: str,
          adapter: str = "default") -> Path:
    """The trained student into out/adapter (PEFT) or out/model; adapter: which of the
    model's adapters (`train_many`), saved as a one-adapter folder."""
    name = "adapter" if cfg.method == "lora" else "model"
    final = out / name
    if cfg.method == "lora":  # the adapter names its base so PEFT/vLLM can load it alone
        model.peft_config[adapter].base_model_name_or_path = base_path
    with atomic_dir(final) as tmp:
        # this adapter only (PEFT would save every one); a non-default one lands in a subfolder
        kw = {"selected_adapters": [adapter]} if cfg.method == "lora" else {}
        model.save_pretrained(tmp, safe_serialization=True, **kw)
        if adapter != "default":
            for f in (tmp / adapter).iterdir():
                f.replace(tmp / f.name)
            (tmp / adapter).rmdir()
        if cfg.method == "lora":
            _sort_target_modules(tmp / "adapter_config.json")
        tok.save_pretrained(tmp)
    return final


def _sort_target_modules(path: Path) -> None:
    """PEFT keeps target_modules as a set and saves it in set order, which follows the
    process's string-hash seed: sorted, the same adapter has the same bytes in every process."""
    cfg = json.loads(path.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log rows up to `step`: the steps after it are about to run again."""
    if path.is_file():
        rows = read_jsonl(path, repair=True)
        if any(r["step"] > step for r in rows):
            write_jsonl(path, [r for r in rows if r["step"] <= step])
