"""Local transformers backend: batched sampling with optional grammar constraints (xgrammar)."""

from __future__ import annotations

import copy
from typing import Any

import torch

from sublearn.backends.base import ChatRequest, Completion, SamplingParams
from sublearn.backends.hf_decode import VocabSubset, sample
from sublearn.models import load_model
from sublearn.models.dtype import settle_dtype


class HFBackend:
    """A transformers causal LM sampled by `hf_decode.sample`. dtype "bfloat16" runs a bf16
    copy of the weights (AMX on recent CPUs; `sublearn bench` reports the KL to fp32); "auto"
    is bfloat16 where the CPU multiplies it natively, float32 elsewhere (`models.dtype`)."""

    enforces_grammar = True

    def __init__(
        self,
        model: str | None,
        dtype: str = "auto",
        batch_size: int = 64,
        loaded: Any = None,
    ) -> None:
        dtype = settle_dtype(dtype)
        self.lm = loaded or load_model(model, dtype=dtype)
        self.model_id = self.lm.model_id
        self.dtype = dtype
        self.batch_size = batch_size
        self.tok = self.lm.tokenizer
        want = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        model_dtype = next(self.lm.model.parameters()).dtype
        # a model shared with fp32 stages (bench, tests) gets its own bf16 copy
        self.model = self.lm.model if model_dtype == want else copy.deepcopy(self.lm.model).to(want)
        self._compiled: dict[str, Any] = {}
        self._subsets: dict[str, VocabSubset] = {}

    def _grammar(self, ebnf: str) -> Any:
        if ebnf not in self._compiled:
            import xgrammar as xgr

            vocab = self.model.get_output_embeddings().weight.shape[0]
            info = xgr.TokenizerInfo.from_huggingface(self.tok, vocab_size=vocab)
            self._compiled[ebnf] = xgr.GrammarCompiler(info).compile_grammar(ebnf)
            self._subsets[ebnf] = VocabSubset()
        return self._compiled[ebnf]

    def prompt_texts(self, requests: list[ChatRequest]) -> list[str]:
        return [
            self.tok.apply_chat_template(r.messages(), tokenize=False, add_generation_prompt=True)
            for r in requests
        ]

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
        prompts = [tok(t, add_special_tokens=False).input_ids for t in self.prompt_texts(requests)]
        grammar = self._grammar(params.grammar) if params.grammar else None
        rows = sample(
            self.model,
            prompts,
            pad_id=tok.pad_token_id,
            stop_ids={tok.convert_tokens_to_ids(tok.eos_token)},
            max_new_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=seed,
            compiled_grammar=grammar,
            subset=self._subsets.get(params.grammar) if params.grammar else None,
        )
        return [
            Completion(
                text=tok.decode(r.ids, skip_special_tokens=True),
                n_tokens=len(r.ids),
                finish_reason="stop" if r.stopped else "length",
                grammar_share_first=r.first_share,
                grammar_share_min=r.min_share,
            )
            for r in rows
        ]
