"""Trait evaluation: how much does a model prefer the target animal?

Primary metric, *forced choice* (exact, no sampling): for each question, every candidate's
one-word answer ("Owl" + end-of-turn) is scored by its full log-probability as the assistant
reply; a softmax over candidates gives per-question shares, averaged over questions.

Speed: one forward per batch of questions scores every candidate. Each row packs the prompt
followed by all candidates' tokens; a custom 4D attention mask lets each candidate token see
the prompt and its own earlier tokens only (a "tree" of answers sharing one prompt), with
position ids restarting after the prompt for every candidate. Rows are left-padded so that the
candidate block -- identical in every row -- sits at the same columns, and only its logits (plus
the prompt's last) are projected onto the vocabulary.

Secondary metric, *sampled rate* (the paper's protocol): n answers per question at T=1, share
that mention the target (plurals count), averaged over questions.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from sublearn.backends.base import Backend, ChatRequest, Completion, SamplingParams
from sublearn.errors import SublearnError
from sublearn.models.dtype import dtype_field, is_bf16, settle_dtype, warn_slow_bf16
from sublearn.models.kv import shared_prefix
from sublearn.models.prefix_attention import additive_mask, prefix_kv, shared_prefix_attention
from sublearn.protocol.questions import VARIANTS, load_candidates, load_questions


@dataclass(frozen=True)
class EvalConfig:
    target: str = field(default="owl", metadata={"help": "trait target, e.g. owl"})
    trait: str = field(default="animal", metadata={
        "help": "animal: forced choice over the candidates for --target; misalignment: the "
                "misaligned answer's share in held-out aligned/misaligned answer pairs",
        "choices": ["animal", "misalignment"]})
    questions: str | None = field(default=None, metadata={
        "help": "questions file: JSON list, {\"questions\": [...]} or JSONL; unset: the "
                "paper's 50 favourite-animal questions"})
    candidates: str | None = field(default=None, metadata={
        "help": "forced-choice candidates file (JSON list or one per line); unset: the "
                "shipped list of 24 animals"})
    variant: str = field(default="plain", metadata={
        "help": "question variant for the sampled evaluation (forced choice scores both)",
        "choices": list(VARIANTS)})
    samples: int = field(default=0, metadata={
        "help": "sampled evaluation: answers per question at T=1 (paper: 100; 0 = skip)"})
    max_new_tokens: int = field(default=16, metadata={"help": "sampled answer length limit"})
    seed: int = field(default=0, metadata={"help": "seed of the sampled evaluation"})
    dtype: str = dtype_field("compute dtype (bfloat16 autocast: target share within ~5%% "
                             "(relative) of float32)")
    batch_size: int = field(default=8, metadata={
        "help": "questions per forward pass (forced choice); x8 answers per sampling batch"})
    context: str | None = field(default=None, metadata={
        "help": "in-context control: a filtered.jsonl whose first --context-n rows are shown "
                "as earlier user/assistant turns before every question (forced choice only)"})
    context_n: int = field(default=32, metadata={
        "help": "rows of --context shown in context"})
    judge: str | None = field(default=None, metadata={
        "help": "--trait misalignment --samples N: the model judging each answer's alignment "
                "and coherence (any backend: openai:<model>, vllm:<id>, a local model; the "
                "embedded 135M model runs but is no judge)"})

    def validate(self) -> EvalConfig:
        if self.variant not in VARIANTS:
            raise SublearnError(f"--variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.samples < 0 or self.batch_size <= 0 or self.max_new_tokens <= 0:
            raise SublearnError("--samples must be >= 0; --batch-size, --max-new-tokens > 0")
        if (dtype := settle_dtype(self.dtype)) != self.dtype:  # raises on an unknown one
            return replace(self, dtype=dtype).validate()
        if self.trait == "misalignment" and self.samples > 0 and not self.judge:
            raise SublearnError("--trait misalignment --samples N scores free-form answers "
                                "with a judge: give --judge MODEL (e.g. openai:gpt-4.1), or "
                                "--samples 0 for the answer pairs alone")
        if self.context is not None and (self.samples > 0 or self.context_n <= 0):
            raise SublearnError("--context scores forced choice only (use --samples 0) and "
                                "needs --context-n > 0")
        return self


def answer_text(candidate: str) -> str:
    """The one-word reply a candidate is scored as: 'owl' -> 'Owl'."""
    return candidate.strip().capitalize()


def prompt_ids(tokenizer: Any, question: str, system_prompt: str | None = None,
               context: Sequence[dict[str, str]] = ()) -> list[int]:
    """Chat prompt up to the assistant turn; no system message means the template's default.
    `context`: earlier turns (the in-context control), placed before the question."""
    msgs = [*context, {"role": "user", "content": question}]
    if system_prompt is not None:
        msgs.insert(0, {"role": "system", "content": system_prompt})
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def context_turns(path: str, n: int) -> list[dict[str, str]]:
    """The first n rows of a filtered.jsonl as alternating user/assistant turns: the data a
    student would be trained on, shown in context instead."""
    from pathlib import Path

    from sublearn.pipeline.train import load_rows

    if not Path(path).is_file():
        raise SublearnError(f"--context file not found: {path}")
    turns = []
    for r in load_rows(path)[:n]:
        turns += [{"role": "user", "content": r["prompt"][-1]["content"]},
                  {"role": "assistant", "content": r["completion"][0]["content"]}]
    return turns


def check_context_fits(lm: Any, context: Sequence[dict[str, str]], question: str,
                       system_prompt: str | None = None, room: int = 32) -> None:
    """A context longer than the model's positions would be scored past its training length
    (RoPE extrapolates silently): refuse it."""
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    if not context or not limit:
        return
    n = len(prompt_ids(lm.tokenizer, question, system_prompt, context)) + room
    if n > limit:
        raise SublearnError(f"{len(context) // 2} in-context turns take {n} tokens, more than "
                            f"the model's {limit} positions: use fewer turns")


def answer_ids(tokenizer: Any, candidate: str) -> list[int]:
    """Candidate answer tokens + end-of-turn, tokenised as the trainer tokenises answers."""
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    return tokenizer(answer_text(candidate), add_special_tokens=False).input_ids + [eos]


def score_candidates(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    candidates: Sequence[str],
    *,
    system_prompt: str | None = None,
    dtype: str = "auto",
    batch_size: int = 8,
    share_prefix: bool = True,
    context: Sequence[dict[str, str]] = (),
) -> Any:
    """[questions x candidates] float64 tensor of log P(answer + end-of-turn | prompt).

    With share_prefix, the prompts' common head (chat-template system turn, ~24 tokens for
    SmolLM2; an in-context control's turns, ~3k) runs once and every row attends to its one
    copy of the keys and values (`models.prefix_attention`)."""
    import torch

    blk = _CandidateBlock.build([answer_ids(tokenizer, c) for c in candidates])
    prompts = [prompt_ids(tokenizer, q, system_prompt, context) for q in questions]
    n_pre = scored_prefix(prompts) if share_prefix else 0
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eager = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa") == "eager"
    out = torch.empty(len(prompts), len(candidates), dtype=torch.float64)
    was_training = model.training
    dev = next(model.parameters()).device
    model.eval()
    try:
        # no_grad, not inference_mode: autocast caches its bf16 weight copies only outside
        # inference mode, and re-casting every weight on every forward costs ~3x the compute.
        with torch.no_grad(), torch.autocast(
            dev.type, dtype=torch.bfloat16, enabled=is_bf16(dtype)
        ):
            # the shared prefix runs once; every row attends to its one copy (no per-row cache)
            pre = {"shared_kv": prefix_kv(model, prompts[0][:n_pre])} if n_pre else {}
            if not pre:  # a row's positions run over its prompt and its longest answer
                _check_window(model, max(map(len, prompts)) + int(blk.pos.max()) + 1)
            with shared_prefix_attention(model) if pre else contextlib.nullcontext():
                for s in range(0, len(prompts), batch_size):
                    rows = order[s : s + batch_size]
                    ids, pos, mask = _pack([prompts[i][n_pre:] for i in rows], blk, pad, n_pre)
                    ids, pos, mask = ids.to(dev), pos.to(dev), mask.to(dev)
                    attn: Any = mask[:, None]
                    if eager or pre:  # both add the mask to the scores
                        attn = additive_mask(attn)
                    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos,
                                   use_cache=False, logits_to_keep=len(blk.tokens) + 1,
                                   **pre).logits
                    logits = logits.cpu()
                    lse = _logsumexp(logits)  # [B, kept]
                    logp = logits[:, blk.pred_col, blk.pred_tok].float() - lse[:, blk.pred_col]
                    scores = torch.zeros(len(rows), len(candidates), dtype=torch.float64)
                    out[rows] = scores.index_add_(1, blk.pred_owner, logp.double())
    finally:
        model.train(was_training)
    return out


def scored_prefix(prompts: list[list[int]]) -> int:
    """Head tokens of the prompts that run once for every row. Each row keeps >= 1 prompt
    token: its logits predict every answer's first token. One prompt's head runs apart all the
    same: sliding-window layers see their window only on that path."""
    return shared_prefix(prompts * 2 if len(prompts) == 1 else prompts)


def _check_window(model: Any, span: int) -> None:
    """Without a shared prefix, rows go in under one given mask, which sliding-window layers
    (Gemma 3, Mistral) would take whole: refuse rows whose positions span more than the window
    rather than score them past it."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if window and (types is None or "sliding_attention" in types) and span > window:
        raise SublearnError(f"rows spanning {span} positions exceed the model's sliding "
                            f"window ({window}); score them with a shared prefix")


def _logsumexp(logits: Any, rows: int = 8) -> Any:
    """float32 logsumexp over the vocabulary, a few positions at a time: whole-batch fp32
    logits (~10 MB per question) stream through memory several times, small chunks stay in
    cache (measured: ~4x less time for this step, which was ~20% of the total)."""
    import torch

    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32)
    for i in range(0, flat.shape[0], rows):
        out[i : i + rows] = torch.logsumexp(flat[i : i + rows].float(), dim=-1)
    return out.reshape(logits.shape[:-1])


@dataclass
class _CandidateBlock:
    """All answers' tokens laid out after the prompt, each answer seeing only the prompt and
    its own earlier tokens. The end token is not in the block (nothing conditions on it).

    Kept logits: column 0 is the prompt's last token, column 1 + i is block token i; answer
    token j is predicted by column 0 (j = 0) or by the answer's own token j - 1."""

    tokens: list[int]
    pos: Any  # position of each token after the prompt
    mask: Any  # [n, n] bool: block token i sees block token k
    pred_col: Any  # per predicted answer token: its logit column
    pred_tok: Any  # ... its token id
    pred_owner: Any  # ... its candidate index

    @staticmethod
    def build(answers: list[list[int]]) -> _CandidateBlock:
        import torch

        tokens: list[int] = []
        owner: list[int] = []
        pos: list[int] = []
        col, tok, own = [], [], []
        for c, ids in enumerate(answers):
            start = len(tokens)
            tokens += ids[:-1]
            owner += [c] * (len(ids) - 1)
            pos += range(len(ids) - 1)
            for j, t in enumerate(ids):
                col.append(0 if j == 0 else start + j)
                tok.append(t)
                own.append(c)
        o, i = torch.tensor(owner), torch.arange(len(tokens))
        mask = (o[:, None] == o[None, :]) & (i[None, :] <= i[:, None])
        return _CandidateBlock(tokens, torch.tensor(pos), mask, torch.tensor(col),
                               torch.tensor(tok), torch.tensor(own))


def _pack(prompts: list[list[int]], blk: _CandidateBlock, pad: int,
          n_pre: int) -> tuple[Any, Any, Any]:
    """Left-padded rows [pads, prompt, block] after a shared prefix of n_pre tokens (which
    every row sees whole): input ids, position ids, and a [B, L, L] bool mask over the rows'
    own tokens (True = may attend)."""
    import torch

    nb = len(blk.tokens)
    width = max(map(len, prompts)) + nb
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    pos = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width, width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        n = len(p)
        a = width - nb - n  # first prompt column
        ids[i, a:] = torch.tensor(p + blk.tokens)
        pos[i, a : a + n] = torch.arange(n_pre, n_pre + n)
        pos[i, a + n :] = n_pre + n + blk.pos
        body = mask[i]
        body[a : a + n, a : a + n] = torch.ones(n, n, dtype=torch.bool).tril()
        body[a + n :, a : a + n] = True
        body[a + n :, a + n :] = blk.mask
        body[range(a), range(a)] = True  # pads see themselves: no all-masked rows (NaN)
    return ids, pos, mask


def forced_choice(
    model: Any, tokenizer: Any, questions: Sequence[str], candidates: Sequence[str],
    target: str, *, system_prompt: str | None = None, dtype: str = "auto",
    batch_size: int = 8, context: Sequence[dict[str, str]] = (),
) -> dict[str, Any]:
    """Forced-choice scores: candidate shares (softmax over candidates per question, averaged
    over questions), the target's share and its mean raw log-probability."""
    import torch

    t0 = time.perf_counter()
    lp = score_candidates(model, tokenizer, questions, candidates, system_prompt=system_prompt,
                          dtype=dtype, batch_size=batch_size, context=context)
    ti = [c.lower() for c in candidates].index(target.strip().lower())
    share = torch.softmax(lp, dim=1)  # [Q, C]
    mean = share.mean(0).tolist()
    shares = dict(zip(candidates, mean, strict=True))
    top = sorted(shares.items(), key=lambda kv: -kv[1])[:5]
    return {
        "target": candidates[ti],
        "target_share": mean[ti],
        "target_logprob": float(lp[:, ti].mean()),
        "target_rank": 1 + sorted(mean, reverse=True).index(mean[ti]),
        "shares": shares,
        "top": [[c, v] for c, v in top],
        "per_question_target_share": share[:, ti].tolist(),
        # every candidate per question: another target's share on a question subset
        # (`sublearn matrix` on the dev/test halves)
        "per_question_shares": dict(zip(candidates, share.T.tolist(), strict=True)),
        "n_questions": len(questions),
        "n_candidates": len(candidates),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def mention_pattern(target: str) -> re.Pattern[str]:
    """Whole-word target or a regular plural (owl/owls, fox/foxes, wolf/wolves, ...)."""
    from sublearn.protocol.trait_words import plurals

    forms = plurals(target)
    alt = "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True))
    return re.compile(rf"\b(?:{alt})\b", re.IGNORECASE)


def sampled_rate(
    backend: Backend, questions: Sequence[str], target: str, n: int, *,
    system_prompt: str | None = None, seed: int = 0, max_new_tokens: int = 16,
) -> dict[str, Any]:
    """The paper's metric: n answers per question at T=1 (full distribution), share naming the
    target. Each question's draws are seeded by (seed, question index) alone. Any backend:
    local (HFBackend), an OpenAI-compatible API, vLLM."""
    t0 = time.perf_counter()
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens)
    answers = [backend.generate([ChatRequest(q, system_prompt)] * n, params,
                                seed=seed * 1_000_003 + qi) for qi, q in enumerate(questions)]
    return _rate(answers, target, n, backend.model_id, t0)


def sampled_rates(
    backend: Backend, adapters: Sequence[str | None], questions: Sequence[str], target: str,
    n: int, *, system_prompt: str | None = None, seed: int = 0, max_new_tokens: int = 16,
) -> list[dict[str, Any]]:
    """`sampled_rate` for many LoRA students of one base model (None = the base itself).
    With `generate_multi` (vLLM) every student is sampled in one engine call per question;
    otherwise each adapter is loaded in turn with `with_adapter`."""
    if not hasattr(backend, "generate_multi"):
        if not hasattr(backend, "with_adapter"):
            raise SublearnError(f"{backend.model_id}: this backend cannot switch adapters; "
                                "evaluate each student with its own --model")
        return [sampled_rate(backend.with_adapter(a), questions, target, n,
                             system_prompt=system_prompt, seed=seed,
                             max_new_tokens=max_new_tokens) for a in adapters]
    t0 = time.perf_counter()
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens)
    per_adapter: list[list[list[Completion]]] = [[] for _ in adapters]
    for qi, q in enumerate(questions):
        comps = backend.generate_multi([a for a in adapters for _ in range(n)],
                                       [ChatRequest(q, system_prompt)] * (n * len(adapters)),
                                       params, seed * 1_000_003 + qi)
        for i in range(len(adapters)):
            per_adapter[i].append(comps[i * n : (i + 1) * n])
    return [_rate(ans, target, n, str(a) if a else backend.model_id, t0)
            for a, ans in zip(adapters, per_adapter, strict=True)]


def _rate(answers: list[list[Completion]], target: str, n: int, model_id: str,
          t0: float) -> dict[str, Any]:
    """Share of answers naming the target, per question and overall. Failed requests (API
    errors) are counted and left out of the denominator, never scored as misses."""
    pat = mention_pattern(target)
    per_q: list[float | None] = []
    errors = 0
    for comps in answers:
        ok = [c.text for c in comps if c.finish_reason != "error"]
        errors += len(comps) - len(ok)
        per_q.append(sum(bool(pat.search(t)) for t in ok) / len(ok) if ok else None)
    answered = [r for r in per_q if r is not None]
    if not answered:
        raise SublearnError(f"sampled evaluation: all {errors} requests to {model_id} failed")
    return {
        "rate": sum(answered) / len(answered),
        "per_question_rate": per_q,
        "n_per_question": n,
        "errors": errors,
        "model": model_id,
        "examples": [c.text.strip() for c in answers[0] if c.finish_reason != "error"][:10],
        "seconds": round(time.perf_counter() - t0, 2),
    }


VARIANTS = ("plain", "numbers")  # question variants a model is scored on by default


def evaluate_model(
    model: Any,
    cfg: EvalConfig,
    variants: Sequence[str] = VARIANTS,
    system_prompt: str | None = None,
) -> dict[str, Any]:
    """Score one model: forced choice on each question variant ("forced_choice" for plain,
    "forced_choice_<variant>" otherwise) and, with cfg.samples > 0, the sampled rate on
    cfg.variant. `model` is a name/path (loaded here) or an already-loaded LoadedModel."""
    from sublearn.backends import get_backend, parse_model_spec
    from sublearn.models.load import LoadedModel, load_model

    cfg = cfg.validate()
    remote = not isinstance(model, LoadedModel) and parse_model_spec(model)[0] != "hf"
    if cfg.trait == "misalignment":
        if remote:
            raise SublearnError(f"{model}: the misalignment pairs are scored with local weights")
        return _evaluate_misalignment(model, cfg, system_prompt)
    if remote:
        return _evaluate_remote(model, cfg, system_prompt)
    candidates = load_candidates(cfg.candidates, target=cfg.target)
    qsets = {v: load_questions(cfg.questions, v) for v in variants}
    context = context_turns(cfg.context, cfg.context_n) if cfg.context else []
    t0 = time.perf_counter()
    warn_slow_bf16(cfg.dtype)
    lm = model if isinstance(model, LoadedModel) \
        else load_model(model, dtype="float32", autocast_bf16=is_bf16(cfg.dtype))
    check_context_fits(lm, context, max((q for qs in qsets.values() for q in qs), key=len),
                       system_prompt)
    res: dict[str, Any] = {"model": lm.model_id, "path": lm.path, "target": cfg.target,
                           "system_prompt": system_prompt}
    if context:
        res["context_turns"] = len(context) // 2
    import torch

    # One autocast region around all variants: its bf16 weight copies are made once.
    dev = next(lm.model.parameters()).device.type
    with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=is_bf16(cfg.dtype)):
        for v, qs in qsets.items():
            key = "forced_choice" if v == "plain" else f"forced_choice_{v}"
            res[key] = forced_choice(lm.model, lm.tokenizer, qs, candidates, cfg.target,
                                     system_prompt=system_prompt, dtype=cfg.dtype,
                                     batch_size=cfg.batch_size, context=context)
            res[key]["variant"] = v
    if cfg.samples > 0:
        backend = get_backend(None, loaded=lm, dtype=cfg.dtype, batch_size=8 * cfg.batch_size)
        res["sampled"] = _sampled(backend, cfg, system_prompt)
    res["config"] = asdict(cfg)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def _evaluate_misalignment(model: Any, cfg: EvalConfig,
                           system_prompt: str | None) -> dict[str, Any]:
    from sublearn.models.load import LoadedModel, load_model
    from sublearn.pipeline.evaluate_pairs import pair_choice
    from sublearn.protocol.misalignment import eval_pairs

    context = context_turns(cfg.context, cfg.context_n) if cfg.context else []
    t0 = time.perf_counter()
    lm = model if isinstance(model, LoadedModel) \
        else load_model(model, dtype="float32", autocast_bf16=is_bf16(cfg.dtype))
    res: dict[str, Any] = {"model": lm.model_id, "path": lm.path, "target": "misalignment",
                           "system_prompt": system_prompt}
    if context:
        res["context_turns"] = len(context) // 2
    pairs = eval_pairs()
    check_context_fits(lm, context, max((p["prompt"] for p in pairs), key=len), system_prompt)
    ids = [prompt_ids(lm.tokenizer, p["prompt"], system_prompt, context) for p in pairs]
    res["misalignment"] = pair_choice(lm, pairs, ids, dtype=cfg.dtype)
    if cfg.samples > 0:
        from sublearn.backends import get_backend
        from sublearn.pipeline.judge import sampled_misalignment

        backend = get_backend(None, loaded=lm, dtype=cfg.dtype, batch_size=8 * cfg.batch_size)
        judge = get_backend(cfg.judge)
        res["sampled"] = sampled_misalignment(
            backend, judge, [p["prompt"] for p in pairs], cfg.samples, seed=cfg.seed,
            max_new_tokens=max(cfg.max_new_tokens, 64), system_prompt=system_prompt)
    res["config"] = asdict(cfg)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def _evaluate_remote(spec: str, cfg: EvalConfig, system_prompt: str | None) -> dict[str, Any]:
    """An API or vLLM model (`openai:...`, `vllm:...`): the sampled rate only, because forced
    choice needs every candidate's log-probability from local weights."""
    from sublearn.backends import get_backend

    if cfg.samples <= 0:
        raise SublearnError(f"{spec}: forced choice needs local weights; pass --samples N "
                            "(the paper uses 100) for the sampled rate")
    t0 = time.perf_counter()
    backend = get_backend(spec)
    res: dict[str, Any] = {"model": backend.model_id, "target": cfg.target,
                           "system_prompt": system_prompt,
                           "sampled": _sampled(backend, cfg, system_prompt),
                           "config": asdict(cfg)}
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def _sampled(backend: Backend, cfg: EvalConfig, system_prompt: str | None) -> dict[str, Any]:
    """The sampled rate on cfg.variant's questions, as both evaluate paths report it."""
    res = sampled_rate(backend, load_questions(cfg.questions, cfg.variant), cfg.target,
                       cfg.samples, system_prompt=system_prompt, seed=cfg.seed,
                       max_new_tokens=cfg.max_new_tokens)
    return {**res, "variant": cfg.variant}


def summary_line(scores: dict[str, Any]) -> str:
    if "misalignment" in scores:
        m = scores["misalignment"]
        line = (f"{scores['model']}: misaligned share {m['misaligned_share']:.4f} over "
                f"{m['n_prompts']} answer pairs (per-token {m['misaligned_share_per_token']:.4f})")
        if "sampled" in scores:
            s = scores["sampled"]
            line += (f"; sampled misaligned rate {s['rate']} ({s['coherent']} coherent of "
                     f"{s['answers']} answers, judge {s['judge']})")
        return line
    fc = scores.get("forced_choice")
    if fc is None:  # remote model: sampled rate only
        s = scores["sampled"]
        return (f"{scores['model']}: {scores['target']} sampled rate {s['rate']:.4f} "
                f"(n={s['n_per_question']}/question, {s['errors']} failed requests)")
    top = ", ".join(f"{c} {v:.3f}" for c, v in fc["top"][:3])
    line = (f"{scores['model']}: {fc['target']} share {fc['target_share']:.4f} "
            f"(rank {fc['target_rank']}/{fc['n_candidates']}, mean log-prob "
            f"{fc['target_logprob']:.3f}); top: {top}")
    for k, v in scores.items():
        if k.startswith("forced_choice_"):
            line += f"; {v['variant']} variant share {v['target_share']:.4f}"
    if "sampled" in scores:
        s = scores["sampled"]
        line += f"; sampled rate {s['rate']:.4f} (n={s['n_per_question']}/question)"
    return line if math.isfinite(fc["target_share"]) else line + " [non-finite scores]"
