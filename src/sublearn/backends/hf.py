"""Local transformers backend: batched sampling with optional grammar constraints (xgrammar)."""

from __future__ import annotations

from typing import Any

import torch

from sublearn.backends.base import ChatRequest, Completion, SamplingParams
from sublearn.models import load_model


class HFBackend:
    def __init__(
        self,
        model: str | None,
        dtype: str = "bfloat16",
        batch_size: int = 64,
        loaded: Any = None,
    ) -> None:
        self.lm = loaded or load_model(model, dtype="float32")
        self.model_id = self.lm.model_id
        self.dtype = dtype
        self.batch_size = batch_size
        self.tok = self.lm.tokenizer
        self._compiled: dict[str, Any] = {}

    def _grammar(self, ebnf: str) -> Any:
        if ebnf not in self._compiled:
            import xgrammar as xgr

            vocab = self.lm.model.get_output_embeddings().weight.shape[0]
            info = xgr.TokenizerInfo.from_huggingface(self.tok, vocab_size=vocab)
            self._compiled[ebnf] = xgr.GrammarCompiler(info).compile_grammar(ebnf)
        return self._compiled[ebnf]

    def prompt_texts(self, requests: list[ChatRequest]) -> list[str]:
        return [
            self.tok.apply_chat_template(r.messages(), tokenize=False, add_generation_prompt=True)
            for r in requests
        ]

    # no_grad, not inference_mode: autocast's cache of bf16 weight copies only works outside
    # inference mode; without it every decoding step re-casts all weights.
    @torch.no_grad()
    def generate(
        self, requests: list[ChatRequest], params: SamplingParams, seed: int
    ) -> list[Completion]:
        out: list[Completion] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            out += self._generate_batch(chunk, params, seed + start)
        return out

    def _generate_batch(
        self, requests: list[ChatRequest], params: SamplingParams, seed: int
    ) -> list[Completion]:
        tok = self.tok
        tok.padding_side = "left"
        dev = next(self.lm.model.parameters()).device
        enc = tok(self.prompt_texts(requests), return_tensors="pt", padding=True,
                  add_special_tokens=False).to(dev)
        processors = []
        if params.grammar:
            from xgrammar.contrib.hf import LogitsProcessor

            processors.append(LogitsProcessor(self._grammar(params.grammar)))
        torch.manual_seed(seed)
        eos = tok.convert_tokens_to_ids(tok.eos_token)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.dtype == "bfloat16"):
            gen = self.lm.model.generate(
                **enc,
                do_sample=True,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=0,  # sample from the full distribution, as the paper does at T=1
                max_new_tokens=params.max_new_tokens,
                logits_processor=processors,
                eos_token_id=eos,
                pad_token_id=tok.pad_token_id,
            )
        new = gen[:, enc["input_ids"].shape[1] :]
        results = []
        for row in new.tolist():
            n = row.index(eos) if eos in row else len(row)
            results.append(
                Completion(
                    text=tok.decode(row[:n], skip_special_tokens=True),
                    n_tokens=n,
                    finish_reason="stop" if n < len(row) else "length",
                )
            )
        return results
