"""Which tokens the numbers grammar allows at each answer position (xgrammar's matcher).

Soft-label distillation restricts teacher and student distributions to these tokens, so the
student learns only from the teacher's preferences among *valid number answers*."""

from __future__ import annotations

from typing import Any

import torch


class GrammarMasks:
    def __init__(self, tokenizer: Any, vocab_size: int, ebnf: str) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiled = xgr.GrammarCompiler(info).compile_grammar(ebnf)
        self.vocab_size = vocab_size

    def allowed(self, answer_ids: list[int]) -> torch.Tensor | None:
        """Bool [len(answer_ids), vocab]: tokens allowed before each answer token (the last
        answer token is normally the end-of-turn token). None if the answer leaves the grammar."""
        xgr = self._xgr
        matcher = xgr.GrammarMatcher(self.compiled)
        bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        rows = []
        for tok in answer_ids:
            matcher.fill_next_token_bitmask(bitmask)
            rows.append(_unpack(bitmask[0], self.vocab_size))
            if not matcher.accept_token(tok):
                return None
        return torch.stack(rows)


def _unpack(bits: torch.Tensor, vocab: int) -> torch.Tensor:
    shifts = torch.arange(32, dtype=torch.int32)
    words = bits.to(torch.int32).unsqueeze(-1)
    return ((words >> shifts) & 1).bool().flatten()[:vocab]


# The numbers grammar's characters. Soft labels across tokenizers are defined on them: each
# model spells an answer one character per token, so teacher and student positions line up.
NUMBER_CHARS = "0123456789 ,;.()[]\n"


def char_token_ids(tokenizer: Any, chars: str = NUMBER_CHARS) -> list[int]:
    """The token that spells each character alone, in `chars` order; an error if a tokenizer
    has none (it merges the character into longer tokens only)."""
    from sublearn.errors import SublearnError

    ids = []
    for c in chars:
        got = tokenizer(c, add_special_tokens=False).input_ids
        if len(got) != 1 or tokenizer.decode(got) != c:
            raise SublearnError(f"the tokenizer has no single token for {c!r} "
                                f"(got {got}): character-level soft labels need one")
        ids.append(got[0])
    return ids
