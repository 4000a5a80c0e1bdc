"""`sublearn theorem`: flags are `sublearn run`'s (ExperimentConfig); teachers and teacher
data are `sublearn run`'s stages, so one --out folder serves both verbs."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sublearn.config import add_dataclass_flags
    from sublearn.experiment.run import ExperimentConfig

    add_dataclass_flags(p, ExperimentConfig, skip=("workers",))  # one process
    p.add_argument("--out", required=True, help="experiment folder (shared with `sublearn run`)")


def run(args: argparse.Namespace) -> int:
    from sublearn.config import dataclass_from_args
    from sublearn.experiment.run import ExperimentConfig
    from sublearn.experiment.theorem import run_theorem

    run_theorem(dataclass_from_args(ExperimentConfig, args), args.out)
    print(f"theorem.json and theorem.md in {args.out}")
    return 0
