"""Fault injection for the reliability suite (tests/reliability): with
SUBLEARN_KILL_AT="<point>:<n>" set, the process sends itself SIGKILL the n-th time it reaches
`<point>` (counted within the process); several comma-separated specs kill at whichever comes
first. Points sit where a real crash would hurt most: right
after a batch of teacher answers is appended, after an optimiser step, after a checkpoint is
saved, after soft labels are computed, after an evaluation, and just before a stage is marked
done. Unset, a point costs one dict lookup."""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter

POINTS = ("generate.batch", "train.step", "train.checkpoint", "train.soft_labels",
          "evaluate.scored", "stage.done")
_hits: Counter[str] = Counter()


def point(name: str) -> None:
    spec = os.environ.get("SUBLEARN_KILL_AT")
    if not spec:
        return
    for one in spec.split(","):
        where, _, n = one.partition(":")
        if where == name:
            _hits[name] += 1
            if _hits[name] == int(n or 1):
                print(f"sublearn: fault injected: kill -9 at {name}", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return
