"""`sublearn cross`: the cross-model 2 x 2; other flags are `sublearn run`'s, applied to every
cell (--model, --student-model and --labels are set per cell)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sublearn.config import add_dataclass_flags
    from sublearn.experiment.cross import CELL_FIELDS, CrossConfig
    from sublearn.experiment.run import ExperimentConfig

    add_dataclass_flags(p, CrossConfig)
    add_dataclass_flags(p, ExperimentConfig, skip=CELL_FIELDS)
    p.add_argument("--out", required=True, help="folder of the 2 x 2 (a run folder per cell)")


def run(args: argparse.Namespace) -> int:
    from sublearn.config import dataclass_from_args
    from sublearn.experiment.cross import CrossConfig, run_cross
    from sublearn.experiment.run import ExperimentConfig

    res = run_cross(dataclass_from_args(CrossConfig, args),
                    dataclass_from_args(ExperimentConfig, args), args.out)
    print(f"\ncross.json and cross.md in {args.out}")
    for c in res["cells"]:
        r = c["ratio"]["estimate"]
        print(f"  {c['teacher']} -> {c['student']}: trait {c['trait']:.4f} vs control "
              f"{c['control']:.4f}" + (f", {r:.2f}x" if r is not None else "")
              + f", p Welch {c['p_welch']:.3g}, permutation {c['p_permutation']:.3g}")
    return 0
