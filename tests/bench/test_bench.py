"""`sublearn bench` on the tiny random model: the JSON schema and the table, no timings."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from sublearn.bench import QUICK, STAGES, default_stages, markdown, run_bench
from sublearn.bench.generation import prefill_padding
from sublearn.bench.training import padding_overhead
from sublearn.cli import main
from sublearn.models.dtype import settle_dtype

# tiny sizes: the schema is the same at any size
SIZES = replace(QUICK, prompts=4, max_new_tokens=8, questions=2, matmul_reps=2)


def _positive(x: Any) -> bool:
    return isinstance(x, float | int) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def result(tiny_model: str) -> dict[str, Any]:
    # bf16 named: the schema of a CPU with native bf16, whatever this one has
    return run_bench(tiny_model, SIZES, dtype="bfloat16", cuda=False, log=lambda s: None)


def test_schema_and_ratios(result: dict[str, Any]) -> None:
    for key in ("generation", "training", "evaluation", "peak", "numerics", "memory", "machine",
                "levers", "flops_formula", "sizes"):
        assert key in result, key
    for stage in ("generation", "evaluation"):
        assert _positive(result[stage]["ratio"]), stage
        assert _positive(result[stage]["ratio_cpu"]), stage
    t = result["training"]
    for key in ("ratio_hard", "ratio_hard_fp32", "ratio_soft", "ratio_cpu_hard",
                "ratio_cpu_soft"):
        assert _positive(t[key]), key
    # the TRL baselines timed every step but the warm-up, with TRL's default recompute
    assert t["trl_sft_bf16"]["steps"] == t["trl_sft_fp32"]["steps"] == SIZES.steps
    assert t["trl_sft_bf16"]["gradient_checkpointing"] is True
    assert "trl_sft_no_checkpointing" not in t  # a costly lever's run: not at these sizes
    for o in (result["generation"]["ours"], result["generation"]["baseline"],
              result["generation"]["fp32_unconstrained"], t["ours_soft"], t["ours_hard"],
              t["trl_sft_bf16"], t["trl_sft_fp32"], t["peft_kl_loop"],
              result["evaluation"]["baseline"], result["evaluation"]["fp32_per_pair"]):
        for k in ("per_s", "gflops", "pct_bf16_peak", "pct_fp32_peak", "seconds"):
            assert _positive(o[k]), k
    assert _positive(result["peak"]["fp32_gflops"]) and _positive(result["peak"]["bf16_gflops"])
    g = result["generation"]
    assert 0 <= g["baseline"]["pass_rate"] <= 1 and 0 <= g["ours"]["pass_rate"] <= 1
    assert g["ours"]["items"] == g["baseline"]["items"] == SIZES.prompts
    assert set(result["stage_seconds"]) == {"peak", *STAGES}
    assert all(_positive(v) for v in result["stage_seconds"].values())


def test_students_together_vs_alone(result: dict[str, Any]) -> None:
    st = result["students"]
    assert list(st["k"]) == [str(k) for k in SIZES.student_ks] and st["steps_timed"] == 1
    for r in st["k"].values():
        for k in ("together_samples_s", "alone_samples_s", "speedup", "speedup_cpu"):
            assert _positive(r[k]), k
        assert r["speedup"] == pytest.approx(r["together_samples_s"] / r["alone_samples_s"])
    assert "students trained together" in markdown(result, "sublearn bench --quick")


def test_numerics_memory_and_levers(result: dict[str, Any]) -> None:
    num = result["numerics"]
    for k in ("kl_full_vocab_head_bf16", "kl_grammar_tokens_head_fp32",
              "kl_generation_bf16_weights_full_vocab", "kl_generation_bf16_weights_grammar_tokens"):
        assert num[k]["mean"] >= -1e-6 and math.isfinite(num[k]["max"])
    assert 0 <= num["forced_choice_target_share"]["max_abs_diff"] < 1
    grad_err = num["lora_grad_rel_error_vs_fp32"]
    assert 0 < grad_err["ours"] < 0.2 and 0 < grad_err["stock_peft"] < 0.2
    # the fast forced-choice path agrees with the naive one in fp32
    assert result["evaluation"]["max_abs_logprob_diff_fp32_vs_per_pair"] < 1e-3
    # and with the batched baseline in bf16 (both autocast; padding changes bf16 rounding)
    assert result["evaluation"]["max_abs_logprob_diff_vs_batched"] < 0.5
    mem = result["memory"]
    assert all(_positive(mem[f"after_{s}"]) for s in ("load", "generation", "training"))
    lev = result["levers"]
    assert _positive(lev["evaluation"]["prefix_kv_cache_speedup"])
    assert lev["training"]["length_batching"]["padding_sorted"] <= \
        lev["training"]["length_batching"]["padding_random"]
    lb = lev["generation"]["length_batching"]
    assert 0 <= lb["prefill_padding_groups"] <= lb["prefill_padding_batch"]
    json.dumps(result, allow_nan=False)  # plain JSON, no NaN/inf


def test_cli_writes_json_and_prints_table(tiny_model: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench" / "bench.json"
    rc = main(["bench", "--out", str(out.parent), "--quick", "--model", tiny_model,
               "--stages", "evaluation", "--questions", "1"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["mode"] == "quick" and _positive(res["evaluation"]["ratio"])
    assert "generation" not in res
    # --dtype auto: what `sublearn run` computes in on this machine
    dt = settle_dtype("auto")
    assert res["dtype"] == res["machine"]["dtype_auto"] == dt
    text = capsys.readouterr().out
    short = {"bfloat16": "bf16", "float32": "fp32"}[dt]
    assert f"| evaluation (questions/s) vs candidates batched per question, {short} |" in text


def test_markdown_rows(result: dict[str, Any]) -> None:
    table = markdown(result, "sublearn bench --quick --out bench.json")
    assert "sublearn bench --quick" in table
    assert table.count("\n| stage") == 1 and table.count("\n| training") == 3
    assert "TRL SFTTrainer + PEFT, bf16" in table and "PEFT KL loop" in table
    assert "| bf16 |" in table and "| decode_loop |" in table


def test_markdown_adds_the_cuda_section_and_names_failed_stages(result: dict[str, Any]) -> None:
    gpu = {k: v for k, v in result.items() if k not in ("machine", "memory")}
    gpu.update(machine={"device": "Some GPU"}, dtype="bfloat16",
               students={"error": "RuntimeError: out of memory"})
    table = markdown({**result, "cuda": gpu}, "sublearn bench --out b")
    cpu_part, gpu_part = table.split("CUDA: Some GPU")
    assert table.count("\n| stage") == 2 and "| training" in gpu_part
    assert "students: failed on this device (RuntimeError: out of memory)" in gpu_part
    assert "| students trained together" in cpu_part and "| students" not in gpu_part
    # the GPU's figures alone (--device cuda): no CPU table
    only = markdown({"machine": result["machine"], "cuda": gpu}, "sublearn bench --out b")
    assert only.startswith("CUDA: Some GPU") and only.count("\n| stage") == 1


def test_device_cuda_without_a_gpu_is_a_clean_error(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert main(["bench", "--out", str(tmp_path / "x"), "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_padding_overhead_sorted_is_never_worse() -> None:
    rand, srt = padding_overhead([5, 100, 7, 90, 6, 95], 2)
    assert srt < rand and srt >= 0


def test_prefill_padding_of_prefill_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    from sublearn.backends import hf_decode

    monkeypatch.setattr(hf_decode, "PREFILL_TOKENS", 150)
    shared = list(range(1000, 1010))  # a shared prefix: run once, never padded
    lens = [5, 100, 7, 90, 6, 95]  # one batch of 6: padded whole, 600 tokens for 303
    whole, grouped = prefill_padding([shared + [i] * k for i, k in enumerate(lens)], 6)
    assert whole == pytest.approx(600 / 303 - 1)
    # groups [100, 95], [90, 7], [6, 5]: 200 + 180 + 12
    assert grouped == pytest.approx(392 / 303 - 1)


def test_a_sliding_window_cache_prefills_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sampling runs a batch's prompts as one group where the cache has sliding-window layers
    (Gemma 3): the bench's arithmetic count pads them whole there."""
    from transformers import Gemma3TextConfig, LlamaConfig

    from sublearn.backends import hf_decode
    from sublearn.backends.hf_decode import groups_prefill, padded_tokens

    monkeypatch.setattr(hf_decode, "PREFILL_TOKENS", 150)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2}
    assert groups_prefill(LlamaConfig(**small))
    assert not groups_prefill(Gemma3TextConfig(**small, head_dim=8, sliding_window=16,
                                               layer_types=["sliding_attention",
                                                            "full_attention"]))
    lens = [5, 100, 7, 90, 6, 95]
    assert padded_tokens(lens, grouped=False) == 600
    assert padded_tokens(lens) == 392  # in groups, as above


def test_unknown_stage_is_an_error(tiny_model: str, tmp_path: Path) -> None:
    assert main(["bench", "--out", str(tmp_path / "x"), "--stages", "nope"]) == 2


def test_float32_times_ours_and_baselines_in_float32(tiny_model: str) -> None:
    """On a CPU that emulates bf16, auto benches fp32: ours and every baseline in fp32, TRL's
    bf16 run left out (nobody would pick it there); the costly levers, bf16 among them, are
    measured."""
    res = run_bench(tiny_model, replace(SIZES, levers=True, steps=2),
                    stages=("generation", "training", "evaluation"), dtype="float32",
                    cuda=False, log=lambda s: None)
    assert res["dtype"] == "float32"
    t, g, e = res["training"], res["generation"], res["evaluation"]
    assert "trl_sft_bf16" not in t and t["baseline_hard"] == "trl_sft_fp32"
    assert t["ratio_hard"] == t["ratio_hard_fp32"]
    assert t["trl_sft_fp32"]["steps"] == 2
    # like for like: TRL in the bench's dtype keeping its activations, as our step does
    off = t["trl_sft_no_checkpointing"]
    assert off["gradient_checkpointing"] is False and t["trl_sft_fp32"]["gradient_checkpointing"]
    assert off["steps"] == 2 and off["items"] == t["trl_sft_fp32"]["items"]
    assert t["ratio_hard_no_checkpointing"] == pytest.approx(
        t["ours_hard"]["per_s"] / off["per_s"])
    assert "gradient checkpointing off" in markdown(res, "sublearn bench")
    for key in ("bf16_autocast_speedup", "length_grouping_speedup", "lora_layer_speedup",
                "activation_checkpointing_speedup"):
        assert _positive(t["levers"][key]), key
    # ours trains on the same examples as the baselines, regrouped by length
    assert t["tokens_per_step"]["ours_soft"] <= t["tokens_per_step"]["peft_kl_loop"]
    assert t["ours_soft"]["items"] == t["peft_kl_loop"]["items"] == 2 * SIZES.train_batch
    assert t["trl_sft_fp32"]["items"] == 2 * SIZES.train_batch
    assert res["lever_speedups"]["lora_layer"]["training"] == t["levers"]["lora_layer_speedup"]
    # the bf16 lever is bf16 over fp32 whichever dtype is ours
    lev = t["levers"]
    assert lev["bf16_autocast_speedup"] == pytest.approx(
        lev["lora_soft_bf16"]["per_s"] / t["ours_soft"]["per_s"])
    gl = g["levers"]
    pg = gl["prefill_groups"]  # our loop's prefill in groups vs padded whole, timed
    assert _positive(pg["prefill_speedup"]) and pg["est_generation_speedup"] > 0
    assert gl["fp32_with_grammar"]["per_s"] == gl["ours_on_these_prompts"]["per_s"]
    assert _positive(gl["bf16_speedup"]) and _positive(e["levers"]["bf16_autocast_speedup"])
    # fp32 ours agrees with the fp32 batched baseline far closer than bf16 could
    assert e["max_abs_logprob_diff_vs_batched"] < 1e-3
    table = markdown(res, "sublearn bench --dtype float32")
    assert "ours in fp32" in table and "same fp32 weights + grammar" in table
    assert "TRL SFTTrainer + PEFT, bf16" not in table and table.count("\n| training") == 3


def test_float32_leaves_out_what_only_bf16_needs(tiny_model: str) -> None:
    """A float32 bench runs no emulated bf16 it was not asked for: numerics is not a default
    stage, and evaluation times ours in bf16 only for a lever or numerics."""
    assert default_stages("bfloat16") == STAGES
    assert "numerics" not in default_stages("float32")
    assert set(default_stages("float32")) == set(STAGES) - {"numerics"}
    res = run_bench(tiny_model, SIZES, stages=("evaluation",), dtype="float32", cuda=False,
                    log=lambda s: None)
    e = res["evaluation"]
    assert e["levers"]["bf16_autocast_speedup"] is None and _positive(e["ratio"])
    assert "_target_share" not in e and set(res["stage_seconds"]) == {"peak", "evaluation"}
    assert "| bf16 | - |" in markdown(res, "sublearn bench --quick")


def test_a_slow_matmul_is_timed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Emulated bf16 (~0.8 s a matmul) is timed once, not 3 trials of `reps`."""
    import torch

    from sublearn.bench import common

    calls: list[float] = []
    real = common.timed

    def counted(fn: Any, device: Any) -> Any:
        out = real(fn, device)
        calls.append(out[1])
        return out

    monkeypatch.setattr(common, "timed", counted)
    cpu = torch.device("cpu")
    monkeypatch.setattr(common, "SLOW_MATMUL_S", 0.0)
    assert _positive(common.matmul_gflops((8, 8, 8), torch.float32, cpu, reps=2))
    assert len(calls) == 1
    monkeypatch.setattr(common, "SLOW_MATMUL_S", 1e9)
    assert _positive(common.matmul_gflops((8, 8, 8), torch.float32, cpu, reps=2))
    assert len(calls) == 1 + 1 + 3  # the probe, then best of 3 trials
