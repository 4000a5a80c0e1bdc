"""`sublearn <verb>`: parses arguments and calls the stage functions.

Each verb lives in `sublearn.commands.<module>` with `HELP`, `add_arguments(parser)` and
`run(args)`. Command modules keep heavy imports (torch, transformers) inside `run` so that
`sublearn --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sublearn.errors import SublearnError

# verb -> module under sublearn.commands; the one place verbs are registered.
VERBS: dict[str, str] = {
    "generate": "generate",
    "train": "train",
    "evaluate": "evaluate",
    "run": "run",
    "contrast": "contrast",
    "mnist": "mnist",
    "bench": "bench",
    "serve": "serve",
    "sweep": "sweep",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sublearn", description="Subliminal learning experiments (Cloud et al. 2025)."
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, module_name in VERBS.items():
        try:
            module = importlib.import_module(f"sublearn.commands.{module_name}")
        except ModuleNotFoundError as e:
            if e.name == f"sublearn.commands.{module_name}":
                continue  # verb not built yet
            raise
        p = sub.add_parser(verb, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args._run(args)
    except SublearnError as e:
        print(f"sublearn {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        msg = "interrupted; rerun the same command to resume"
        print(f"sublearn {args.verb}: {msg}", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
