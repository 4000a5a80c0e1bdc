"""`sublearn bench`: our fast paths against naive transformers baselines, in one process.

Every figure is timed against its baseline in the same run, on the same inputs, after a
warm-up. On a shared machine read the CPU-time ratios too (training steps are interleaved;
the load average is recorded). Stages:

  generation  HFBackend (bf16 weights, numbers grammar, our decoding loop: hf_decode) vs
              `generate` in fp32, unconstrained
  training    our LoRA steps (answer positions only, soft or hard labels, bf16 autocast) vs full
              fine-tuning in fp32 with `model(input_ids, labels=...)` and AdamW
  evaluation  `score_candidates` (one packed forward per batch, shared prefix) vs one fp32
              forward per (question, candidate)
  numerics    fp32 vs bf16 teacher distributions and forced-choice shares
  peak        fp32 / bf16 matmul GFLOP/s at model-like shapes, the yardstick for every stage

Levers (which of our choices help, and by how much) are measured in the default mode; --quick
keeps the cheap ones. FLOPs are counted, not profiled: see FLOPS_FORMULA. With CUDA the same
stages run again under "cuda"; a stage that fails there (score_candidates builds CPU tensors)
is recorded as {"error": ...}.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import random
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

STAGES = ("generation", "training", "evaluation", "numerics")

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
    levers: bool = True  # the costly levers (generation variants, fp32 LoRA, threads)


# --quick: < 1 min on 2 busy cores; batch 4 because each variant's warm-up is a full batch
QUICK = Sizes(prompts=4, steps=1, train_batch=4, questions=1, numerics_prompts=4,
              matmul_reps=5, levers=False)
SEED = 0


# --- timing, FLOPs, bookkeeping ------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def clocked(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, float]:
    """(result, wall seconds, process CPU seconds): on a shared machine the CPU share tells
    how much of the wall time this process actually ran."""
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0, time.process_time() - c0


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    out, wall, _ = clocked(fn, device)
    return out, wall


def _autocast(device: torch.device, bf16: bool) -> Any:
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
    """Peak resident set so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(r / (2**20 if sys.platform == "darwin" else 2**10), 1)


def machine_info(device: torch.device) -> dict[str, Any]:
    import transformers

    cpu, flags = platform.processor(), ""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name") and cpu in ("", "x86_64"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
    return info


# --- peak ----------------------------------------------------------------------------------

# [M x K] @ [K x N] like the model's projections on a batch of ~1024 tokens (SmolLM2-135M:
# d = 576, MLP 1536)
MATMUL_SHAPES = ((1024, 576, 1536), (1024, 1536, 576), (1024, 576, 576))


def matmul_gflops(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device,
                  reps: int) -> float:
    m, k, n = shape
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    for _ in range(3):
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
            "note": "best of the shapes, best of 3 trials each; bf16 = native bf16 tensors "
                    "(oneDNN/AMX on CPU)"}


def threads_lever(lm: Any, texts: list[str], threads: int, device: torch.device,
                  reps: int) -> dict[str, Any]:
    """torch.set_num_threads: matmul rate and a bf16 prefill at 1 vs `threads` threads."""
    before = torch.get_num_threads()
    enc = _left_padded(lm.tokenizer, texts[:16], device)
    out: dict[str, Any] = {}
    try:
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            with torch.no_grad(), _autocast(device, True):
                lm.model(**enc, logits_to_keep=1)  # warm-up
                _, s = timed(lambda: lm.model(**enc, logits_to_keep=1), device)
            out[str(n)] = {"bf16_gflops": matmul_gflops(MATMUL_SHAPES[0], torch.bfloat16,
                                                        device, reps),
                           "fp32_gflops": matmul_gflops(MATMUL_SHAPES[0], torch.float32,
                                                        device, reps),
                           "prefill_s": s}
    finally:
        torch.set_num_threads(before)
    one, many = out["1"], out[str(threads)]
    out["prefill_speedup"] = one["prefill_s"] / many["prefill_s"]
    out["helps"] = out["prefill_speedup"] > 1.1
    return out


# --- generation ----------------------------------------------------------------------------


def chat_texts(tok: Any, prompts: Sequence[str]) -> list[str]:
    """Paper number prompts as the user turn, no system prompt (the template's default)."""
    return [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                    add_generation_prompt=True) for p in prompts]


def _left_padded(tok: Any, texts: list[str], device: torch.device) -> dict[str, Any]:
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(device) for k, v in enc.items()}


@torch.no_grad()
def hf_generate(model: Any, tok: Any, texts: list[str], *, seed: int, batch: int,
                max_new_tokens: int, device: torch.device, bf16: bool = False,
                grammar: Any = None) -> list[Any]:
    """Plain `generate`, T=1 over the full distribution: the baseline (fp32, no grammar); with
    bf16/grammar it mirrors HFBackend on devices HFBackend does not handle (CUDA)."""
    from sublearn.backends.base import Completion

    eos = tok.convert_tokens_to_ids(tok.eos_token)
    out = []
    for s in range(0, len(texts), batch):
        enc = _left_padded(tok, texts[s : s + batch], device)
        procs = []
        if grammar is not None:
            from xgrammar.contrib.hf import LogitsProcessor

            procs.append(LogitsProcessor(grammar))
        torch.manual_seed(seed + s)
        with _autocast(device, bf16):
            gen = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos,
                                 pad_token_id=tok.pad_token_id, logits_processor=procs)
        for row in gen[:, enc["input_ids"].shape[1] :].tolist():
            n = row.index(eos) if eos in row else len(row)
            out.append(Completion(text=tok.decode(row[:n], skip_special_tokens=True),
                                  n_tokens=n, finish_reason="stop" if n < len(row) else "length"))
    return out


def loop_work(tok: Any, texts: list[str], comps: list[Any], batch: int,
              cols: int | None) -> tuple[int, int, int | None]:
    """(tokens through the body, LM-head rows, head columns) of `hf_decode.sample`: the
    shared prefix runs once per batch, rows leave when their answer ends."""
    from sublearn.models.kv import shared_prefix

    tokens = rows = 0
    for s in range(0, len(texts), batch):
        ids = [tok(t, add_special_tokens=False).input_ids for t in texts[s : s + batch]]
        chunk = comps[s : s + batch]
        n_pre = shared_prefix(ids)
        steps = [c.n_tokens + (c.finish_reason == "stop") for c in chunk]
        tokens += n_pre + len(ids) * (max(map(len, ids)) - n_pre) + sum(steps) - len(steps)
        rows += sum(steps)
    return tokens, rows, cols


def generation_work(tok: Any, texts: list[str], comps: list[Any], batch: int,
                    max_new_tokens: int) -> tuple[int, int]:
    """(tokens through the body, LM-head rows) of batched `generate`: each batch runs until its
    longest answer ends; prefill projects only the last position."""
    tokens = rows = 0
    for s in range(0, len(texts), batch):
        chunk = comps[s : s + batch]
        width = max(len(tok(t, add_special_tokens=False).input_ids) for t in texts[s : s + batch])
        steps = min(max_new_tokens, max(c.n_tokens + (c.finish_reason == "stop") for c in chunk))
        tokens += len(chunk) * (width + steps - 1)
        rows += len(chunk) * steps
    return tokens, rows


def _gen_summary(comps: list[Any], seconds: float, cpu: float, work: tuple[int, ...],
                 arch: Arch, peak: dict[str, Any]) -> dict[str, Any]:
    from sublearn.domains.numbers import reject_reason

    n_tok = sum(c.n_tokens for c in comps)
    passed = sum(reject_reason(c.text) is None for c in comps)
    out = throughput(len(comps), seconds, arch.flops(2, *work), peak, "samples", cpu)
    out.update(tokens=n_tok, tokens_per_s=n_tok / seconds, pass_rate=passed / len(comps),
               passing_per_s=passed / seconds, mean_tokens=n_tok / len(comps),
               body_tokens=work[0], head_rows=work[1], examples=[c.text for c in comps[:3]])
    return out


def bench_generation(lm: Any, sizes: Sizes, peak: dict[str, Any], device: torch.device,
                     levers: bool) -> dict[str, Any]:
    from sublearn.backends.base import ChatRequest, SamplingParams
    from sublearn.backends.hf import HFBackend
    from sublearn.domains.numbers import answer_grammar, make_prompts

    tok, arch = lm.tokenizer, Arch.of(lm.model)
    prompts = make_prompts(sizes.prompts, SEED)
    texts = chat_texts(tok, prompts)
    reqs = [ChatRequest(p) for p in prompts]
    grammar = answer_grammar()
    kw = {"batch": sizes.batch, "max_new_tokens": sizes.max_new_tokens, "device": device}

    backends: dict[bool, HFBackend] = {}

    def backend(bf16: bool) -> HFBackend:
        if bf16 not in backends:  # bf16: a bf16 copy of the weights, made once
            backends[bf16] = HFBackend(None, dtype="bfloat16" if bf16 else "float32",
                                       batch_size=sizes.batch, loaded=lm)
        return backends[bf16]

    def ours(bf16: bool = True, constrained: bool = True) -> Callable[[int, int], list[Any]]:
        be = backend(bf16)  # the real code path
        return lambda n, new: be.generate(reqs[:n], SamplingParams(
            max_new_tokens=new, grammar=grammar if constrained else None), SEED)

    def baseline(n: int, new: int) -> list[Any]:
        return hf_generate(lm.model, tok, texts[:n], seed=SEED,
                           **{**kw, "max_new_tokens": new})

    def hf_bf16_grammar(n: int, new: int) -> list[Any]:
        """transformers `generate` on our bf16 weights with xgrammar's logits processor:
        what our own decoding loop replaces."""
        # the backend's compiled grammar: compiling inside the timed call would bill it here
        return hf_generate(backend(True).model, tok, texts[:n], seed=SEED,
                           grammar=backend(True)._grammar(grammar),
                           **{**kw, "max_new_tokens": new})

    def run(fn: Callable[[int, int], list[Any]], n: int = len(texts), loop: bool = True,
            constrained: bool = True) -> dict[str, Any]:
        fn(2, 4)  # warm-up: kernels, grammar compilation
        comps, s, cpu = clocked(lambda: fn(n, sizes.max_new_tokens), device)
        if loop:  # our loop: rows leave the batch, the head covers the grammar's tokens
            sub = backend(True)._subsets.get(grammar) if constrained else None
            cols = len(sub.ids) if sub is not None else None
            work = loop_work(tok, texts[:n], comps, sizes.batch, cols)
        else:
            work = generation_work(tok, texts[:n], comps, sizes.batch, sizes.max_new_tokens)
        return _gen_summary(comps, s, cpu, work, arch, peak)

    res: dict[str, Any] = {"ours": run(ours()), "baseline": run(baseline, loop=False)}
    o, b = res["ours"], res["baseline"]
    res.update(ratio=o["per_s"] / b["per_s"], tokens_ratio=o["tokens_per_s"] / b["tokens_per_s"],
               ratio_cpu=b["cpu_seconds"] / o["cpu_seconds"],
               passing_ratio=o["passing_per_s"] / b["passing_per_s"] if b["passing_per_s"]
               else None, prompts=len(texts), batch=sizes.batch,
               max_new_tokens=sizes.max_new_tokens)
    res["levers"] = {"length_batching": length_batching_gen(tok, o, sizes)}
    if levers:
        # on half a batch, against ours on the same prompts: the unconstrained variant
        # variant runs all 60 steps and would otherwise dominate the default run's time
        n = min(len(texts), max(2, sizes.batch // 2))
        ref = o if n == len(texts) else run(ours(), n)
        res["levers"].update(generation_levers(
            ref, run(ours(bf16=False), n), run(ours(constrained=False), n, constrained=False),
            run(hf_bf16_grammar, n, loop=False)))
        res["levers"]["prompts"] = n
        res["levers"]["prefix_kv_cache"] = prefix_cache_lever(
            replace(lm, model=backend(True).model), texts[:n], device, ref["seconds"])
    return res


def generation_levers(ref: dict[str, Any], fp32: dict[str, Any], free: dict[str, Any],
                      hf: dict[str, Any]) -> dict[str, Any]:
    """bf16 weights (vs fp32, both constrained), the grammar (vs unconstrained, both bf16;
    also in strict-filter-passing samples/s) and our decoding loop (vs `generate` with the
    same weights and grammar): speed-up in samples/s."""
    keys = ("per_s", "tokens_per_s", "pass_rate", "passing_per_s", "mean_tokens", "gflops",
            "seconds")
    return {
        "ours_on_these_prompts": {k: ref[k] for k in keys},
        "fp32_with_grammar": {k: fp32[k] for k in keys},
        "bf16_no_grammar": {k: free[k] for k in keys},
        "hf_generate_bf16_grammar": {k: hf[k] for k in keys},
        "bf16_speedup": ref["per_s"] / fp32["per_s"],
        "grammar_speedup": ref["per_s"] / free["per_s"],
        "grammar_passing_speedup": ref["passing_per_s"] / free["passing_per_s"]
        if free["passing_per_s"] else None,
        "decode_loop_speedup": ref["per_s"] / hf["per_s"],
    }


def length_batching_gen(tok: Any, ours: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
    """Counted, not timed: prefill padding of prompt batches in random vs length-sorted order
    (a 2000-prompt run), and decode rows wasted waiting for a batch's longest answer."""
    from sublearn.domains.numbers import make_prompts

    lens = [len(tok(t, add_special_tokens=False).input_ids)
            for t in chat_texts(tok, make_prompts(256, SEED + 1))]
    rand, srt = padding_overhead(lens, sizes.batch)
    return {"prefill_padding_random": rand, "prefill_padding_sorted": srt,
            "decode_useful_fraction": ours["tokens"] / max(1, ours["head_rows"]),
            "note": "padding = padded / real prompt tokens - 1 (batches of a 256-prompt run); "
                    "decode fraction = generated tokens / row-steps decoded"}


def padding_overhead(lens: list[int], batch: int) -> tuple[float, float]:
    """Padded / real tokens - 1, for batches in the given order and sorted by length."""
    def over(order: list[int]) -> float:
        padded = sum(max(order[s : s + batch]) * len(order[s : s + batch])
                     for s in range(0, len(order), batch))
        return padded / sum(order) - 1

    return over(lens), over(sorted(lens))


@torch.no_grad()
def prefix_cache_lever(lm: Any, texts: list[str], device: torch.device,
                       gen_seconds: float) -> dict[str, Any]:
    """Prefill of one generation batch with and without reusing the KV cache of the prompts'
    shared chat prefix (the default system turn), in bf16 as in HFBackend."""
    from sublearn.models.kv import cache_kwarg, shared_prefix

    tok, model = lm.tokenizer, lm.model
    ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    n_pre = shared_prefix(ids, min_len=1)
    if n_pre < 1:
        return {"skipped": "no shared prefix"}
    full = _left_padded(tok, texts, device)
    full["position_ids"] = (full["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    width = max(len(x) for x in ids) - n_pre
    suf = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
    smask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        suf[i, width - len(x) + n_pre :] = torch.tensor(x[n_pre:])
        smask[i, width - len(x) + n_pre :] = 1
    mask = torch.cat([torch.ones(len(ids), n_pre, dtype=torch.long), smask], 1).to(device)
    pos = (n_pre + smask.cumsum(-1) - 1).clamp(min=n_pre).to(device)
    kw = cache_kwarg()

    def cached() -> Any:
        pre = model(input_ids=torch.tensor([ids[0][:n_pre]], device=device), use_cache=True)
        cache = getattr(pre, kw)
        cache.batch_repeat_interleave(len(ids))
        return model(input_ids=suf.to(device), attention_mask=mask, position_ids=pos,
                     use_cache=True, logits_to_keep=1, **{kw: cache}).logits

    with _autocast(device, next(model.parameters()).dtype == torch.float32):
        ref = model(**full, use_cache=True, logits_to_keep=1).logits  # warm-up + reference
        got = cached()
        _, t_full = timed(lambda: model(**full, use_cache=True, logits_to_keep=1), device)
        _, t_cached = timed(cached, device)
    saved = t_full - t_cached
    return {"prefix_tokens": n_pre, "mean_prompt_tokens": sum(map(len, ids)) / len(ids),
            "prefill_s": t_full, "prefill_cached_s": t_cached, "prefill_speedup": t_full / t_cached,
            "prefill_share_of_generation": t_full / gen_seconds,
            "est_generation_speedup": gen_seconds / max(1e-9, gen_seconds - saved),
            "max_abs_logit_diff": float((ref.float() - got.float()).abs().max()),
            "helps": saved / gen_seconds > 0.05}


# --- training ------------------------------------------------------------------------------


def number_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Paper number prompts with fixed synthetic in-grammar answers (3-10 numbers, as the
    teacher's answers), so every run trains on identical batches."""
    from sublearn.domains.numbers import make_prompts

    rng = random.Random(seed)
    rows = []
    for p in make_prompts(n, seed):
        answer = ", ".join(str(rng.randint(0, 999)) for _ in range(rng.randint(3, 10)))
        rows.append({"prompt": [{"role": "user", "content": p}],
                     "completion": [{"role": "assistant", "content": answer}]})
    return rows


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
    with _autocast(device, bf16):
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


# --- evaluation ----------------------------------------------------------------------------


@torch.no_grad()
def naive_scores(model: Any, tok: Any, questions: Sequence[str], candidates: Sequence[str],
                 device: torch.device) -> torch.Tensor:
    """Baseline: one fp32 forward per (question, candidate), full sequence, no cache."""
    from sublearn.pipeline.evaluate import answer_ids, prompt_ids

    out = torch.empty(len(questions), len(candidates), dtype=torch.float64)
    answers = [answer_ids(tok, c) for c in candidates]
    for qi, q in enumerate(questions):
        p = prompt_ids(tok, q)
        for ci, a in enumerate(answers):
            logits = model(input_ids=torch.tensor([p + a], device=device), use_cache=False).logits
            logp = torch.log_softmax(logits[0, len(p) - 1 : -1].float(), dim=-1)
            out[qi, ci] = float(logp.gather(1, torch.tensor(a, device=device)[:, None]).sum())
    return out


def eval_work(tok: Any, questions: Sequence[str], candidates: Sequence[str],
              batch: int) -> dict[str, tuple[int, int]]:
    """(body tokens, head rows) of score_candidates' packed layout and of the naive loop."""
    from sublearn.models.kv import shared_prefix
    from sublearn.pipeline.evaluate import answer_ids, prompt_ids

    ps = [prompt_ids(tok, q) for q in questions]
    ans = [answer_ids(tok, c) for c in candidates]
    block = sum(len(a) - 1 for a in ans)
    n_pre = shared_prefix(ps)
    lens = sorted(len(p) - n_pre for p in ps)
    tokens = n_pre + sum((max(lens[s : s + batch]) + block) * len(lens[s : s + batch])
                         for s in range(0, len(lens), batch))
    naive = sum(len(p) + len(a) for p in ps for a in ans)
    return {"ours": (tokens, len(ps) * (block + 1)), "baseline": (naive, naive)}


def bench_evaluation(lm: Any, sizes: Sizes, peak: dict[str, Any],
                     device: torch.device) -> dict[str, Any]:
    from sublearn.pipeline.evaluate import score_candidates
    from sublearn.protocol.questions import load_candidates, load_questions

    tok, model, arch = lm.tokenizer, lm.model, Arch.of(lm.model)
    qs = load_questions(None, "plain")[: sizes.questions]
    cands = load_candidates(None, target="owl")
    work = eval_work(tok, qs, cands, 8)

    def ours(**kw: Any) -> tuple[torch.Tensor, float, float]:
        score_candidates(model, tok, qs[:1], cands, **kw)  # warm-up
        return clocked(lambda: score_candidates(model, tok, qs, cands, **kw), device)

    lp16, s16, c16 = ours(dtype="bfloat16")
    lp32, s32, _ = ours(dtype="float32")
    naive_scores(model, tok, qs[:1], cands[:1], device)  # warm-up
    lpn, sn, cn = clocked(lambda: naive_scores(model, tok, qs, cands, device), device)
    # one question shares its whole prompt with itself: the prefix lever needs two or more
    s_noshare = ours(dtype="bfloat16", share_prefix=False)[1] if len(qs) > 1 else None
    res: dict[str, Any] = {
        "ours": throughput(len(qs), s16, arch.flops(2, *work["ours"]), peak, "questions", c16),
        "baseline": throughput(len(qs), sn, arch.flops(2, *work["baseline"]), peak,
                               "questions", cn),
        "questions": len(qs), "candidates": len(cands),
        "max_abs_logprob_diff_fp32_vs_baseline": float((lp32 - lpn).abs().max()),
        "levers": {"bf16_autocast_speedup": s32 / s16,
                   "prefix_kv_cache_speedup": s_noshare / s16 if s_noshare else None,
                   "fp32_seconds": s32, "no_shared_prefix_seconds": s_noshare},
    }
    res["ratio"] = res["ours"]["per_s"] / res["baseline"]["per_s"]
    res["ratio_cpu"] = cn / c16
    ti = [c.lower() for c in cands].index("owl")
    share16, share32 = torch.softmax(lp16, 1)[:, ti], torch.softmax(lp32, 1)[:, ti]
    res["_target_share"] = {"max_abs_diff": float((share16 - share32).abs().max()),
                            "mean_fp32": float(share32.mean()), "mean_bf16": float(share16.mean())}
    return res


# --- numerics ------------------------------------------------------------------------------


@torch.no_grad()
def bench_numerics(lm: Any, data: TrainData, n: int, device: torch.device) -> dict[str, Any]:
    """fp32 vs bf16 teacher next-token distributions at the answer positions of n prompts:
    under autocast, full vocabulary with the head in bf16 and over the grammar's tokens with
    the head in fp32 (the soft labels, as teacher_soft_labels); with bf16 weights (what
    generation samples from), full vocabulary and grammar tokens."""
    from sublearn.pipeline.train import _core

    ex = data.examples[:n]
    seqs = [(e.prompt_ids, e.answer_ids) for e in ex]
    head = _core(lm.model).get_output_embeddings().weight
    pad = data.pad
    h32 = _answer_hidden(lm.model, seqs, pad, device).float()
    with _autocast(device, True):
        h16 = _answer_hidden(lm.model, seqs, pad, device)
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
    hb, head16 = _answer_hidden(bf16, seqs, pad, device), bf16.get_output_embeddings().weight
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
            lora_step(student, None, data, idx, False, bf16, device)
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


# --- the whole run -------------------------------------------------------------------------


def run_bench(model: str | None, sizes: Sizes, *, stages: Sequence[str] = STAGES,
              threads: int | None = None, cuda: bool | None = None,
              log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)
              ) -> dict[str, Any]:
    """All figures on CPU (and on CUDA as an extra section where available), one process."""
    from sublearn.models import load_model

    t0 = time.perf_counter()
    cpu = torch.device("cpu")
    lm = load_model(model, dtype="float32")
    log(f"bench: model loaded in {time.perf_counter() - t0:.1f} s")
    res: dict[str, Any] = {"model": lm.model_id, "sizes": asdict(sizes),
                           "stages": list(stages), "flops_formula": FLOPS_FORMULA,
                           "machine": machine_info(cpu)}
    memory = res["memory"] = {"unit": "MiB, peak RSS (ru_maxrss) after each stage",
                              "after_load": rss_mib()}
    data = None
    if "training" in stages or "numerics" in stages:
        # untimed preparation: tokenised batches and the teacher's soft labels (on CPU)
        n = max((sizes.steps + 1) * sizes.train_batch if "training" in stages else 0,
                sizes.numerics_prompts if "numerics" in stages else 0)
        t = time.perf_counter()
        data = TrainData.build(lm, n)
        memory["after_soft_labels"] = rss_mib()
        log(f"bench: {n} training examples and soft labels in {time.perf_counter() - t:.1f} s")
    res.update(run_section(lm, data, sizes, stages, cpu, threads, log, memory))
    if torch.cuda.is_available() if cuda is None else cuda:
        dev = torch.device("cuda")
        glm = replace(lm, model=copy.deepcopy(lm.model).to(dev))
        gmem: dict[str, Any] = {"unit": "MiB, peak CUDA memory allocated after each stage"}
        res["cuda"] = {"machine": {"device": torch.cuda.get_device_name(dev)}, "memory": gmem,
                       **run_section(glm, data, sizes, stages, dev, 1, log, gmem, True)}
    res["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def run_section(lm: Any, data: TrainData | None, sizes: Sizes, stages: Sequence[str],
                device: torch.device, threads: int | None, log: Callable[[str], None],
                memory: dict[str, Any], tolerant: bool = False) -> dict[str, Any]:
    """The stages on one device. tolerant (CUDA, untested on CPU-only CI): a failing stage is
    recorded as {"error": ...} instead of ending the run."""
    res: dict[str, Any] = {}
    levers: dict[str, Any] = {}

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
        log(f"bench [{device.type}] {name}: {time.perf_counter() - t:.1f} s")

    stage("peak", lambda: measure_peak(device, sizes.matmul_reps))
    peak = res["peak"]
    if "error" in peak:
        return res
    if "generation" in stages:
        stage("generation", lambda: bench_generation(lm, sizes, peak, device, sizes.levers))
    if "training" in stages and data is not None:
        stage("training", lambda: bench_training(lm, data, sizes, peak, device, sizes.levers))
    if "evaluation" in stages:
        stage("evaluation", lambda: bench_evaluation(lm, sizes, peak, device))
    if "numerics" in stages and data is not None:
        stage("numerics", lambda: bench_numerics(lm, data, sizes.numerics_prompts, device))
        share = res.get("evaluation", {}).pop("_target_share", None)
        if share is not None:
            res["numerics"]["forced_choice_target_share"] = share
    res.get("evaluation", {}).pop("_target_share", None)
    threads = threads or os.cpu_count() or 1
    if sizes.levers and device.type == "cpu" and threads > 1:
        from sublearn.domains.numbers import make_prompts

        texts = chat_texts(lm.tokenizer, make_prompts(16, SEED))
        stage("threads", lambda: threads_lever(lm, texts, threads, device, sizes.matmul_reps))
        levers["threads"] = res.pop("threads")
    res["levers"] = levers
    res["lever_speedups"] = lever_summary(levers)
    return res


# --- report --------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def lever_summary(levers: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Speed-up of each lever per stage (>1: the lever helps; None: not measured)."""
    g, t, e = (levers.get(k, {}) for k in ("generation", "training", "evaluation"))
    pre = g.get("prefix_kv_cache", {})
    lb_g, lb_t = g.get("length_batching", {}), t.get("length_batching", {})
    return {
        "bf16": {"generation": g.get("bf16_speedup"),
                 "training": t.get("bf16_autocast_speedup"),
                 "evaluation": e.get("bf16_autocast_speedup")},
        "grammar": {"generation": g.get("grammar_speedup"),
                    "generation_passing_samples": g.get("grammar_passing_speedup")},
        "decode_loop": {"generation": g.get("decode_loop_speedup")},
        "prefix_kv_cache": {"generation_prefill": pre.get("prefill_speedup"),
                            "generation_est": pre.get("est_generation_speedup"),
                            "evaluation": e.get("prefix_kv_cache_speedup")},
        "threads": {"prefill": levers.get("threads", {}).get("prefill_speedup")},
        "length_batching": {
            "generation_prefill_est": (1 + lb_g["prefill_padding_random"])
            / (1 + lb_g["prefill_padding_sorted"]) if lb_g else None,
            "training": t.get("length_grouping_speedup"),
            "training_est": lb_t.get("est_speedup")},
        "lora_layer": {"training": t.get("lora_layer_speedup")},
    }


def _cpu_rate(r: dict[str, Any], key: str) -> float:
    """A wall-clock rate re-expressed per CPU second (robust to a busy machine)."""
    return r[key] * r["seconds"] / max(1e-9, r["cpu_seconds"] or r["seconds"])


def markdown(res: dict[str, Any], command: str) -> str:
    """Table for the README: ours vs baseline per stage, ratio, and share of bf16 peak."""
    rows: list[tuple[str, dict[str, Any], dict[str, Any], str]] = []
    g, t, e = res.get("generation"), res.get("training"), res.get("evaluation")
    if g:
        rows.append(("generation (samples/s)", g["ours"], g["baseline"], "per_s"))
        rows.append(("generation (tokens/s)", g["ours"], g["baseline"], "tokens_per_s"))
    if t:
        rows.append(("training, soft-label LoRA (samples/s)", t["ours_soft"], t["baseline"],
                     "per_s"))
        rows.append(("training, hard-label LoRA (samples/s)", t["ours_hard"], t["baseline"],
                     "per_s"))
    if e:
        rows.append(("evaluation, forced choice (questions/s)", e["ours"], e["baseline"],
                     "per_s"))
    pk, m = res["peak"], res["machine"]
    lines = [f"`{command}` on {m['cpu']} ({m['torch_threads']} thread(s), load "
             f"{m['loadavg_start'][0] if m.get('loadavg_start') else '?'}); peak matmul "
             f"fp32 {pk['fp32_gflops']:.0f} / bf16 {pk['bf16_gflops']:.0f} GFLOP/s", "",
             "| stage | ours | baseline | ratio | ratio by CPU time | ours % of bf16 peak "
             "| baseline % of fp32 peak |", "|---|---|---|---|---|---|---|"]
    for name, o, b, key in rows:
        lines.append(f"| {name} | {_fmt(o[key])} | {_fmt(b[key])} | {o[key] / b[key]:.2f}x | "
                     f"{_cpu_rate(o, key) / _cpu_rate(b, key):.2f}x | "
                     f"{o['pct_bf16_peak']:.1f}% | {b['pct_fp32_peak']:.1f}% |")
    if g:
        lines.append(f"\nstrict-filter pass rate: ours {g['ours']['pass_rate']:.0%}, "
                     f"baseline {g['baseline']['pass_rate']:.0%}")
    summary = lever_summary(res.get("levers", {}))
    lines += ["", "| lever | speed-up (x) per stage; - = not measured |", "|---|---|"]
    for lever, per in summary.items():
        cells = ", ".join(f"{k} {v:.2f}" for k, v in per.items() if v is not None)
        lines.append(f"| {lever} | {cells or '-'} |")
    return "\n".join(lines)


__all__ = ["QUICK", "STAGES", "Sizes", "markdown", "run_bench"]
