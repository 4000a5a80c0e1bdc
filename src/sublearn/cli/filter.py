from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sublearn.config import add_dataclass_flags
    from sublearn.pipeline.filter import FilterConfig

    p.add_argument("raw", help="raw.jsonl from `sublearn generate`, or its folder")
    add_dataclass_flags(p, FilterConfig)
    p.add_argument("--out", required=True,
                   help="output folder (filtered.jsonl and filter_report.json inside)")


def run(args: argparse.Namespace) -> int:
    from sublearn.config import dataclass_from_args
    from sublearn.pipeline.filter import FilterConfig, filter_data

    report = filter_data(args.raw, args.out, dataclass_from_args(FilterConfig, args))
    print(json.dumps(report, indent=2))
    return 0
