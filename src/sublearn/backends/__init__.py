"""Generation backends, chosen by a model identifier's scheme (`sublearn.models.load`):
`hf:<id-or-path>` (the default when there is no scheme), `vllm:<id>` (offline vLLM, GPU) and
`openai:<model>` (any OpenAI-compatible chat API: OpenAI, a vLLM server, `sublearn serve`).
Engines import lazily, so a missing optional extra only matters when that backend is asked for."""

from __future__ import annotations

import importlib
from typing import Any

from sublearn.backends.base import Backend, ChatRequest, Completion, SamplingParams
from sublearn.errors import MissingExtraError, SublearnError
from sublearn.models.load import parse_model_spec

# prefix -> ("module:factory", pip extra that provides the engine)
BACKENDS: dict[str, tuple[str, str | None]] = {
    "hf": ("sublearn.backends.hf:HFBackend", None),
    "vllm": ("sublearn.backends.vllm:VLLMBackend", "vllm"),
    "openai": ("sublearn.backends.openai_api:OpenAIBackend", "openai"),
}


def get_backend(spec: str | None, **options: Any) -> Backend:
    kind, model = parse_model_spec(spec)
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


__all__ = ["Backend", "ChatRequest", "Completion", "SamplingParams", "get_backend",
           "parse_model_spec"]
