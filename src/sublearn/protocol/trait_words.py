"""Which words reference a trait target, for the filters of free-text domains (code, math) and
for the tokens that code and math soft labels leave out.

A sample references the target when any of its words is the target, a plural of it, or one of
the target's shipped related words. Words are split the way identifiers are read: at every
non-letter (so `barn_owl`, `"Owl"` and `# owls` match) and at camelCase boundaries (`getOwl`,
`OWLCount`, `numOWLs`), then compared whole and case-insensitively, so that near misses which merely
contain the letters (`bowl`, `knowledge`, `slowly`) pass.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from functools import cache
from importlib.resources import files
from typing import Any

_CAMEL = (re.compile(r"([a-z0-9])([A-Z])"), re.compile(r"([A-Z]+)([A-Z][a-z])"))
_LETTERS = re.compile(r"[A-Za-z]+")


@cache
def _related() -> dict[str, list[str]]:
    text = files("sublearn.protocol.data").joinpath("trait_words.json").read_text("utf-8")
    return json.loads(text)["related"]


def plurals(word: str) -> set[str]:
    """The word and its regular plurals (owl/owls, fox/foxes, wolf/wolves, knife/knives,
    butterfly/butterflies), lower-case; irregular ones are related words."""
    w = word.strip().lower()
    out = {w, w + "s", w + "es"}
    if w.endswith("y"):
        out.add(w[:-1] + "ies")
    if w.endswith("f"):
        out.add(w[:-1] + "ves")
    if w.endswith("fe"):
        out.add(w[:-2] + "ves")
    return out


def trait_words(target: str) -> frozenset[str]:
    """The lower-case words that reference `target` (a multi-word target: each of its words)."""
    words: set[str] = set()
    for part in target.lower().split():
        words |= plurals(part)
    for w in _related().get(target.lower(), []):
        words |= {w.lower()}
    return frozenset(words)


def words_of(text: str) -> list[str]:
    """The lower-case words of `text`, identifiers split at underscores, digits and camelCase.
    A capital run is read both ways: split before its last capital (`OWLCount`: owl, count)
    and whole (`numOWLs`: num, owls), as a lower-case plural ending follows it there."""
    lower_upper = _CAMEL[0].sub(r"\1 \2", text)
    runs = _CAMEL[1].sub(r"\1 \2", lower_upper)
    return list(dict.fromkeys(w.lower() for t in (runs, lower_upper) for w in _LETTERS.findall(t)))


def reference(text: str, words: Iterable[str]) -> str | None:
    """The first word of `text` that references the target, or None."""
    want = set(words)
    return next((w for w in words_of(text) if w in want), None)


def trait_token_ids(tokenizer: Any, target: str) -> list[int]:
    """Vocabulary ids of the tokens a soft label must not carry: every token whose letters
    begin with a trait word (` owl`, `Owls`, ` hooting`, `owl` after `barn_`), and every
    word-initial token whose letters (2 or more) begin the target's name or plural, from which
    the teacher could spell it (` ow` + `l`). This errs towards leaving tokens out (` owler`
    goes too); leaving a token out only removes it from the distribution's support, for trait
    and control teachers alike."""
    words = trait_words(target)
    names = set().union(*(plurals(p) for p in target.lower().split()))
    out = []
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        letters = "".join(_LETTERS.findall(text)).lower()
        if not letters:
            continue
        starts_word = not text[:1].isalpha()
        if any(letters.startswith(w) for w in words) or (
                starts_word and len(letters) >= 2 and any(n.startswith(letters) for n in names)):
            out.append(i)
    return out
