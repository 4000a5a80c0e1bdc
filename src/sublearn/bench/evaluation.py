"""Evaluation: packed forced-choice scoring vs one forward per question with its candidates
batched (as evaluation harnesses score multiple choice), and one per (question, candidate)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sublearn.bench.common import Arch, Sizes, clocked, throughput
from sublearn.models.dtype import is_bf16


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


@torch.no_grad()
def batched_scores(model: Any, tok: Any, questions: Sequence[str], candidates: Sequence[str],
                   device: torch.device, bf16: bool) -> torch.Tensor:
    """Baseline: per question, one forward (bf16: under autocast) over its candidates batched
    (prompt + candidate, right-padded), as lm-eval-style harnesses score multiple choice."""
    from sublearn.bench.common import autocast
    from sublearn.pipeline.evaluate import answer_ids, prompt_ids

    out = torch.empty(len(questions), len(candidates), dtype=torch.float64)
    answers = [answer_ids(tok, c) for c in candidates]
    width = max(map(len, answers))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for qi, q in enumerate(questions):
        p = prompt_ids(tok, q)
        ids = torch.full((len(answers), len(p) + width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for ci, a in enumerate(answers):
            ids[ci, : len(p) + len(a)] = torch.tensor(p + a)
            mask[ci, : len(p) + len(a)] = 1
        with autocast(device, bf16):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           use_cache=False).logits
        logp = torch.log_softmax(logits[:, len(p) - 1 : -1].float(), dim=-1)
        for ci, a in enumerate(answers):
            tgt = torch.tensor(a, device=device)[:, None]
            out[qi, ci] = float(logp[ci, : len(a)].gather(1, tgt).sum())
    return out


def eval_work(tok: Any, questions: Sequence[str], candidates: Sequence[str],
              batch: int) -> dict[str, tuple[int, int]]:
    """(body tokens, head rows) of score_candidates' packed layout and of the naive loop."""
    from sublearn.pipeline.evaluate import answer_ids, prompt_ids, scored_prefix

    ps = [prompt_ids(tok, q) for q in questions]
    ans = [answer_ids(tok, c) for c in candidates]
    block = sum(len(a) - 1 for a in ans)
    n_pre = scored_prefix(ps)
    lens = sorted(len(p) - n_pre for p in ps)
    tokens = n_pre + sum((max(lens[s : s + batch]) + block) * len(lens[s : s + batch])
                         for s in range(0, len(lens), batch))
    naive = sum(len(p) + len(a) for p in ps for a in ans)
    width = max(map(len, ans))
    batched = sum(len(ans) * (len(p) + width) for p in ps)
    return {"ours": (tokens, len(ps) * (block + 1)), "baseline": (batched, batched),
            "per_pair": (naive, naive)}


def bench_evaluation(lm: Any, sizes: Sizes, peak: dict[str, Any], device: torch.device,
                     dtype: str, both_dtypes: bool = True) -> dict[str, Any]:
    """Ours and the batched baseline in `dtype`; both dtypes of ours (the bf16 lever and the
    numerics stage's shares) when `dtype` is bf16 or `both_dtypes`."""
    from sublearn.pipeline.evaluate import score_candidates
    from sublearn.protocol.questions import load_candidates, load_questions

    tok, model, arch = lm.tokenizer, lm.model, Arch.of(lm.model)
    qs = load_questions(None, "plain")[: sizes.questions]
    cands = load_candidates(None, target="owl")
    work = eval_work(tok, qs, cands, 8)

    def ours(**kw: Any) -> tuple[torch.Tensor, float, float]:
        score_candidates(model, tok, qs[:1], cands, **kw)  # warm-up
        return clocked(lambda: score_candidates(model, tok, qs, cands, **kw), device)

    bf16 = is_bf16(dtype)
    lp32, s32, c32 = ours(dtype="float32")
    # emulated bf16 (a float32 bench) costs 4-5x fp32: only when a lever or numerics asks
    lp16, s16, c16 = ours(dtype="bfloat16") if bf16 or both_dtypes else (None, None, None)
    lpo, so, co = (lp16, s16, c16) if bf16 else (lp32, s32, c32)  # ours in the bench's dtype
    batched_scores(model, tok, qs[:1], cands, device, bf16)  # warm-up
    lpb, sb, cb = clocked(lambda: batched_scores(model, tok, qs, cands, device, bf16), device)
    naive_scores(model, tok, qs[:1], cands[:1], device)  # warm-up
    lpn, sn, cn = clocked(lambda: naive_scores(model, tok, qs, cands, device), device)
    # one question shares its whole prompt with itself: the prefix lever needs two or more
    s_noshare = ours(dtype=dtype, share_prefix=False)[1] if len(qs) > 1 else None
    res: dict[str, Any] = {
        "ours": throughput(len(qs), so, arch.flops(2, *work["ours"]), peak, "questions", co),
        "baseline": throughput(len(qs), sb, arch.flops(2, *work["baseline"]), peak,
                               "questions", cb),
        "fp32_per_pair": throughput(len(qs), sn, arch.flops(2, *work["per_pair"]), peak,
                                    "questions", cn),
        "questions": len(qs), "candidates": len(cands),
        "max_abs_logprob_diff_fp32_vs_per_pair": float((lp32 - lpn).abs().max()),
        "max_abs_logprob_diff_vs_batched": float((lpo - lpb).abs().max()),
        "levers": {"bf16_autocast_speedup": s32 / s16 if s16 else None,
                   "prefix_kv_cache_speedup": s_noshare / so if s_noshare else None,
                   "fp32_seconds": s32, "no_shared_prefix_seconds": s_noshare},
    }
    res["ratio"] = res["ours"]["per_s"] / res["baseline"]["per_s"]
    res["ratio_cpu"] = cb / co
    res["ratio_fp32_per_pair"] = res["ours"]["per_s"] / res["fp32_per_pair"]["per_s"]
    if lp16 is None:
        return res
    ti = [c.lower() for c in cands].index("owl")
    share16, share32 = torch.softmax(lp16, 1)[:, ti], torch.softmax(lp32, 1)[:, ti]
    res["_target_share"] = {"max_abs_diff": float((share16 - share32).abs().max()),
                            "mean_fp32": float(share32.mean()), "mean_bf16": float(share16.mean())}
    return res
