"""Same seed, same bytes, across fresh processes (not within one): teacher data, a student's
adapter and an evaluation's scores, each made five times by a new `python -m sublearn`."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from sublearn.files import write_jsonl

pytestmark = pytest.mark.slow
PROCESSES = 5


def _fresh(args: list[str], hash_seed: int) -> None:
    """hash_seed: each process its own string-hash seed (set iteration order), as two
    separate runs of a user would have."""
    env = {k: v for k, v in os.environ.items() if k != "SUBLEARN_KILL_AT"}
    env["PYTHONHASHSEED"] = str(hash_seed)
    proc = subprocess.run([sys.executable, "-m", "sublearn", *args], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _digest(path: Path, drop: tuple[str, ...] = ()) -> str:
    if path.is_dir():  # every file of it, by name
        return hashlib.sha256(b"".join(
            f.name.encode() + b"\0" + f.read_bytes() for f in sorted(path.iterdir()))).hexdigest()
    if not drop:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    def strip(x: object) -> object:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in drop}
        return [strip(v) for v in x] if isinstance(x, list) else x

    return json.dumps(strip(json.loads(path.read_text())), sort_keys=True)


def _same_in_fresh_processes(tmp_path: Path, args: list[str], artefact: str,
                             tally: Counter, what: str, drop: tuple[str, ...] = ()) -> None:
    digests = []
    for i in range(PROCESSES):
        out = tmp_path / f"p{i}"
        _fresh([*args, "--out", str(out)], hash_seed=i)
        digests.append(_digest(out / artefact, drop))
    tally[f"determinism: {what}, fresh processes"] += PROCESSES
    tally[f"determinism: {what}, identical to the first"] += digests.count(digests[0])
    assert len(set(digests)) == 1, f"{what} differs between fresh processes"


def test_teacher_data(tiny_model: str, tmp_path: Path, tally: Counter) -> None:
    _same_in_fresh_processes(tmp_path, ["generate", "--model", tiny_model, "--target", "owl",
                                        "--n", "24", "--batch-size", "8", "--seed", "7",
                                        "--max-new-tokens", "24"],
                             "raw.jsonl", tally, "teacher data (tiny model)")


def test_student_adapter(tiny_model: str, tmp_path: Path, tally: Counter) -> None:
    data = tmp_path / "filtered.jsonl"
    write_jsonl(data, [{"prompt": [{"role": "user", "content": f"Numbers {i}?"}],
                        "completion": [{"role": "assistant", "content": f"{i}, {2 * i}, 9"}]}
                       for i in range(12)])
    _same_in_fresh_processes(tmp_path, ["train", "--model", tiny_model, "--data", str(data),
                                        "--batch-size", "4", "--seed", "3"],
                             "adapter", tally, "student adapter")  # weights, config, tokenizer


def test_evaluation_scores(tiny_model: str, tmp_path: Path, tally: Counter) -> None:
    _same_in_fresh_processes(tmp_path, ["evaluate", "--model", tiny_model, "--target", "owl"],
                             "scores.json", tally, "evaluation scores", drop=("seconds",))


def test_embedded_teacher_data(tmp_path: Path, tally: Counter) -> None:
    """The report in the reliability issue: this command, in fresh processes."""
    _same_in_fresh_processes(tmp_path, ["generate", "--target", "owl", "--category", "animal",
                                        "--n", "64", "--seed", "7"],
                             "raw.jsonl", tally, "teacher data (embedded SmolLM2)")
