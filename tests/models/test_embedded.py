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
