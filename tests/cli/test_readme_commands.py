"""Every `sublearn` command the README shows parses with today's CLI: a renamed or dropped flag,
or a choice that no longer exists, fails here instead of in a reader's shell. Only parsing is
checked (no files are read, nothing runs), and only the errors a stale command makes: unknown
flags and invalid choices; placeholders such as `--seed S` are the reader's to fill in."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from sublearn.cli import VERBS, parse

README = Path(__file__).resolve().parents[2] / "README.md"
# sections that record an earlier version's commands, said so in their text
HISTORICAL = ("### Earlier design",)
STALE = ("unrecognized arguments", "invalid choice")


def readme_commands(text: str) -> list[str]:
    """Whole commands: each `sublearn VERB ...` line of a fenced shell block (continuation
    lines joined, comments dropped, a `for ...; do CMD; done` loop's body), and each inline
    code span with `--out` (a span without it is a mention in prose, e.g. `sublearn run
    --defence M`)."""
    sections = re.split(r"(?m)^(?=#{2,4} )", text)
    text = "".join(s for s in sections if not s.startswith(HISTORICAL))
    cmds = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            cmds.append(line.split(" #")[0])
    prose = re.sub(r"```.*?```", "", text, flags=re.S).replace("\n", " ")
    cmds += [s for s in re.findall(r"`([^`]*sublearn [a-z]+[^`]*)`", prose) if "--out" in s]
    out = []
    for c in cmds:
        c = re.sub(r";\s*done\b.*$", "", re.sub(r"^.*?;\s*do\s", "", c.strip()))
        m = re.search(r"(?:^|[\s/])sublearn ([a-z]+)(?=\s|$)(.*)", c)
        if m and m[1] in VERBS and "..." not in m[2] and "--config" not in m[2]:
            out.append(f"{m[1]}{m[2]}".strip())
    return out


COMMANDS = readme_commands(README.read_text(encoding="utf-8"))


def test_the_readme_shows_commands_of_every_main_verb() -> None:
    verbs = {c.split()[0] for c in COMMANDS}
    assert {"run", "generate", "train", "evaluate", "bench", "audit", "defend", "matrix",
            "cross", "theorem", "mnist", "sweep"} <= verbs
    assert len(COMMANDS) > 50


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command: str) -> None:
    verb, *argv = shlex.split(command)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parse(verb, argv)
    except SystemExit:
        assert not any(s in err.getvalue() for s in STALE), err.getvalue()


def test_a_stale_flag_fails() -> None:
    # the check can fail: a flag from an earlier version is refused
    with pytest.raises(AssertionError, match="unrecognized arguments: --seeds"):
        test_readme_command_parses("run --target cat --seeds 3 --out runs/cat")
