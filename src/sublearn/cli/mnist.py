"""`sublearn mnist`: the paper's MNIST auxiliary-logit experiment (flags = MnistConfig fields)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from sublearn.mnist import MnistConfig

HELP = (
    "MNIST subliminal learning: distil a digit teacher's auxiliary logits on noise into "
    "same-init and cross-init students (default data: scikit-learn's 8x8 digits)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # sublearn.mnist only imports the standard library at module level, so this stays cheap.
    for f in fields(MnistConfig):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=type(f.default),
            default=f.default,
            help=f"{f.metadata.get('help', '')} (default: %(default)s)",
        )
    parser.add_argument("--out", default="runs/mnist", help="output folder (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from sublearn.mnist import run_mnist

    cfg = MnistConfig(**{f.name: getattr(args, f.name) for f in fields(MnistConfig)})
    run_mnist(cfg, args.out)
    return 0
