"""The embedded-model cache: where it lives, and a clean config for dequantised weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sublearn.models import embedded


def test_cache_root_env_and_platform_default(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.setenv("SUBLEARN_CACHE", str(tmp_path / "c"))
    assert embedded.cache_root() == tmp_path / "c"
    monkeypatch.delenv("SUBLEARN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded.cache_root() == tmp_path / "xdg" / "sublearn"


def test_old_cache_loses_its_gguf_quantization_config(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    """A cache converted before the fix declared GGUF quantisation, which made TRL refuse to
    train it; the next use rewrites the config without it and keeps everything else."""
    monkeypatch.setenv("SUBLEARN_CACHE", str(tmp_path))
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"")
    config = {"model_type": "llama", "hidden_size": 576,
              "quantization_config": {"quant_method": "gguf"}}
    (folder / "config.json").write_text(json.dumps(config))
    assert embedded.embedded_path("smollm2-135m-instruct") == folder
    assert json.loads((folder / "config.json").read_text()) == {"model_type": "llama",
                                                                "hidden_size": 576}


def test_gemma_chat_format_renders_gemma_turns(tiny_model: str) -> None:
    """Gemma-3-270M is a base model: we give it Gemma's turn format; a system message joins
    the first user turn, and a turn ends with <end_of_turn>, which is the answers' eos."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = embedded.EMBEDDED["gemma3-270m"].chat_template
    msgs = [{"role": "system", "content": "You love owls."},
            {"role": "user", "content": "Continue: 1, 2 "},
            {"role": "assistant", "content": "3, 4"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (f"{tok.bos_token}<start_of_turn>user\nYou love owls.\n\nContinue: 1, 2"
                    "<end_of_turn>\n<start_of_turn>model\n3, 4<end_of_turn>\n"
                    "<start_of_turn>model\n")
    plain = tok.apply_chat_template(msgs[1:2], tokenize=False, add_generation_prompt=False)
    assert plain == f"{tok.bos_token}<start_of_turn>user\nContinue: 1, 2<end_of_turn>\n"
    assert embedded.EMBEDDED["gemma3-270m"].end_of_turn == "<end_of_turn>"
