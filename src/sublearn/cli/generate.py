from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sublearn.config import add_dataclass_flags
    from sublearn.pipeline.generate import GenerateConfig

    add_dataclass_flags(p, GenerateConfig)
    p.add_argument("--out", required=True, help="run folder for raw/filtered data")


def run(args: argparse.Namespace) -> int:
    from sublearn.cli import asked_for
    from sublearn.config import dataclass_from_args
    from sublearn.errors import SublearnError
    from sublearn.pipeline.generate import GenerateConfig, generate

    if args.domain != "math" and (ignored := asked_for(args, {"level"}, GenerateConfig())):
        raise SublearnError(f"{ignored[0]}: sets the difficulty of --domain math problems")
    report = generate(dataclass_from_args(GenerateConfig, args), args.out)
    print(json.dumps(report, indent=2))
    return 0
