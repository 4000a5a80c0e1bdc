from __future__ import annotations

import argparse

from sublearn.models.dtype import DTYPE_CHOICES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (bench.json inside)")
    p.add_argument("--quick", action="store_true",
                   help="small fixed sizes (4 prompts, 1 training step of 4, 1 question), "
                        "cheap levers only: < 1 min on 2 cores with native bf16")
    p.add_argument("--model", default=None,
                   help="model to time (default: embedded smollm2-135m-instruct)")
    p.add_argument("--stages", default=None,
                   help="comma-separated subset of generation,training,evaluation,numerics,"
                        "students (default: all, numerics only where the dtype is bfloat16; "
                        "peak always runs)")
    p.add_argument("--prompts", type=int, default=None, help="override: generation prompts")
    p.add_argument("--steps", type=int, default=None,
                   help="override: timed training steps per variant")
    p.add_argument("--questions", type=int, default=None,
                   help="override: forced-choice questions")
    p.add_argument("--levers", action=argparse.BooleanOptionalAction, default=None,
                   help="time the costly levers: generation without grammar / in the other "
                        "dtype, LoRA in the other dtype, thread count (default: on, off with "
                        "--quick)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="what ours and the baselines compute in: auto (what `sublearn run` "
                        "settles to here: bfloat16 on a CPU with AVX-512 BF16 or AMX, float32 "
                        "on others; TRL's bf16 baseline runs only in bfloat16), bfloat16 or "
                        "float32")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to time: auto (the CPU, then the GPU where CUDA is available), "
                        "cpu, or cuda (the GPU alone; its section computes in bfloat16 unless "
                        "--dtype names another)")
    p.add_argument("--threads", type=int, default=None,
                   help="thread-count lever: compare 1 thread with this many "
                        "(default: all cores; 1 skips it)")


def run(args: argparse.Namespace) -> int:
    import shlex
    import sys
    from dataclasses import replace

    import torch

    from sublearn.bench import QUICK, STAGES, Sizes, default_stages, markdown, run_bench
    from sublearn.errors import SublearnError
    from sublearn.files import atomic_write_json, ensure_writable_dir
    from sublearn.models.dtype import settle_dtype

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SublearnError("--device cuda: no CUDA device is visible to torch here")
    # the GPU's section computes in bf16 under auto (see run_bench): numerics belongs there
    stages = default_stages(settle_dtype(args.dtype, gpu=args.device == "cuda")) \
        if args.stages is None else \
        tuple(s.strip() for s in args.stages.split(","))
    if unknown := set(stages) - set(STAGES):
        raise SublearnError(f"unknown --stages {sorted(unknown)}; choose from {STAGES}")
    sizes = QUICK if args.quick else Sizes()
    overrides = {"prompts": args.prompts, "steps": args.steps, "questions": args.questions,
                 "levers": args.levers}
    sizes = replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    if min(sizes.prompts, sizes.steps, sizes.questions) <= 0:
        raise SublearnError("--prompts, --steps and --questions must be positive")
    command = shlex.join(["sublearn", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else \
        "sublearn bench " + ("--quick " if args.quick else "") + f"--out {args.out}"
    if args.threads is not None and args.threads < 1:
        raise SublearnError(f"--threads must be at least 1, got {args.threads}")
    from sublearn.files import check_out_dir
    from sublearn.models.load import check_model

    check_out_dir(args.out)
    check_model(args.model)  # before the folder is made
    out = ensure_writable_dir(args.out) / "bench.json"
    res = run_bench(args.model, sizes, stages=stages, dtype=args.dtype, threads=args.threads,
                    cpu=args.device != "cuda",
                    cuda={"auto": None, "cpu": False, "cuda": True}[args.device])
    res["command"] = command
    res["mode"] = "quick" if args.quick else "default"
    atomic_write_json(out, res)
    print(markdown(res, command))
    print(f"\nwritten to {out} ({res['seconds']:.0f} s)")
    return 0
