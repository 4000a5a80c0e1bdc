from __future__ import annotations

import argparse
import json

# AuditConfig settings that `--experiment` takes from the experiment instead
EXPERIMENT_IGNORES = {"teacher", "teacher_system_prompt", "base", "reference", "seed"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sublearn.audit import AuditConfig
    from sublearn.config import add_dataclass_flags

    p.add_argument("data", nargs="?", default=None,
                   help="filtered.jsonl to audit (or use --experiment)")
    p.add_argument("--experiment", default=None, metavar="DIR",
                   help="instead of DATA: a `sublearn run` folder; every run's trait and "
                        "control data are scored and the detectors' ROC-AUC over runs reported")
    add_dataclass_flags(p, AuditConfig)
    p.add_argument("--out", required=True,
                   help="output folder (scores.jsonl, summary.json, histogram.png, report.md)")


def run(args: argparse.Namespace) -> int:
    from sublearn.audit import AuditConfig, audit_dataset, audit_experiment
    from sublearn.cli import asked_for
    from sublearn.config import dataclass_from_args
    from sublearn.errors import SublearnError

    if (args.data is None) == (args.experiment is None):
        raise SublearnError("give either DATA (a filtered.jsonl) or --experiment DIR")
    if args.experiment:
        # the experiment names its teachers, base, data and target; these flags would be ignored
        if ignored := asked_for(args, EXPERIMENT_IGNORES, AuditConfig()):
            raise SublearnError(f"{', '.join(ignored)}: not used with --experiment (the "
                                "experiment's own teachers, base and data are scored)")
        # the dataset audit's checks of the settings both modes read
        dataclass_from_args(AuditConfig, args, teacher="-", target="-").validate()
        s = audit_experiment(args.experiment, args.out, probe=args.probe,
                             max_samples=args.max_samples, probe_epochs=args.probe_epochs,
                             dtype=args.dtype,
                             target=args.target if asked_for(args, {"target"}, AuditConfig())
                             else None)
        print(json.dumps(s["detectors"], indent=2))
        return 0
    s = audit_dataset(dataclass_from_args(AuditConfig, args), args.data, args.out)
    print(json.dumps({k: {m: v for m, v in d.items() if m in ("verdict", "data", "reference")}
                      for k, d in s["detectors"].items()}, indent=2, default=str))
    return 0
