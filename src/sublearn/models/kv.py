"""KV-cache helpers shared by sampling (`backends.hf_decode`), evaluation and the bench: the
shared-prefix rule and the name transformers gives the cache argument. They live with the
models, below every stage, so no stage imports another for them."""

from __future__ import annotations

import os

MIN_SHARED_PREFIX = 8  # below this, running the prefix apart costs more than it saves


def shared_prefix(prompts: list[list[int]], min_len: int = MIN_SHARED_PREFIX) -> int:
    """Tokens at the head of every prompt worth running once and sharing: the common prefix,
    less one token per row (each row's own last token gives the logits that predict what
    follows), or 0 when shorter than `min_len` or when there is only one prompt."""
    if len(prompts) < 2:
        return 0
    n = min(len(os.path.commonprefix(prompts)), min(map(len, prompts)) - 1)
    return n if n >= min_len else 0


def cache_kwarg() -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); use whichever it has."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
