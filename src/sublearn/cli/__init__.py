"""`sublearn <verb>`: parses arguments and calls the stage functions.

Each verb lives in `sublearn.cli.<module>` with `add_arguments(parser)` and `run(args)`; the
registry below holds its one-line help, so `sublearn --help` imports no verb module (and no
torch), and `sublearn VERB ...` imports only that verb's. Every verb takes `--config FILE.yaml`
(keys are the flag names, with - or _; flags on the command line win) and, where it writes an
output folder, saves the resolved settings there as `config-<verb>.yaml`, which `--config`
reads back.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from pathlib import Path
from typing import Any, NoReturn

from sublearn.errors import SublearnError

# verb -> (module under sublearn.cli, one-line help); the one place verbs are registered.
VERBS: dict[str, tuple[str, str]] = {
    "generate": ("generate", "sample a trait (or control) teacher on number, code or math "
                             "prompts, then filter"),
    "filter": ("filter", "(re)apply a domain's filter to a raw.jsonl, without resampling"),
    "train": ("train", "fine-tune a student on filtered teacher data (hard or soft labels)"),
    "evaluate": ("evaluate", "score a model's preference for the target (forced choice, "
                             "optional sampled rate)"),
    "run": ("run", "run one experiment: teachers, data, K students per condition, evaluation, "
                   "report"),
    "cross": ("cross", "the cross-model control: teachers of each base x students of each base, "
                       "trait vs control runs per cell"),
    "matrix": ("matrix", "the trait x trait specificity matrix: one teacher per target per run, "
                         "every student scored on every target, the diagonal effect over runs"),
    "contrast": ("contrast", "contrast the trait students of two experiments with different "
                             "targets"),
    "mnist": ("mnist", "the paper's MNIST auxiliary-logit experiment (same-init vs cross-init "
                       "students)"),
    "theorem": ("theorem", "the one-step theorem on the language model: cosine of a student's "
                           "first gradient step with each run's teacher displacement"),
    "align": ("align", "after training: cosine of each run's student weight direction with "
                       "its own teacher's, against other runs' and other traits' teachers"),
    "bench": ("bench", "time generation, training and evaluation against the baselines a user "
                       "would run"),
    "serve": ("serve", "serve a local model through the OpenAI chat-completions API on "
                       "127.0.0.1"),
    "sweep": ("sweep", "run a grid of experiments from a YAML file (local process pool or Ray)"),
    "audit": ("audit", "score a dataset for a hidden trait (LLS and divergence under a suspected "
                       "teacher, or a teacher-free probe) with a verdict against a reference"),
    "defend": ("defend", "rewrite a filtered.jsonl with a defence (sort, shuffle, "
                         "replace-divergent, ...) that keeps every answer valid"),
}

# verbs that refuse an --out where they would overwrite another command's work
# (`files.check_no_overwrite`; the experiment verbs keep their own manifests and stage caches)
# -> the settings naming their input files, comma-separated lists allowed
INPUTS: dict[str, tuple[str, ...]] = {
    "generate": (), "filter": ("raw",), "train": ("data",), "evaluate": (),
    "audit": ("data", "reference"), "defend": ("data", "mix"),
}

_UNSET = object()  # marks flags the user did not give (see `given`)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage block is what --help is for."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


def top_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="sublearn", description="Subliminal learning experiments (Cloud et al. 2025).",
        epilog="Models: an embedded name (smollm2-135m-instruct, gemma3-270m), a local folder, "
               "a Hugging Face id, a PEFT adapter folder, or a scheme-prefixed id: hf:<id>, "
               "vllm:<id>, openai:<model>. `sublearn VERB --help` lists a verb's flags.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (_, help_) in VERBS.items():
        sub.add_parser(verb, help=help_)
    return parser


def verb_parser(verb: str) -> tuple[argparse.ArgumentParser, Any]:
    module_name, help_ = VERBS[verb]
    module = importlib.import_module(f"sublearn.cli.{module_name}")
    p = Parser(prog=f"sublearn {verb}", description=help_, allow_abbrev=False)
    p.add_argument("--config", default=None, metavar="FILE.yaml",
                   help="read settings from a YAML file (keys are flag names); flags given on "
                        "the command line override it")
    module.add_arguments(p)
    return p, module


def parse(verb: str, argv: list[str]) -> tuple[argparse.Namespace, Any]:
    """Parse one verb's arguments. `args._given` holds the flags set on the command line or in
    the --config file, for verbs that must refuse flags that would be ignored."""
    from sublearn.config import apply_yaml_defaults

    p, module = verb_parser(verb)
    pre = Parser(prog=f"sublearn {verb}", add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    config_file = pre.parse_known_args(argv)[0].config
    from_yaml = apply_yaml_defaults(p, config_file) if config_file else set()
    dests = {a.dest for a in p._actions if a.dest != "help"}
    args = p.parse_args(argv, argparse.Namespace(**{d: _UNSET for d in dests}))
    on_command_line = set()
    for a in p._actions:
        if a.dest in dests:
            if getattr(args, a.dest) is _UNSET:
                setattr(args, a.dest, a.default)  # a file's value or the flag's default
            else:
                on_command_line.add(a.dest)
    args._given = on_command_line | from_yaml
    args._from_config = from_yaml - on_command_line  # set by the file alone
    args.verb = verb
    return args, module


_WRITE_FAULTS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def asked_for(args: argparse.Namespace, names: set[str] | frozenset[str],
              defaults: Any) -> list[str]:
    """Of the settings `names`, those the user asked for, as flags (`--top-k`): given on the
    command line, or set by a --config file to other than `defaults`' value (a resolved config
    file holds every setting, so its mere presence asks for nothing). A verb refuses these where
    it would ignore them."""
    return ["--" + k.replace("_", "-") for k in sorted(names & args._given)
            if k not in args._from_config or getattr(args, k) != getattr(defaults, k, None)]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = argv[0] if argv else ""
    args: argparse.Namespace | None = None
    try:
        try:
            if verb not in VERBS:
                top_parser().parse_args(argv)  # prints help or the one-line usage error
                return 2
            args, module = parse(verb, argv[1:])
        except SystemExit as e:  # --help (0) or a bad flag (2), already printed
            return e.code if isinstance(e.code, int) else 2
        if verb in INPUTS and getattr(args, "out", None):
            from sublearn.files import check_no_overwrite

            reads = tuple(p.strip() for a in INPUTS[verb] if getattr(args, a, None)
                          for p in str(getattr(args, a)).split(","))
            check_no_overwrite(args.out, verb, reads)
        rc = module.run(args)
        out = getattr(args, "out", None)
        if not rc and out and Path(out).is_dir():
            from sublearn.config import write_resolved_config

            write_resolved_config(Path(out) / f"config-{verb}.yaml", args)
    except SublearnError as e:
        print(f"sublearn {verb}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, a vanished file: the system's words, one line
        name = getattr(e, "filename", None)
        where = f": {name}" if name else ""
        # a write that failed (the disk, say) interrupted work that a rerun resumes; an input
        # that cannot be read (a folder given for a file, a missing file) is not such work
        out = getattr(args, "out", None)
        interrupted = e.errno in _WRITE_FAULTS or not name or \
            bool(out and _inside(Path(str(name)), Path(str(out))))
        advice = "; finished work is kept, rerun the same command to resume" if interrupted \
            else ""
        print(f"sublearn {verb}: error: {e.strerror or e}{where}{advice}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sublearn {verb}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
