from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sublearn.config import add_dataclass_flags
    from sublearn.defences import DefendConfig

    p.add_argument("data", help="filtered.jsonl to defend")
    add_dataclass_flags(p, DefendConfig)
    p.add_argument("--out", required=True,
                   help="output folder (filtered.jsonl and defence_report.json inside)")


def run(args: argparse.Namespace) -> int:
    from sublearn.cli import asked_for
    from sublearn.config import dataclass_from_args
    from sublearn.defences import DefendConfig, defend_data
    from sublearn.defences.methods import DEFENCES
    from sublearn.errors import SublearnError

    need = DEFENCES[args.method].needs if args.method in DEFENCES else None
    # what each kind of method reads; the others' settings would be ignored
    reads = {"scores": {"teacher", "teacher_system_prompt", "base", "q"},
             "writer": {"writer", "temperature", "base", "min_grammar_share"}, "mix": {"mix"}}
    unused = set().union(*(v for k, v in reads.items() if k != need)) - reads.get(need, set())
    if args.method in DEFENCES and (ignored := asked_for(args, unused, DefendConfig())):
        raise SublearnError(f"{', '.join(ignored)}: not used by --method {args.method}")
    report = defend_data(dataclass_from_args(DefendConfig, args), args.data, args.out)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    return 0
