"""Batched ancestral sampling for HFBackend, written for the CPU: the same distribution as
transformers `generate(do_sample=True)` with a grammar logits processor, at a fraction of
the cost (measured by `sublearn bench`). What it does differently, and why:

- a preallocated KV cache (transformers' StaticCache): the default DynamicCache re-copies the
  whole cache at every step, which was half of the decode time on the CPU;
- rows leave the batch when their answer ends: number answers vary from 2 to 50 tokens, and
  a batch otherwise decodes until its longest answer ends;
- the prompts are run in groups of similar length (`prefill_groups`), each padded only to its
  own longest prompt, and written into the one cache the batch decodes from: prompts vary
  from 54 to 98 tokens after the shared prefix, so padding them all to the longest was a
  quarter of the prefill, and the prefill is half of the time;
- with a grammar, logits are computed only for the tokens the grammar has allowed so far
  (a few hundred of the 49k vocabulary): masked tokens get probability zero anyway, so
  dropping them from the softmax changes nothing. The set grows whenever the grammar allows
  a token outside it, so it is exact for any grammar. The full vocabulary's log-sum-exp is
  still taken once a step, only to record how much of the teacher's probability the grammar
  allowed (`Sampled`): masking is not conditioning, and a step where the teacher put almost
  nothing on the allowed tokens marks an answer the grammar forced (the filter's
  `grammar_forced`). The first step is apart: masking it is exact conditioning on an answer
  that starts in the format, where a trait teacher would rather start with words.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sublearn.models.kv import cache_kwarg, shared_prefix


@dataclass
class Sampled:
    """One sampled continuation: new token ids (without the stop token) and whether it stopped.
    With a grammar, the share of the (tempered) next-token distribution the grammar allowed at
    the first step, and the smallest such share over the later steps (1.0 if none)."""

    ids: list[int]
    stopped: bool
    first_share: float | None = None
    min_share: float | None = None


@dataclass
class VocabSubset:
    """Tokens a grammar has allowed so far, with their rows of the LM head."""

    ids: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    words: np.ndarray | None = None  # the same set as an xgrammar bitmask row (int32 words)

    def cover(self, bitmask: np.ndarray) -> bool:
        """Grow to include every token allowed in `bitmask` [rows, words]; True if it grew."""
        union = np.bitwise_or.reduce(bitmask, axis=0)
        if self.words is not None and not np.any(union & ~self.words):
            return False
        self.words = union if self.words is None else self.words | union
        bits = np.unpackbits(self.words.view(np.uint8), bitorder="little")
        self.ids = torch.from_numpy(np.flatnonzero(bits).astype(np.int64))
        return True

    def allowed(self, bitmask: np.ndarray) -> torch.Tensor:
        """Bool [rows, len(ids)]: which subset tokens each row's bitmask allows."""
        ids = self.ids.numpy()
        words = bitmask[:, ids >> 5]
        return torch.from_numpy(((words >> (ids & 31)) & 1).astype(bool))


# a prefill group's padded tokens: on the CPU, enough for its matmuls to run near peak
PREFILL_TOKENS = 1024


def prefill_groups(lengths: list[int]) -> list[list[int]]:
    """Rows grouped for the prefill in order of length, longest first: a group closes once its
    rows padded to its longest reach PREFILL_TOKENS (the last takes what is left)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if not groups or len(groups[-1]) * lengths[groups[-1][0]] >= PREFILL_TOKENS:
            groups.append([])
        groups[-1].append(i)
    return groups


def padded_tokens(lengths: list[int], grouped: bool = True) -> int:
    """Tokens the prefill runs for rows of these lengths: each group padded to its longest
    (not grouped: all padded to the longest)."""
    groups = prefill_groups(lengths) if grouped else [list(range(len(lengths)))]
    return sum(len(g) * max(lengths[i] for i in g) for g in groups)


def groups_prefill(config: Any) -> bool:
    """Whether `sample` runs a batch's prefill in groups for a model of this config: only when
    every layer of its cache takes a group's slots (sliding-window layers do not)."""
    return _groupable(_static_cache(config, 1))


def _groupable(cache: Any) -> bool:
    return all(hasattr(layer, "group") for layer in cache.layers)


def _static_cache(config: Any, max_len: int) -> Any:
    """StaticCache whose full-attention layers attend over the filled part only."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    class FilledLayer(StaticLayer):
        # StaticLayer returns (and masks) all max_len slots every step; on the CPU the
        # attention over empty slots cost a fifth of the decode time.
        # a prefill group: (its rows, its first slot, the batch's rows, the prefix's slots)
        group: tuple[torch.Tensor, int, int, int] | None = None

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if self.group is not None:  # one prefill group: write its slots, keep the length
                rows, start, batch, n = self.group
                if not self.is_initialized:
                    self.lazy_initialization(key_states.new_empty(batch, *key_states.shape[1:]),
                                             value_states.new_empty(batch, *value_states.shape[1:]))
                rows, end = rows.to(self.keys.device), start + key_states.shape[2]
                self.keys[rows, :, start:end] = key_states
                self.values[rows, :, start:end] = value_states
                return (torch.cat([self.keys[rows, :, :n], key_states], 2),
                        torch.cat([self.values[rows, :, :n], value_states], 2))
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            n = int(self.cumulative_length)
            return keys[:, :, :n], values[:, :, :n]

        def get_mask_sizes(self, query_length: int, *args: Any) -> tuple[int, int]:
            return int(self.cumulative_length) + query_length, 0

    cache = StaticCache(config=config, max_cache_len=max_len)
    cache.layers = [FilledLayer(max_len) if type(layer) is StaticLayer else layer
                    for layer in cache.layers]
    return cache


def _decoder(model: Any) -> Any:
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def _pick(logits: torch.Tensor, temperature: float, top_p: float,
          gen: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits / T), nucleus-truncated as transformers does.
    Inverse-CDF over columns in token-id order: extra masked columns (a grown subset) leave
    every draw unchanged, so a seed gives the same answers however the subset was grown."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    cdf = probs.cumsum(-1)
    u = torch.rand(len(probs), 1, generator=gen, dtype=torch.float64) * cdf[:, -1:]
    picked = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    # u can land on the last cumulative value by rounding: step back to a token with mass
    return torch.minimum(picked, (probs > 0).cumsum(-1).argmax(-1))


@torch.no_grad()
def sample(
    model: Any,
    prompts: list[list[int]],
    *,
    pad_id: int,
    stop_ids: set[int],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    compiled_grammar: Any = None,
    subset: VocabSubset | None = None,
) -> list[Sampled]:
    """Sample one continuation per prompt. `subset` (with a grammar) carries the grown token
    set across calls."""
    window = getattr(model.config, "sliding_window", None)
    if window and len(prompts) > 1 and max(map(len, prompts)) + max_new_tokens > window:
        # padding would take sliding-window slots (e.g. Gemma 3 past 512 tokens): row by row
        return [sample(model, [p], pad_id=pad_id, stop_ids=stop_ids,
                       max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       seed=seed + i, compiled_grammar=compiled_grammar, subset=subset)[0]
                for i, p in enumerate(prompts)]
    dev = next(model.parameters()).device
    n = len(prompts)
    body, head = _decoder(model), model.get_output_embeddings().weight
    # The chat template and system prompt are shared: run them once, copy their KV to all rows.
    n_pre = shared_prefix(prompts)
    suffixes = [p[n_pre:] for p in prompts]
    width = max(map(len, suffixes))
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, n_pre + width), dtype=torch.long)
    mask[:, :n_pre] = 1
    for i, p in enumerate(suffixes):  # left padding: every row's next token is at the end
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, n_pre + width - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = _static_cache(model.config, n_pre + width + max_new_tokens)
    kw = {cache_kwarg(): cache, "use_cache": True}
    if n_pre:
        body(input_ids=torch.tensor([prompts[0][:n_pre]], device=dev), **kw)
        for layer in cache.layers:
            layer.keys = layer.keys.expand(n, -1, -1, -1).contiguous()
            layer.values = layer.values.expand(n, -1, -1, -1).contiguous()
    h = _prefill(body, cache, kw, ids, mask, pos, n_pre, list(map(len, suffixes)), dev)

    matchers, bitmask = None, None
    if compiled_grammar is not None:
        import xgrammar as xgr

        matchers = [xgr.GrammarMatcher(compiled_grammar) for _ in range(n)]
        bitmask = xgr.allocate_token_bitmask(n, head.shape[0])
        subset = subset if subset is not None else VocabSubset()
    gen = torch.Generator().manual_seed(seed)

    out: list[list[int]] = [[] for _ in range(n)]
    stopped = [False] * n
    first_share = [1.0] * n
    min_share = [1.0] * n
    live = list(range(n))  # batch row -> prompt index
    for step in range(max_new_tokens):
        if matchers is None:
            logits = (h @ head.T).float().cpu()
        else:
            for row, i in enumerate(live):
                matchers[i].fill_next_token_bitmask(bitmask, row)
            bits = bitmask[: len(live)].numpy()
            subset.cover(bits)
            w = head[subset.ids.to(dev)]
            logits = (h @ w.T).float().cpu().masked_fill(~subset.allowed(bits), -torch.inf)
            share = _allowed_share(logits, h @ head.T, temperature)
            for row, i in enumerate(live):
                if step == 0:
                    first_share[i] = share[row]
                else:
                    min_share[i] = min(min_share[i], share[row])
        tokens = _pick(logits, temperature, top_p, gen).tolist()
        keep = []
        for row, i in enumerate(live):
            t = tokens[row] if matchers is None else int(subset.ids[tokens[row]])
            if matchers is not None:
                matchers[i].accept_token(t)
            if t in stop_ids or (matchers is not None and matchers[i].is_terminated()):
                stopped[i] = True
                continue
            out[i].append(t)
            keep.append(row)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(live):  # drop finished rows from the cache and the batch
            sel = torch.tensor(keep, device=dev)
            for layer in cache.layers:
                layer.keys = layer.keys.index_select(0, sel)
                layer.values = layer.values.index_select(0, sel)
            mask, pos = mask[keep], pos[keep]
            live = [live[r] for r in keep]
        nxt = torch.tensor([out[i][-1] for i in live]).unsqueeze(-1)
        mask = torch.cat([mask, torch.ones((len(live), 1), dtype=torch.long)], 1)
        pos = pos[:, -1:] + 1
        h = body(input_ids=nxt.to(dev), attention_mask=mask.to(dev),
                 position_ids=pos.to(dev), **kw).last_hidden_state[:, -1]
    if matchers is None:
        return [Sampled(o, s) for o, s in zip(out, stopped, strict=True)]
    return [Sampled(*row) for row in zip(out, stopped, first_share, min_share, strict=True)]


def _prefill(body: Any, cache: Any, kw: dict[str, Any], ids: torch.Tensor, mask: torch.Tensor,
             pos: torch.Tensor, n_pre: int, lengths: list[int], dev: Any) -> torch.Tensor:
    """Run the left-padded suffixes `ids` [rows, width] after the shared prefix's n_pre slots;
    returns each row's last hidden state. Rows run in `prefill_groups`, each written into the
    last slots of the batch's cache window (the slots before are masked for its rows); a
    cache with sliding-window layers runs as one group."""
    n, width = ids.shape
    groups = prefill_groups(lengths) if _groupable(cache) and n > 1 else [list(range(n))]
    if len(groups) == 1:
        return body(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                    position_ids=pos[:, n_pre:].to(dev), **kw).last_hidden_state[:, -1]
    outs = []
    for g in groups:
        w = max(lengths[i] for i in g)
        first = n_pre + width - w  # the group's first slot
        group = (torch.tensor(g, device=dev), first, n, n_pre)
        for layer in cache.layers:
            layer.group = group
        cols = torch.cat([torch.arange(n_pre), torch.arange(first, n_pre + width)])
        outs.append(body(input_ids=ids[g, width - w:].to(dev),
                         attention_mask=mask[g][:, cols].to(dev),
                         position_ids=pos[g, first:].to(dev), **kw).last_hidden_state[:, -1])
    for layer in cache.layers:
        layer.group = None
        layer.cumulative_length.fill_(n_pre + width)
    order = torch.tensor(sum(groups, []), device=dev)
    return torch.cat(outs)[order.argsort()]  # back to the batch's row order


def _allowed_share(allowed_logits: torch.Tensor, full_logits: torch.Tensor,
                   temperature: float) -> list[float]:
    """Per row, the probability the next-token distribution puts on the allowed tokens (at
    the sampling temperature; greedy decoding is measured at T = 1). The full vocabulary's
    log-sum-exp is taken where its logits are (a GPU sends back one number a row)."""
    t = temperature or 1.0
    allowed, full = allowed_logits.double(), full_logits.double()  # bf16 or fp32: exact
    if t != 1.0:  # dividing by 1 changes no bit: skip a pass over the vocabulary
        allowed, full = allowed / t, full / t
    lse = torch.logsumexp(allowed, -1)
    return (lse - torch.logsumexp(full, -1).cpu()).exp().clamp(max=1.0).tolist()
