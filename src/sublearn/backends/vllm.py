"""Offline vLLM backend (`vllm:<model>`): one GPU engine per base model, grammar-guided
sampling, and multi-LoRA so that many students (PEFT adapter folders) share one engine.

`vllm:<adapter folder>` loads the adapter's base model with LoRA enabled and samples through
the adapter; `VLLMBackend.with_adapter(path)` or `generate_multi` reuse the same engine for
other students. Engines are cached per process by their settings, because loading one takes
tens of seconds and GPU memory for a second copy usually does not exist.

vLLM is imported inside methods only: importing this module never needs it (nor a GPU).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sublearn.backends.base import ChatRequest, Completion, SamplingParams
from sublearn.errors import MissingExtraError, SublearnError


@dataclass(frozen=True)
class EngineSettings:
    base: str  # resolved path or hub id of the base model
    dtype: str = "bfloat16"
    enable_lora: bool = False
    max_loras: int = 8  # adapters resident on the GPU at once (more are swapped in)
    max_lora_rank: int = 64
    gpu_memory_utilization: float = 0.85
    max_model_len: int | None = None  # None: the model's own context length


_ENGINES: dict[EngineSettings, Any] = {}
_LORA_IDS: dict[tuple[EngineSettings, str], int] = {}
_LOCK = threading.Lock()


def _require_vllm() -> Any:
    try:
        import vllm
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "vllm":
            raise MissingExtraError("vllm", "vllm") from None
        raise
    return vllm


def _engine(s: EngineSettings) -> Any:
    with _LOCK:
        if s not in _ENGINES:
            vllm = _require_vllm()
            kw: dict[str, Any] = {"model": s.base, "dtype": s.dtype,
                                  "gpu_memory_utilization": s.gpu_memory_utilization}
            if s.max_model_len:
                kw["max_model_len"] = s.max_model_len
            if s.enable_lora:
                kw.update(enable_lora=True, max_loras=s.max_loras, max_lora_rank=s.max_lora_rank)
            _ENGINES[s] = vllm.LLM(**kw)
        return _ENGINES[s]


def _adapter_config(path: str | Path) -> dict[str, Any] | None:
    cfg = Path(path) / "adapter_config.json"
    return json.loads(cfg.read_text()) if cfg.is_file() else None


def _guided(grammar: str) -> dict[str, Any]:
    """Grammar-constrained sampling kwargs across vLLM versions (structured_outputs replaced
    guided_decoding in 0.10.2; the old name is gone in 0.12)."""
    import vllm.sampling_params as sp

    if hasattr(sp, "StructuredOutputsParams"):
        return {"structured_outputs": sp.StructuredOutputsParams(grammar=grammar)}
    return {"guided_decoding": sp.GuidedDecodingParams(grammar=grammar)}


class VLLMBackend:
    def __init__(self, model: str | None, dtype: str = "bfloat16", batch_size: int | None = None,
                 enable_lora: bool | None = None, max_loras: int = 8, max_lora_rank: int = 64,
                 gpu_memory_utilization: float = 0.85, max_model_len: int | None = None) -> None:
        # batch_size is accepted for the stage interface; vLLM schedules its own batches.
        from sublearn.models.load import DEFAULT_MODEL, resolve_model_path

        _require_vllm()
        self.model_id = model or DEFAULT_MODEL
        path = resolve_model_path(self.model_id)
        adapter = _adapter_config(path)
        base = path
        if adapter is not None:
            base = resolve_model_path(adapter["base_model_name_or_path"])
            max_lora_rank = max(max_lora_rank, int(adapter.get("r", 0)))
        self.settings = EngineSettings(
            base=base, dtype=dtype, enable_lora=bool(enable_lora or adapter is not None),
            max_loras=max_loras, max_lora_rank=max_lora_rank,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len)
        self.llm = _engine(self.settings)
        self.adapter = path if adapter is not None else None

    def with_adapter(self, adapter: str | None) -> VLLMBackend:
        """The same engine sampling through another LoRA adapter (None = the base model)."""
        if adapter is not None and not self.settings.enable_lora:
            raise SublearnError("this vLLM engine was started without LoRA: create it with "
                                "enable_lora=True to evaluate adapters on it")
        view = object.__new__(VLLMBackend)
        view.__dict__.update(self.__dict__)
        view.adapter = str(adapter) if adapter is not None else None
        view.model_id = str(adapter) if adapter is not None else self.settings.base
        return view

    def _lora(self, adapter: str | None) -> Any:
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        cfg = _adapter_config(adapter)
        if cfg is None:
            raise SublearnError(f"{adapter} is not a PEFT adapter folder")
        if int(cfg.get("r", 0)) > self.settings.max_lora_rank:
            raise SublearnError(f"{adapter} has LoRA rank {cfg['r']} > the engine's "
                                f"max_lora_rank {self.settings.max_lora_rank}")
        with _LOCK:  # one stable integer id per adapter and engine
            key = (self.settings, str(Path(adapter).resolve()))
            lora_id = _LORA_IDS.setdefault(key, len(_LORA_IDS) + 1)
        return LoRARequest(f"adapter-{lora_id}", lora_id, key[1])

    def generate(self, requests: list[ChatRequest], params: SamplingParams,
                 seed: int) -> list[Completion]:
        return self.generate_multi([self.adapter] * len(requests), requests, params, seed)

    def generate_multi(self, adapters: list[str | None], requests: list[ChatRequest],
                       params: SamplingParams, seed: int) -> list[Completion]:
        """One engine call for requests that each name their adapter: many students at once."""
        from vllm import SamplingParams as VSamplingParams

        if len(adapters) != len(requests):
            raise ValueError("one adapter (or None) per request")
        tok = self.llm.get_tokenizer()
        # Our own chat template + token ids into generate(): per-prompt LoRA requests work in
        # LLM.generate in every vLLM version (not LLM.chat), and token ids avoid a second BOS
        # when the template already writes one (as HFBackend does: add_special_tokens=False).
        prompts = [
            {"prompt_token_ids": tok(tok.apply_chat_template(
                r.messages(), tokenize=False, add_generation_prompt=True),
                add_special_tokens=False)["input_ids"]}
            for r in requests
        ]
        guided = _guided(params.grammar) if params.grammar else {}
        sampling = [
            VSamplingParams(temperature=params.temperature, top_p=params.top_p,
                            max_tokens=params.max_new_tokens, seed=seed + i, **guided)
            for i in range(len(requests))
        ]
        loras = [self._lora(a) for a in adapters]
        outs = self.llm.generate(prompts, sampling, use_tqdm=False,
                                 lora_request=loras if any(loras) else None)
        results = []
        for o in outs:
            c = o.outputs[0]
            reason = c.finish_reason if c.finish_reason in ("stop", "length") else "stop"
            results.append(Completion(text=c.text, n_tokens=len(c.token_ids),
                                      finish_reason=reason))
        return results
