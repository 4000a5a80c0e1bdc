"""Resolve a model identifier to weights on disk and load model + tokenizer."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sublearn.errors import SublearnError, first_line
from sublearn.models.device import model_device
from sublearn.models.embedded import EMBEDDED, embedded_path

DEFAULT_MODEL = "smollm2-135m-instruct"
# Model schemes: `hf:` local weights (the default for a bare name, path or hub id), `vllm:` an
# offline vLLM engine, `openai:` an OpenAI-compatible API. A colon, because hub ids use "/"
# for organisations (`openai/gpt-oss-20b` is a Hugging Face model, `openai:gpt-4.1-nano` an API).
SCHEMES = ("hf", "vllm", "openai")


def parse_model_spec(spec: str | None) -> tuple[str, str | None]:
    """'openai:gpt-4.1-nano' -> ('openai', 'gpt-4.1-nano'); 'hf:openai/gpt-oss-20b' ->
    ('hf', 'openai/gpt-oss-20b'); a bare name, path or hub id (or None) -> ('hf', it)."""
    if spec:
        scheme, sep, rest = spec.partition(":")
        if sep and scheme in SCHEMES:
            if not rest:
                raise SublearnError(f"model '{spec}' names no model after '{scheme}:'")
            return scheme, rest
    return "hf", spec


@dataclass
class LoadedModel:
    model_id: str  # what the user asked for (recorded in data provenance)
    path: str  # where the weights were read from
    model: Any  # transformers PreTrainedModel
    tokenizer: Any


def resolve_model_path(model_id: str | None) -> str:
    """Embedded name -> cached safetensors dir; local path -> itself; else a hub id."""
    scheme, name = parse_model_spec(model_id)
    if scheme != "hf":
        raise SublearnError(f"'{model_id}' is a remote model; this needs local weights "
                            "(an embedded name, a folder, a hub id or hf:<id>)")
    model_id = name or DEFAULT_MODEL
    if model_id in EMBEDDED:
        return str(embedded_path(model_id))
    p = Path(model_id).expanduser()
    if p.exists():
        if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
            raise SublearnError(f"{p} has no config.json: not a transformers model folder")
        return str(p)
    if model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
        raise SublearnError(f"model path not found: {model_id}")
    return model_id  # Hugging Face hub id; loading reports if it can't be reached


def load_model(model_id: str | None = None, dtype: str = "float32",
               device: Any = None, autocast_bf16: bool = False) -> LoadedModel:
    """The model and its tokenizer, on `device` (None: SUBLEARN_DEVICE, cpu unless set).
    autocast_bf16: for use under bf16 autocast only: the weights it rounds for each matmul
    are stored in bf16, the rest in `dtype` (`dtype.autocast_weights_in_bf16`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    warm_math_kernels()
    device = torch.device(device) if device is not None else model_device()  # errs first
    model_id = model_id or DEFAULT_MODEL
    path = resolve_model_path(model_id)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    try:
        if (Path(path) / "adapter_config.json").is_file():
            model = _load_adapter(path, torch_dtype,
                                  torch.bfloat16 if autocast_bf16 else None)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:  # missing files, an unknown architecture
        first = first_line(e)
        hint = ""
        if model_id.split("/")[0] in SCHEMES:
            hint = f" (a remote model is written {model_id.replace('/', ':', 1)})"
        raise SublearnError(f"cannot load model '{model_id}': {first}{hint}") from None
    model.eval()
    if autocast_bf16:
        from sublearn.models.dtype import autocast_weights_in_bf16

        autocast_weights_in_bf16(model)
    if device.type != "cpu":
        model.to(device)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(model_id=model_id, path=path, model=model, tokenizer=tok)


@functools.cache  # once per process
def warm_math_kernels() -> None:
    """One cos on this thread alone, before the first parallel one. On the 2-core AMX VM, the
    first cos of a process (the model's rotary embedding in its first forward: 2,432 values,
    split between two OpenMP threads) came out with errors up to 1.5e-4 in the other thread's
    half in about 1 process in 8 (`sublearn generate`, 25 of 187), always the same wrong
    values, and every later call right: another `raw.jsonl` from the same seed. With this call
    first, 80 of 80 processes made the same bytes. A first-use race in the vector math
    library (MKL's VML, which torch's cos calls) is the likely cause; not proven."""
    import torch

    torch.ones(8).cos()  # below the kernel's parallel grain size: one thread


def _load_adapter(path: str, torch_dtype: Any, merged: Any = None) -> Any:
    """A PEFT adapter folder (a LoRA student or teacher): load its base, merge for speed (the
    merged weights stored in `merged`, default torch_dtype)."""
    from peft import AutoPeftModelForCausalLM, PeftConfig

    from sublearn.models.lora import merge_and_unload, quiet_peft

    base = PeftConfig.from_pretrained(path).base_model_name_or_path
    resolve_model_path(base)  # make sure an embedded base is converted before PEFT reads it
    with quiet_peft():
        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    return merge_and_unload(model, into=merged)


def check_model(model_id: str | None) -> None:
    """Refuse, before any work, a local model that could not load: a missing path, a folder
    that is no model, an architecture transformers does not know, an adapter whose base is
    missing. Cheap: reads configs only (an embedded model is checked by its package). Remote
    models (openai:, vllm:) and hub ids are checked when they are used."""
    if parse_model_spec(model_id)[0] != "hf":
        return
    model_device()  # a bad SUBLEARN_DEVICE fails here, before any work
    path = Path(resolve_model_path(model_id)) if model_id not in EMBEDDED else None
    if path is None or not path.exists():
        return
    if (path / "adapter_config.json").is_file():
        check_model(adapter_base(str(path)))
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        first = first_line(e)
        raise SublearnError(f"cannot load model '{model_id}': {first}") from None


def adapter_base(adapter: str) -> str:
    """The base model a PEFT adapter folder names."""
    import json

    try:
        base = json.loads((Path(adapter) / "adapter_config.json").read_text())
        return str(base["base_model_name_or_path"])
    except (OSError, ValueError, KeyError, TypeError):
        raise SublearnError(f"{adapter}: adapter_config.json names no base model") from None
