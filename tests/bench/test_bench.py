"""`sublearn bench` on the tiny random model: the JSON schema and the table, no timings."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from sublearn.bench import QUICK, markdown, run_bench
from sublearn.bench.generation import padding_overhead
from sublearn.cli import main

# tiny sizes: the schema is the same at any size
SIZES = replace(QUICK, prompts=4, max_new_tokens=8, questions=2, matmul_reps=2)


def _positive(x: Any) -> bool:
    return isinstance(x, float | int) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def result(tiny_model: str) -> dict[str, Any]:
    return run_bench(tiny_model, SIZES, cuda=False, log=lambda s: None)


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
    # the TRL baselines timed every step but the warm-up
    assert t["trl_sft_bf16"]["steps"] == t["trl_sft_fp32"]["steps"] == SIZES.steps
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
    assert result["evaluation"]["max_abs_logprob_diff_bf16_vs_batched"] < 0.5
    mem = result["memory"]
    assert all(_positive(mem[f"after_{s}"]) for s in ("load", "generation", "training"))
    lev = result["levers"]
    assert _positive(lev["evaluation"]["prefix_kv_cache_speedup"])
    assert lev["training"]["length_batching"]["padding_sorted"] <= \
        lev["training"]["length_batching"]["padding_random"]
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
    text = capsys.readouterr().out
    assert "| evaluation (questions/s) vs candidates batched per question, bf16 |" in text


def test_markdown_rows(result: dict[str, Any]) -> None:
    table = markdown(result, "sublearn bench --quick --out bench.json")
    assert "sublearn bench --quick" in table
    assert table.count("\n| stage") == 1 and table.count("\n| training") == 3
    assert "TRL SFTTrainer + PEFT, bf16" in table and "PEFT KL loop" in table
    assert "| bf16 |" in table and "| decode_loop |" in table


def test_padding_overhead_sorted_is_never_worse() -> None:
    rand, srt = padding_overhead([5, 100, 7, 90, 6, 95], 2)
    assert srt < rand and srt >= 0


def test_unknown_stage_is_an_error(tiny_model: str, tmp_path: Path) -> None:
    assert main(["bench", "--out", str(tmp_path / "x"), "--stages", "nope"]) == 2


def test_training_levers_are_measured(tiny_model: str) -> None:
    res = run_bench(tiny_model, replace(SIZES, levers=True, steps=2), stages=("training",),
                    cuda=False, log=lambda s: None)
    t = res["training"]
    for key in ("bf16_autocast_speedup", "length_grouping_speedup", "lora_layer_speedup"):
        assert _positive(t["levers"][key]), key
    # ours trains on the same examples as the baseline, regrouped by length
    assert t["tokens_per_step"]["ours_soft"] <= t["tokens_per_step"]["peft_kl_loop"]
    assert t["ours_soft"]["items"] == t["peft_kl_loop"]["items"] == 2 * SIZES.train_batch
    assert t["trl_sft_bf16"]["items"] == 2 * SIZES.train_batch
    assert res["lever_speedups"]["lora_layer"]["training"] == t["levers"]["lora_layer_speedup"]
