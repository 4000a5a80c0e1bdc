"""The training LoRA layer matches PEFT's, saves a stock PEFT adapter; length-grouped batches."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch

from sublearn.models import load_model
from sublearn.models.lora import AddmmLoraLinear, add_lora
from sublearn.pipeline.train import TrainConfig, batch_indices, epoch_batches


def _students(tiny_model: str) -> tuple[object, object, torch.Tensor]:
    """Our LoRA student and a stock PEFT one with the same (nonzero) adapter weights."""
    base = load_model(tiny_model).model
    torch.manual_seed(0)
    ours = add_lora(copy.deepcopy(base), 4, 8)
    stock = add_lora(copy.deepcopy(base), 4, 8, fast=False)
    with torch.no_grad():
        for (n, p), (m, q) in zip(ours.named_parameters(), stock.named_parameters(), strict=True):
            assert n == m
            if p.requires_grad:  # B starts at zero: give the update something to do
                p.copy_(torch.randn_like(p) * 0.1)
                q.copy_(p)
    ids = torch.randint(3, 300, (3, 12))
    return ours, stock, ids


def test_same_outputs_and_gradients_as_peft_in_fp32(tiny_model: str) -> None:
    ours, stock, ids = _students(tiny_model)
    assert any(isinstance(m, AddmmLoraLinear) for m in ours.modules())
    outs, grads = [], []
    for m in (ours, stock):
        logits = m(input_ids=ids).logits
        logits.square().mean().backward()
        outs.append(logits)
        grads.append([p.grad for p in m.parameters() if p.requires_grad])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_base_weights_are_exact_under_autocast(tiny_model: str) -> None:
    base = load_model(tiny_model).model
    torch.manual_seed(0)
    fp32 = add_lora(copy.deepcopy(base), 4, 8)
    torch.manual_seed(0)
    bf16 = add_lora(copy.deepcopy(base), 4, 8, bf16_base=True)
    assert bf16.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == \
        torch.bfloat16
    ids = torch.randint(3, 300, (2, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = fp32(input_ids=ids).logits, bf16(input_ids=ids).logits
    assert torch.equal(a, b)


def test_bf16_base_unmaps_the_checkpoint(tiny_model: str, tmp_path: Path) -> None:
    """After the bf16 casts no weight still maps the checkpoint file: the fp32 pages the casts
    read would stay resident while any tensor maps it (~0.3 GB for SmolLM2)."""
    import gc
    import shutil

    maps = Path("/proc/self/maps")
    if not maps.is_file():
        pytest.skip("needs /proc/self/maps")
    own = shutil.copytree(tiny_model, tmp_path / "model")  # no other test maps this copy

    def mapped() -> bool:
        return str(own) in maps.read_text()

    model = load_model(str(own)).model
    if not mapped():
        pytest.skip("this transformers copies weights instead of mapping the file")
    bf16 = add_lora(model, 4, 8, bf16_base=True)
    del model
    gc.collect()
    assert not mapped()
    assert all(p.dtype == torch.float32 for p in bf16.parameters() if p.requires_grad)


@pytest.mark.parametrize("user", [None, "8"])
def test_onednn_kernel_cache_is_capped_unless_the_user_set_it(user: str | None) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if user:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = user
    out = subprocess.run([sys.executable, "-c", "import os, sublearn.models; "
                          "print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == (user or "64")


def test_saved_adapter_loads_with_stock_peft(tiny_model: str, tmp_path: Path) -> None:
    from peft import PeftModel

    ours, _, ids = _students(tiny_model)
    ours.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load_model(tiny_model).model, tmp_path / "adapter")
    assert not any(isinstance(m, AddmmLoraLinear) for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ours(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [37, 64, 300])
def test_epoch_batches_cover_every_example_once(n: int) -> None:
    lengths = [random.Random(i).randint(50, 200) for i in range(n)]
    for grouped in (True, False):
        batches = epoch_batches(lengths, 8, seed=3, group_by_length=grouped)
        assert sorted(i for b in batches for i in b) == list(range(n))
        assert len(batches) == -(-n // 8)
        assert all(len(b) == 8 for b in batches[:-1])  # the one short batch is last
        assert batches == epoch_batches(lengths, 8, seed=3, group_by_length=grouped)


def test_grouped_batches_carry_less_padding() -> None:
    lengths = [random.Random(i).randint(50, 200) for i in range(256)]

    def padding(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b)
                   for b in batches)

    grouped = epoch_batches(lengths, 8, seed=1)
    plain = epoch_batches(lengths, 8, seed=1, group_by_length=False)
    assert padding(grouped) < 0.5 * padding(plain)
    assert grouped != epoch_batches(lengths, 8, seed=2)  # the seed still shuffles


def test_ungrouped_batches_are_the_previous_order() -> None:
    """--no-group-by-length reproduces the batches of earlier versions (a seeded shuffle)."""
    cfg = TrainConfig(seed=5, batch_size=4, group_by_length=False)
    order = list(range(10))
    random.Random(5 * 7919 + 1).shuffle(order)
    assert batch_indices(3, 3, [1] * 10, cfg) == order[0:4]  # step 3 = epoch 1, batch 0


def test_grouped_batches_weight_every_answer_token_alike() -> None:
    """Grouped batches divide by one dataset-wide constant, so a token's weight in the loss
    does not depend on the lengths of the answers it is batched with."""
    from sublearn.pipeline.train import Example, answer_tokens_per_batch

    examples = [Example(prompt_ids=[1] * 5, answer_ids=[2] * k) for k in (2, 4, 6, 8)]
    assert answer_tokens_per_batch(examples, TrainConfig(batch_size=2)) == 2 * 5.0
    assert answer_tokens_per_batch(examples, TrainConfig(group_by_length=False)) is None


def test_wrapping_and_loading_an_adapter_warn_nothing(tiny_model: str, tmp_path: Path) -> None:
    """PEFT's read of transformers' deprecated property used to print a FutureWarning for
    every teacher and student."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        lm = load_model(tiny_model)
        add_lora(lm.model, 4, 8).save_pretrained(tmp_path / "adapter")
        lm.tokenizer.save_pretrained(tmp_path / "adapter")
        load_model(str(tmp_path / "adapter"))


def _peft_merged(adapter: Path, dtype: str) -> dict:
    """The adapter merged by stock PEFT, as a user would merge it."""
    from peft import AutoPeftModelForCausalLM

    return AutoPeftModelForCausalLM.from_pretrained(
        adapter, dtype=getattr(torch, dtype)).merge_and_unload().state_dict()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merge_equals_peft_merge_byte_for_byte(tiny_model: str, tmp_path: Path, dtype: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """load_model merges a LoRA adapter out of place (faster on a file-mapped base): the
    merged weights must be PEFT's `merge_and_unload`'s exactly, so cached evaluations stay
    valid."""
    from peft.tuners.lora import LoraModel

    ours, _, _ = _students(tiny_model)
    ours.save_pretrained(tmp_path / "adapter")
    load_model(tiny_model).tokenizer.save_pretrained(tmp_path / "adapter")
    with monkeypatch.context() as m:  # our path, not PEFT's, merges a plain adapter
        m.setattr(LoraModel, "merge_and_unload", lambda *a, **k: pytest.fail("PEFT merged"))
        got = load_model(str(tmp_path / "adapter"), dtype=dtype).model.state_dict()
    want = _peft_merged(tmp_path / "adapter", dtype)
    base = load_model(tiny_model, dtype=dtype).model.state_dict()
    assert want.keys() == got.keys() == base.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert any(not torch.equal(got[k], base[k]) for k in got if "proj" in k)  # it moved them


def test_an_adapter_that_is_not_plain_lora_merges_as_peft_merges(tiny_model: str,
                                                                  tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_model).model, LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "dora")
    load_model(tiny_model).tokenizer.save_pretrained(tmp_path / "dora")
    ours = load_model(str(tmp_path / "dora")).model.state_dict()
    stock = _peft_merged(tmp_path / "dora", "float32")
    assert ours.keys() == stock.keys()
    assert all(torch.equal(ours[k], v) for k, v in stock.items())
