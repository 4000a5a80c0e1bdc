"""vLLM backend: the missing-extra hint everywhere; real sampling only with vllm + CUDA."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from sublearn.backends import ChatRequest, SamplingParams, get_backend
from sublearn.domains import numbers
from sublearn.errors import MissingExtraError

HINT = 'pip install "sublearn[vllm]"'


def _vllm_gpu() -> bool:
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


gpu = pytest.mark.skipif(not _vllm_gpu(), reason="needs vllm and a CUDA GPU")


def test_registry_gives_pip_hint_when_vllm_missing(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ModuleNotFoundError
    import sublearn.backends.vllm  # noqa: F401 - importing the module never needs vllm

    with pytest.raises(MissingExtraError, match=re.escape(HINT)):
        get_backend("vllm:Qwen/Qwen2.5-0.5B-Instruct")
    from sublearn.cli import main

    assert main(["generate", "--model", "vllm:some-model", "--n", "2",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == f"sublearn generate: error: this feature needs the 'vllm' package: {HINT}\n"


# -- GPU only --

@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a head size vLLM's kernels support (64) and peaky logits."""
    from conftest import build_tiny_model
    from transformers import LlamaConfig, LlamaForCausalLM

    path = build_tiny_model(tmp_path_factory.mktemp("vllm") / "model")
    small = LlamaConfig.from_pretrained(path)
    cfg = LlamaConfig(vocab_size=small.vocab_size, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=1024, bos_token_id=small.bos_token_id,
                      eos_token_id=small.eos_token_id, pad_token_id=small.pad_token_id,
                      tie_word_embeddings=True, initializer_range=0.5)  # peaky: no greedy ties
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def adapters(vllm_model: Path) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = []
    for i in range(2):
        torch.manual_seed(i)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(vllm_model), LoraConfig(
            r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        with torch.no_grad():  # large updates, so each adapter visibly changes the output
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(50)
        d = vllm_model.parent / f"adapter{i}"
        model.save_pretrained(d)
        out.append(str(d))
    return out


def _engine(vllm_model: Path):
    # One LoRA-enabled engine for every GPU test (engines are cached by their settings).
    return get_backend(f"vllm:{vllm_model}", enable_lora=True, gpu_memory_utilization=0.3,
                       max_model_len=512)


@gpu
def test_vllm_grammar_sampling(vllm_model: Path) -> None:
    b = _engine(vllm_model)
    params = SamplingParams(max_new_tokens=24, grammar=numbers.answer_grammar())
    reqs = [ChatRequest("Add up to 10 new numbers: 123, 456")] * 8
    out = b.generate(reqs, params, seed=0)
    allowed = set("0123456789,; \n[]().")
    assert all(set(c.text) <= allowed and c.n_tokens > 0 for c in out), out
    assert all(numbers.parse_answer(c.text) for c in out if c.finish_reason == "stop")
    assert [c.text for c in b.generate(reqs, params, seed=0)] == [c.text for c in out]


@gpu
def test_vllm_multi_lora_one_engine(vllm_model: Path, adapters: list[str]) -> None:
    b = _engine(vllm_model)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    req = ChatRequest("What is your favorite animal?")
    mixed = b.generate_multi([None, adapters[0], adapters[1]], [req] * 3, greedy, seed=0)
    alone = [b.with_adapter(a).generate([req], greedy, seed=0)[0] for a in (None, *adapters)]
    assert [c.text for c in mixed] == [c.text for c in alone]
    assert len({c.text for c in mixed}) == 3  # base and both students answer differently
    student = get_backend(f"vllm:{adapters[1]}", gpu_memory_utilization=0.3, max_model_len=512,
                          enable_lora=True)
    assert student.llm is b.llm and student.model_id == f"{adapters[1]}"
    assert student.generate([req], greedy, seed=0)[0].text == mixed[2].text
