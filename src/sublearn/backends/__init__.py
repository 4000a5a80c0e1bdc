"""Generation backends, chosen by a model identifier: `hf/<id-or-path>` (default when no
prefix is given), `vllm/<id>` (offline vLLM, GPU) and `openai/<model>` (any OpenAI-compatible
chat API: OpenAI, a vLLM server, `sublearn serve`). Engines import lazily, so a missing
optional extra only matters when that backend is asked for."""

from __future__ import annotations

import importlib
from typing import Any

from sublearn.backends.base import Backend, ChatRequest, Completion, SamplingParams
from sublearn.errors import MissingExtraError, SublearnError

# prefix -> ("module:factory", pip extra that provides the engine)
BACKENDS: dict[str, tuple[str, str | None]] = {
    "hf": ("sublearn.backends.hf:HFBackend", None),
    "vllm": ("sublearn.backends.vllm:VLLMBackend", "vllm"),
    "openai": ("sublearn.backends.openai_api:OpenAIBackend", "openai"),
}


def split_model_spec(spec: str | None) -> tuple[str, str | None]:
    """'vllm/Qwen/Qwen2.5-7B' -> ('vllm', 'Qwen/Qwen2.5-7B'); a bare id or path -> ('hf', it)."""
    if spec:
        prefix, _, rest = spec.partition("/")
        if prefix in BACKENDS and rest:
            return prefix, rest
    return "hf", spec


def get_backend(spec: str | None, **options: Any) -> Backend:
    kind, model = split_model_spec(spec)
    target, extra = BACKENDS[kind]
    module_name, factory = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and not e.name.startswith("sublearn") and extra:
            raise MissingExtraError(e.name, extra) from None
        if e.name == module_name:
            raise SublearnError(f"backend '{kind}' is not available in this version") from None
        raise
    return getattr(module, factory)(model, **options)


__all__ = ["Backend", "ChatRequest", "Completion", "SamplingParams", "get_backend"]
