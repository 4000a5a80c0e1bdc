"""`sublearn mnist`: the paper's MNIST auxiliary-logit experiment (flags = MnistConfig fields)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sublearn.config import add_dataclass_flags
    from sublearn.mnist.experiment import MnistConfig  # standard library only at import

    add_dataclass_flags(p, MnistConfig)
    p.add_argument("--out", required=True, help="output folder")


def run(args: argparse.Namespace) -> int:
    from sublearn.config import dataclass_from_args
    from sublearn.mnist.experiment import MnistConfig, run_mnist

    run_mnist(dataclass_from_args(MnistConfig, args), args.out)
    return 0
