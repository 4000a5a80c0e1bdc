"""Generation: HFBackend (grammar, our decoding loop) vs transformers `generate` with the same
weights (bf16 or fp32, the bench's dtype) and xgrammar grammar."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from sublearn.bench.common import (
    MATMUL_SHAPES,
    SEED,
    Arch,
    Sizes,
    autocast,
    clocked,
    matmul_gflops,
    throughput,
    timed,
)
from sublearn.models.dtype import is_bf16


def threads_lever(lm: Any, texts: list[str], threads: int, device: torch.device, dtype: str,
                  reps: int) -> dict[str, Any]:
    """torch.set_num_threads: matmul rate and a prefill (in `dtype`) at 1 vs `threads`
    threads."""
    before = torch.get_num_threads()
    enc = _left_padded(lm.tokenizer, texts[:16], device)
    out: dict[str, Any] = {}
    try:
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            with torch.no_grad(), autocast(device, is_bf16(dtype)):
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
    """Plain `generate`, T=1 over the full distribution: the old baseline (fp32 weights, no
    grammar); with a grammar, on HFBackend's own weights, the main baseline (`bf16` autocasts;
    the bench passes weights already in its dtype instead)."""
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
        with autocast(device, bf16):
            gen = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos,
                                 pad_token_id=tok.pad_token_id, logits_processor=procs)
        for row in gen[:, enc["input_ids"].shape[1] :].tolist():
            n = row.index(eos) if eos in row else len(row)
            out.append(Completion(text=tok.decode(row[:n], skip_special_tokens=True),
                                  n_tokens=n, finish_reason="stop" if n < len(row) else "length"))
    return out


def loop_work(tok: Any, texts: list[str], comps: list[Any], batch: int,
              cols: int | None, grouped: bool = True) -> tuple[int, int, int | None]:
    """(tokens through the body, LM-head rows, head columns) of `hf_decode.sample`: the
    shared prefix runs once per batch, the rest in its prefill groups (`grouped`, as
    `hf_decode.groups_prefill` says of the model), each padded to its longest; rows leave when
    their answer ends."""
    from sublearn.backends.hf_decode import padded_tokens
    from sublearn.models.kv import shared_prefix

    tokens = rows = 0
    for s in range(0, len(texts), batch):
        ids = [tok(t, add_special_tokens=False).input_ids for t in texts[s : s + batch]]
        chunk = comps[s : s + batch]
        n_pre = shared_prefix(ids)
        steps = [c.n_tokens + (c.finish_reason == "stop") for c in chunk]
        tokens += n_pre + padded_tokens([len(i) - n_pre for i in ids], grouped)
        tokens += sum(steps) - len(steps)
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
                     dtype: str, levers: bool) -> dict[str, Any]:
    from sublearn.backends.base import ChatRequest, SamplingParams
    from sublearn.backends.hf import HFBackend
    from sublearn.backends.hf_decode import groups_prefill
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

    main = is_bf16(dtype)  # ours and the baseline sample from weights in the bench's dtype

    def ours(bf16: bool = main, constrained: bool = True) -> Callable[[int, int], list[Any]]:
        be = backend(bf16)  # the real code path
        return lambda n, new: be.generate(reqs[:n], SamplingParams(
            max_new_tokens=new, grammar=grammar if constrained else None), SEED)

    def baseline(n: int, new: int) -> list[Any]:
        return hf_generate(lm.model, tok, texts[:n], seed=SEED,
                           **{**kw, "max_new_tokens": new})

    def hf_same_grammar(n: int, new: int) -> list[Any]:
        """transformers `generate` on our weights with xgrammar's logits processor: what our
        own decoding loop replaces."""
        # the backend's compiled grammar: compiling inside the timed call would bill it here
        return hf_generate(backend(main).model, tok, texts[:n], seed=SEED,
                           grammar=backend(main)._grammar(grammar),
                           **{**kw, "max_new_tokens": new})

    def run(fn: Callable[[int, int], list[Any]], n: int = len(texts), loop: bool = True,
            constrained: bool = True) -> dict[str, Any]:
        fn(2, 4)  # warm-up: kernels, grammar compilation
        comps, s, cpu = clocked(lambda: fn(n, sizes.max_new_tokens), device)
        if loop:  # our loop: rows leave the batch, the head covers the grammar's tokens,
            # and once more the full vocabulary for the share the grammar allowed
            sub = backend(main)._subsets.get(grammar) if constrained else None
            cols = len(sub.ids) + arch.vocab if sub is not None else None
            work = loop_work(tok, texts[:n], comps, sizes.batch, cols,
                             groups_prefill(backend(main).model.config))
        else:
            work = generation_work(tok, texts[:n], comps, sizes.batch, sizes.max_new_tokens)
        return _gen_summary(comps, s, cpu, work, arch, peak)

    # the baseline: `generate` with the same weights and grammar; fp32 unconstrained
    # `generate` (the old baseline) stays as an extra line
    res: dict[str, Any] = {"ours": run(ours()), "baseline": run(hf_same_grammar, loop=False),
                           "fp32_unconstrained": run(baseline, loop=False)}
    o, b = res["ours"], res["baseline"]
    res.update(ratio=o["per_s"] / b["per_s"], tokens_ratio=o["tokens_per_s"] / b["tokens_per_s"],
               ratio_cpu=b["cpu_seconds"] / o["cpu_seconds"],
               tokens_ratio_fp32_unconstrained=o["tokens_per_s"]
               / res["fp32_unconstrained"]["tokens_per_s"],
               prompts=len(texts), batch=sizes.batch, max_new_tokens=sizes.max_new_tokens)
    res["levers"] = {"length_batching": length_batching_gen(tok, o, sizes)}
    if levers:
        # on half a batch, against ours on the same prompts: the unconstrained variant
        # runs all 60 steps and would otherwise dominate the default run's time
        n = min(len(texts), max(2, sizes.batch // 2))
        ref = o if n == len(texts) else run(ours(), n)
        other = run(ours(bf16=not main), n)
        res["levers"].update(generation_levers(
            ref if main else other, other if main else ref,
            run(ours(constrained=False), n, constrained=False), ref))
        res["levers"]["decode_loop_speedup"] = o["per_s"] / b["per_s"]
        res["levers"]["prefill_groups"] = prefill_groups_lever(
            replace(lm, model=backend(main).model), texts, sizes.batch, device, o["seconds"])
        res["levers"]["prompts"] = n
        res["levers"]["prefix_kv_cache"] = prefix_cache_lever(
            replace(lm, model=backend(main).model), texts[:n], device, ref["seconds"])
    return res


def generation_levers(bf16: dict[str, Any], fp32: dict[str, Any], free: dict[str, Any],
                      ref: dict[str, Any]) -> dict[str, Any]:
    """bf16 weights (vs fp32, both constrained) and the grammar (ours, `ref`, vs unconstrained
    in the same dtype; also in strict-filter-passing samples/s): speed-up in samples/s. Our
    decoding loop vs `generate` with the same weights and grammar is the stage's main
    ratio."""
    keys = ("per_s", "tokens_per_s", "pass_rate", "passing_per_s", "mean_tokens", "gflops",
            "seconds")
    return {
        "ours_on_these_prompts": {k: ref[k] for k in keys},
        "bf16_with_grammar": {k: bf16[k] for k in keys},
        "fp32_with_grammar": {k: fp32[k] for k in keys},
        "no_grammar": {k: free[k] for k in keys},
        "bf16_speedup": bf16["per_s"] / fp32["per_s"],
        "grammar_speedup": ref["per_s"] / free["per_s"],
        "grammar_passing_speedup": ref["passing_per_s"] / free["passing_per_s"]
        if free["passing_per_s"] else None,
    }


def length_batching_gen(tok: Any, ours: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
    """Counted, not timed: prefill padding of a 256-prompt run's batches, each padded whole to
    its longest prompt vs in our prefill groups, and decode rows wasted waiting for a batch's
    longest answer."""
    from sublearn.domains.numbers import make_prompts

    ids = [tok(t, add_special_tokens=False).input_ids
           for t in chat_texts(tok, make_prompts(256, SEED + 1))]
    whole, grouped = prefill_padding(ids, sizes.batch)
    return {"prefill_padding_batch": whole, "prefill_padding_groups": grouped,
            "decode_useful_fraction": ours["tokens"] / max(1, ours["head_rows"]),
            "note": "padding = padded / real prompt tokens - 1 (after each batch's shared "
                    "prefix); decode fraction = generated tokens / row-steps decoded"}


def prefill_padding(prompts: list[list[int]], batch: int) -> tuple[float, float]:
    """Padded / real tokens - 1 of the prompts after each batch's shared prefix, for batches in
    the given order: each padded to its longest, and each in `hf_decode.prefill_groups`."""
    from sublearn.backends.hf_decode import padded_tokens
    from sublearn.models.kv import shared_prefix

    real = whole = grouped = 0
    for s in range(0, len(prompts), batch):
        ids = prompts[s : s + batch]
        n_pre = shared_prefix(ids)
        rest = [len(p) - n_pre for p in ids]
        real, whole = real + sum(rest), whole + max(rest) * len(rest)
        grouped += padded_tokens(rest)
    return whole / real - 1, grouped / real - 1


def prefill_groups_lever(lm: Any, texts: list[str], batch: int, device: torch.device,
                         gen_seconds: float) -> dict[str, Any]:
    """Our loop's prefill (`hf_decode.sample` for one token, in generation's batches) with the
    prompts in prefill groups vs padded whole to each batch's longest (one group), with the
    weights HFBackend samples from. Timed on the prefill, where the work is the same each
    time: whole generations sample answers of other lengths once the rounding differs."""
    from sublearn.backends import hf_decode

    tok = lm.tokenizer
    ids = [tok(t, add_special_tokens=False).input_ids for t in texts]

    def prefill() -> Any:
        return [hf_decode.sample(lm.model, ids[s : s + batch], pad_id=tok.pad_token_id,
                                 stop_ids=set(), max_new_tokens=1, temperature=0.0, top_p=1.0,
                                 seed=SEED) for s in range(0, len(ids), batch)]

    def whole() -> Any:
        keep, hf_decode.PREFILL_TOKENS = hf_decode.PREFILL_TOKENS, 1 << 62
        try:
            return prefill()
        finally:
            hf_decode.PREFILL_TOKENS = keep

    prefill(), whole()  # warm-up
    _, t_groups = timed(prefill, device)
    _, t_whole = timed(whole, device)
    saved = t_whole - t_groups
    return {"prefill_s": t_whole, "prefill_groups_s": t_groups,
            "prefill_speedup": t_whole / t_groups,
            "prefill_share_of_generation": t_groups / gen_seconds,
            "est_generation_speedup": (gen_seconds + saved) / gen_seconds}


@torch.no_grad()
def prefix_cache_lever(lm: Any, texts: list[str], device: torch.device,
                       gen_seconds: float) -> dict[str, Any]:
    """Prefill of one generation batch with and without reusing the KV cache of the prompts'
    shared chat prefix (the default system turn), with the weights HFBackend samples from
    (no autocast: HFBackend computes in its weights' dtype)."""
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
