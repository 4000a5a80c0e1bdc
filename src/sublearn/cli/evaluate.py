from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sublearn.config import add_dataclass_flags
    from sublearn.pipeline.evaluate import EvalConfig

    p.add_argument("--model", default=None, help="embedded name, local folder, HF id or PEFT "
                   "adapter folder (default: embedded smollm2-135m-instruct); openai:<model> "
                   "or vllm:<id>: sampled rate only (needs --samples)")
    add_dataclass_flags(p, EvalConfig)
    p.add_argument("--system-prompt", default=None,
                   help="system message for every question (e.g. to score a prompted teacher)")
    p.add_argument("--out", required=True, help="output folder (scores.json inside)")


def run(args: argparse.Namespace) -> int:
    from sublearn.config import dataclass_from_args
    from sublearn.files import atomic_write_json, check_out_dir, ensure_writable_dir
    from sublearn.pipeline.evaluate import EvalConfig, evaluate_model, summary_line

    cfg = dataclass_from_args(EvalConfig, args).validate()
    check_out_dir(args.out)
    scores = evaluate_model(args.model, cfg, system_prompt=args.system_prompt)
    out = ensure_writable_dir(args.out) / "scores.json"
    atomic_write_json(out, scores)
    print(summary_line(scores))
    print(f"scores written to {out} ({scores['seconds']:.1f} s)")
    return 0
