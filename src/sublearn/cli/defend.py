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
    from sublearn.config import dataclass_from_args
    from sublearn.defences import DefendConfig, defend_data

    report = defend_data(dataclass_from_args(DefendConfig, args), args.data, args.out)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    return 0
