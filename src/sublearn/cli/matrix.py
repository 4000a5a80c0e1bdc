"""`sublearn matrix`: the trait x trait matrix; other flags are `sublearn run`'s recipe and
data settings, applied to every target's runs."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sublearn.config import add_dataclass_flags
    from sublearn.experiment.matrix import SKIPPED, MatrixConfig
    from sublearn.experiment.run import ExperimentConfig

    add_dataclass_flags(p, MatrixConfig)
    add_dataclass_flags(p, ExperimentConfig, skip=SKIPPED)
    p.add_argument("--out", required=True, help="matrix folder (a stage folder per target)")


def run(args: argparse.Namespace) -> int:
    from sublearn.config import dataclass_from_args
    from sublearn.experiment.matrix import MatrixConfig, ratio_text, run_matrix
    from sublearn.experiment.report import remaining_cell
    from sublearn.experiment.run import ExperimentConfig

    mcfg = dataclass_from_args(MatrixConfig, args).validate()
    res = run_matrix(mcfg, dataclass_from_args(ExperimentConfig, args, icl=0,
                                               target=mcfg.target_list()[0]), args.out)
    print(f"\nresults.json, report.md and matrix.png in {args.out}")
    for half, lam in res["diagonal"].items():
        print(f"  diagonal ({half} questions): lam {lam['estimate']:.3f}, exp(lam) "
              f"{ratio_text(lam)}, permutation p {lam['p_permutation']:.3g}")
    for m, d in res.get("defences", {}).items():
        lam = d["diagonal"]["all"]
        print(f"  defence {m}: exp(lam) {ratio_text(lam)}, permutation p "
              f"{lam['p_permutation']:.3g}, remaining {remaining_cell(d['remaining']['all'])}")
    return 0
