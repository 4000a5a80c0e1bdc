"""The bench report: lever speed-ups and the markdown table."""

from __future__ import annotations

from typing import Any


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def lever_summary(levers: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Speed-up of each lever per stage (>1: the lever helps; None: not measured)."""
    g, t, e = (levers.get(k, {}) for k in ("generation", "training", "evaluation"))
    pre = g.get("prefix_kv_cache", {})
    lb_g, lb_t = g.get("length_batching", {}), t.get("length_batching", {})
    return {
        "bf16": {"generation": g.get("bf16_speedup"),
                 "training": t.get("bf16_autocast_speedup"),
                 "evaluation": e.get("bf16_autocast_speedup")},
        "grammar": {"generation": g.get("grammar_speedup"),
                    "generation_passing_samples": g.get("grammar_passing_speedup")},
        "decode_loop": {"generation": g.get("decode_loop_speedup")},
        "prefix_kv_cache": {"generation_prefill": pre.get("prefill_speedup"),
                            "generation_est": pre.get("est_generation_speedup"),
                            "evaluation": e.get("prefix_kv_cache_speedup")},
        "threads": {"prefill": levers.get("threads", {}).get("prefill_speedup")},
        "length_batching": {
            "generation_prefill_est": (1 + lb_g["prefill_padding_batch"])
            / (1 + lb_g["prefill_padding_groups"]) if lb_g else None,
            "generation_prefill": g.get("prefill_groups", {}).get("prefill_speedup"),
            "generation_est": g.get("prefill_groups", {}).get("est_generation_speedup"),
            "training": t.get("length_grouping_speedup"),
            "training_est": lb_t.get("est_speedup")},
        "lora_layer": {"training": t.get("lora_layer_speedup")},
        # keeping the activations over recomputing them: what a two-worker run's students
        # pay for half the memory
        "activation_checkpointing": {"training": t.get("activation_checkpointing_speedup")},
    }


def _cpu_rate(r: dict[str, Any], key: str) -> float:
    """A wall-clock rate re-expressed per CPU second (robust to a busy machine)."""
    return r[key] * r["seconds"] / max(1e-9, r["cpu_seconds"] or r["seconds"])


def markdown(res: dict[str, Any], command: str) -> str:
    """Tables for the README: ours vs baseline per stage, ratio, and share of the peak of the
    dtype ours computes in (the bench's dtype; bf16 in a bench.json from before the setting);
    the CUDA section's after the CPU's, each where it ran."""
    parts = []
    if "peak" in res:
        m, pk = res["machine"], res["peak"]
        amx = {True: "AMX", False: "no AMX"}.get(m.get("amx_bf16"), "AMX unknown")
        load = m["loadavg_start"][0] if m.get("loadavg_start") else "?"
        parts.append(_section(res, res.get("dtype"), f"`{command}` on {m['cpu']} ({amx}, "
                              f"{m['torch_threads']} thread(s), load {load}); peak matmul "
                              f"fp32 {pk['fp32_gflops']:.0f} / bf16 {pk['bf16_gflops']:.0f} "
                              "GFLOP/s"))
    if c := res.get("cuda"):
        pk = c.get("peak", {})
        head = f"CUDA: {c['machine']['device']}"
        if "error" in pk:
            parts.append(f"{head}: failed ({pk['error']})")
        else:
            parts.append(_section(c, c.get("dtype"), f"{head}; peak matmul fp32 "
                                  f"{pk['fp32_gflops']:.0f} / bf16 {pk['bf16_gflops']:.0f} "
                                  "GFLOP/s"))
    return "\n\n".join(parts)


def _section(res: dict[str, Any], dtype: str | None, head: str) -> str:
    """One device's tables; a stage that failed there is named with its error."""
    dt = "fp32" if dtype == "float32" else "bf16"
    failed = {k: v["error"] for k, v in res.items() if isinstance(v, dict) and "error" in v}
    # (stage, ours, baseline, key, the baseline's precision)
    rows: list[tuple[str, dict[str, Any], dict[str, Any], str, str]] = []
    g, t, e = (res.get(k) if k not in failed else None
               for k in ("generation", "training", "evaluation"))
    if g:
        for key, unit in (("tokens_per_s", "tokens/s"), ("per_s", "samples/s")):
            rows.append((f"generation ({unit}) vs `generate`, same {dt} weights + grammar",
                         g["ours"], g["baseline"], key, dt))
        rows.append(("generation (tokens/s) vs `generate` fp32, unconstrained (old baseline)",
                     g["ours"], g["fp32_unconstrained"], "tokens_per_s", "fp32"))
    if t:
        if "trl_sft_bf16" in t:
            rows.append(("training, hard labels (samples/s) vs TRL SFTTrainer + PEFT, bf16",
                         t["ours_hard"], t["trl_sft_bf16"], "per_s", "bf16"))
        rows.append(("training, hard labels (samples/s) vs TRL SFTTrainer + PEFT, fp32 defaults",
                     t["ours_hard"], t["trl_sft_fp32"], "per_s", "fp32"))
        if "trl_sft_no_checkpointing" in t:  # TRL's default recomputes activations; ours not
            rows.append((f"training, hard labels (samples/s) vs TRL SFTTrainer + PEFT, {dt}, "
                         "gradient checkpointing off", t["ours_hard"],
                         t["trl_sft_no_checkpointing"], "per_s", dt))
        rows.append((f"training, soft labels (samples/s, teacher inside) vs PEFT KL loop, {dt}",
                     t["ours_soft"], t["peft_kl_loop"], "per_s", dt))
    if e:
        rows.append((f"evaluation (questions/s) vs candidates batched per question, {dt}",
                     e["ours"], e["baseline"], "per_s", dt))
        rows.append(("evaluation (questions/s) vs one fp32 forward per pair (old baseline)",
                     e["ours"], e["fp32_per_pair"], "per_s", "fp32"))
    lines = [f"{head}; ours in {dt}", "",
             "| stage and baseline | ours | baseline | ratio | ratio by CPU time "
             f"| ours % of {dt} peak | baseline % of its precision's peak |",
             "|---|---|---|---|---|---|---|"]
    for name, o, b, key, prec in rows:
        lines.append(f"| {name} | {_fmt(o[key])} | {_fmt(b[key])} | {o[key] / b[key]:.2f}x | "
                     f"{_cpu_rate(o, key) / _cpu_rate(b, key):.2f}x | "
                     f"{o[f'pct_{dt}_peak']:.1f}% | {b[f'pct_{prec}_peak']:.1f}% |")
    if g:
        lines.append(f"\nstrict-filter pass rate: ours {g['ours']['pass_rate']:.0%}, "
                     f"baseline {g['baseline']['pass_rate']:.0%}")
    lines += [f"\n{k}: failed on this device ({v})" for k, v in failed.items()]
    if (st := res.get("students")) and "students" not in failed:
        lines += ["", "| students trained together, K | together (samples/s) | one after "
                  "another (samples/s) | speed-up | by CPU time |", "|---|---|---|---|---|"]
        for k, r in st["k"].items():
            lines.append(f"| {k} | {_fmt(r['together_samples_s'])} | "
                         f"{_fmt(r['alone_samples_s'])} | {r['speedup']:.2f}x | "
                         f"{r['speedup_cpu']:.2f}x |")
    summary = lever_summary(res.get("levers", {}))
    lines += ["", "| lever | speed-up (x) per stage; - = not measured |", "|---|---|"]
    for lever, per in summary.items():
        cells = ", ".join(f"{k} {v:.2f}" for k, v in per.items() if v is not None)
        lines.append(f"| {lever} | {cells or '-'} |")
    return "\n".join(lines)
