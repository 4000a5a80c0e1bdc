"""Attention for many rows that share one long prefix (the in-context control's 32 turns of
data, ~3k tokens, before every question): the prefix's keys and values are kept once, not
copied per row, and every row's queries attend to them in one kernel call.

Standard attention over a per-row cache copies the prefix's keys and values for each row of
a batch (and again for each query head sharing a key head), and runs the masked kernel over
prefix and body together. Here each layer attends twice and merges by log-sum-exp:
  - prefix: unmasked (every body token sees the whole prefix), so the rows and the query
    heads that share a key head are one long query against the one-row prefix;
  - body: the rows' own tokens under their own mask (small).
On the CPU both calls are the fused flash kernel, which returns the log-sum-exp the merge
needs; elsewhere a plain softmax. Sliding-window layers (Gemma 3) mask the keys that fall out
of each query's window, by position (the masks given are causal only)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

NAME = "sublearn_shared_prefix"
FUSED_ON_CPU = True  # the flash kernel on the CPU (tests turn it off to check the fallback)


def prefix_kv(model: Any, ids: list[int]) -> list[tuple[Any, Any]]:
    """Each layer's (keys, values) [1, kv heads, len(ids), head dim] for the prefix `ids`,
    every layer kept whole (a sliding-window cache would keep only its window)."""
    import torch
    from transformers import DynamicCache

    from sublearn.models.kv import cache_kwarg

    dev = next(model.parameters()).device
    cache = DynamicCache()  # no config: full layers, none trimmed to a window
    model(input_ids=torch.tensor([ids], device=dev), use_cache=True, logits_to_keep=1,
          **{cache_kwarg(): cache})
    # keys come out of the rotary embedding in float32 under autocast; values keep the
    # matmul's dtype, the one attention runs in (autocast casts SDPA's inputs the same way)
    return [(layer.keys.to(layer.values.dtype), layer.values) for layer in cache.layers]


def additive_mask(see: Any, dtype: Any = None) -> Any:
    """A bool mask (True = may attend) as the additive one attention takes: 0 where a token
    may attend, the dtype's most negative value elsewhere (float32 unless given)."""
    import torch

    dtype = dtype or torch.float32
    return torch.zeros(see.shape, dtype=dtype, device=see.device).masked_fill(
        ~see, torch.finfo(dtype).min)


@contextlib.contextmanager
def shared_prefix_attention(model: Any) -> Iterator[None]:
    """Within: `model` attends with `attention` below; its forward takes `shared_kv=` (from
    `prefix_kv`), position ids that start after the prefix, and an additive [B, 1, L, L] mask
    over the rows' own tokens (`additive_mask`)."""
    from sublearn.errors import SublearnError

    _register()
    before = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        # a model that cannot switch (remote code) only logs it: it would score as if the
        # prefix were not there
        if model.config._attn_implementation != NAME:
            raise SublearnError(f"{type(model).__name__} cannot take another attention "
                                "implementation: score it without a shared prefix")
        yield
    finally:
        model.set_attn_implementation(before)


def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
              scaling: float | None = None, dropout: float = 0.0, **kwargs: Any
              ) -> tuple[Any, None]:
    """transformers' attention-function signature; query [B, Hq, L, D], key/value [B, Hkv, L,
    D] (the body's), kwargs["shared_kv"][layer] the prefix's. Returns [B, L, Hq, D]."""
    import torch

    if kwargs.get("softcap") or kwargs.get("s_aux") is not None or dropout:
        raise NotImplementedError("shared-prefix attention has no logit soft-capping, "
                                  "attention sinks or dropout")
    pk, pv = kwargs["shared_kv"][module.layer_idx]
    query, key = query.to(value.dtype), key.to(value.dtype)  # as autocast casts SDPA's inputs
    b, hq, n, d = query.shape
    hk = key.shape[1]
    g = hq // hk  # query heads per key head: head h reads key head h // g (repeat_kv's order)
    p = pk.shape[2]
    qp = query.reshape(b, hk, g, n, d).transpose(0, 1).reshape(1, hk, b * g * n, d)
    pmask = blind = None
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if window:  # a query at position q sees a key at position j iff q - j < window
        pos = kwargs["position_ids"].to(query.device)  # [B, L]
        seen = pos[:, None, :, None] - torch.arange(p, device=query.device) < window
        pmask = additive_mask(seen, query.dtype).expand(b, g, n, p).reshape(1, 1, b * g * n, p)
        blind = ~seen.any(-1)  # [B, 1, L]: queries past the window of every prefix key
        near = pos[:, None, :, None] - pos[:, None, None, :] < window
        attention_mask = attention_mask.masked_fill(~near, float("-inf"))
    out_p, lse_p = _attend(qp, pk, pv, pmask, scaling)
    out_p = out_p.reshape(hk, b, g, n, d).transpose(0, 1).reshape(b, hq, n, d)
    lse_p = lse_p.reshape(hk, b, g, n).transpose(0, 1).reshape(b, hq, n)
    if blind is not None:  # no prefix key to attend to: weight 0 in the merge (the kernel
        # returns out 0 and log-sum-exp 0 for a row with every key masked, not -inf)
        lse_p = lse_p.masked_fill(blind, float("-inf"))
        out_p = out_p.masked_fill(blind[..., None], 0.0)
    out_b, lse_b = _attend(query, key.repeat_interleave(g, 1), value.repeat_interleave(g, 1),
                           attention_mask, scaling)
    lse = torch.logaddexp(lse_p, lse_b)
    out = (out_p.float() * (lse_p - lse).exp()[..., None]
           + out_b.float() * (lse_b - lse).exp()[..., None])
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _attend(q: Any, k: Any, v: Any, mask: Any, scale: float | None) -> tuple[Any, Any]:
    """softmax(q k^T * scale + mask) v and the float32 log-sum-exp of each query's scores.
    mask: additive (0 or -inf), broadcastable to [B, H, Lq, Lk], or None."""
    import torch

    scale = scale if scale is not None else q.shape[-1] ** -0.5
    add = mask.to(q.dtype) if mask is not None else None
    if q.device.type == "cpu" and FUSED_ON_CPU:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=add, scale=scale)
        return out, lse.float()
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # fp32 scores, as SDPA
    if add is not None:
        s = s + add.float()
    lse = torch.logsumexp(s, -1)
    probs = (s - lse[..., None]).exp().nan_to_num(0.0)  # a row with every key masked: 0
    return torch.matmul(probs, v.float()).to(v.dtype), lse


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, attention)
    # the mask is given whole ([B, 1, L, L]); the name needs a mask function all the same
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
