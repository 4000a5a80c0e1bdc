"""Faults: kill -9 at injected points then resume, torn and damaged files, two commands on one
folder, a full disk and a read-only folder. Each must end in the same results as a run that
met no fault, or in a one-line error that loses nothing."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from sublearn.cli import main
from sublearn.files import file_sha256, folder_lock, write_jsonl

# icl: more evaluations, no new kind of stage; min-grammar-share 0: the tiny random model's
# answers are all the grammar's, and the rule would leave no data; one process: the kill
# chain aims at stages in the order one process makes them (a killed worker:
# tests/experiment/test_workers.py)
RUN = ["run", "--target", "owl", "--runs", "2", "--n", "8", "--epochs", "1", "--batch-size",
       "4", "--teacher-epochs", "1", "--icl", "0", "--min-grammar-share", "0", "--workers", "1"]
TIMING = ("stage_seconds", "wall_seconds", "peak_rss_gb")  # vary between processes


def _cli(args: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SUBLEARN_KILL_AT": kill_at or ""}
    return subprocess.run([sys.executable, "-m", "sublearn", *args], env=env,
                          capture_output=True, text=True, timeout=600)


def _folder_json(path: Path, folder: Path) -> dict:
    """A JSON file of a run folder with the folder's own path taken out (stage keys hold no
    path of the folder: the two folders' stages have the same names)."""
    return json.loads(path.read_text().replace(str(folder), "<out>"))


def _results(folder: Path) -> dict:
    """results.json without timings or the folder's own path."""
    res = _folder_json(folder / "results.json", folder)
    for k in TIMING:
        res.pop(k, None)  # peak_rss_gb: none when every stage was cached
    return res


# Float rounding allowed between a resumed run's evaluations and an uninterrupted one's.
# Early chains differed by <= 2e-6 (relative) in a few merged models' evaluations while every
# stage output was byte-identical (README, Reliability). Coarser faults stay visible: the same
# run in float32 instead of bf16 differs beyond it in 259 of 280 floats of results.json
# (median 1.9e-4), and two students of one condition differ by ~4e-3.
REL_TOL = 1e-5


def _mismatches(got: object, want: object, rel: float = REL_TOL, where: str = "") -> list[str]:
    """Where two JSON values differ: in structure, a string, an int, or a float by more than
    `rel` (relative; 0: exactly)."""
    if isinstance(got, dict) and isinstance(want, dict):
        if got.keys() != want.keys():
            return [f"{where}: keys {sorted(got.keys() ^ want.keys())}"]
        return [m for k in want for m in _mismatches(got[k], want[k], rel, f"{where}.{k}")]
    if isinstance(got, list) and isinstance(want, list):
        if len(got) != len(want):
            return [f"{where}: {len(got)} items, not {len(want)}"]
        return [m for i, (g, w) in enumerate(zip(got, want, strict=True))
                for m in _mismatches(g, w, rel, f"{where}[{i}]")]
    if isinstance(got, float) and isinstance(want, float):
        ok = math.isclose(got, want, rel_tol=rel) or math.isnan(got) and math.isnan(want)
        return [] if ok else [f"{where}: {got!r} vs {want!r}"]
    return [] if type(got) is type(want) and got == want else [f"{where}: {got!r} vs {want!r}"]


def _no_seconds(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: _no_seconds(v) for k, v in obj.items() if k != "seconds"}
    return [_no_seconds(v) for v in obj] if isinstance(obj, list) else obj


def _evaluations(folder: Path) -> dict[str, object]:
    """Every evaluation's scores.json by stage, without timings or the folder's own path."""
    return {f.parent.name: _no_seconds(_folder_json(f, folder))
            for f in sorted((folder / "stages").glob("eval_*/scores.json"))}


def _stage_outputs_differing(ref: Path, out: Path) -> list[str]:
    """Stage outputs (by stage name without its hash) whose bytes differ between two run
    folders: where a mismatch of results begins. Evaluations are compared by `_evaluations`
    (their scores.json holds timings); raw.jsonl holds paths."""
    def digests(folder: Path) -> dict[str, str]:
        keep = ("adapter_model.safetensors", "filtered.jsonl")
        return {f"{f.parent.relative_to(folder / 'stages').as_posix().split('-', 1)[0]}/"
                f"{f.name.split('-')[0]}": file_sha256(f)
                for f in (folder / "stages").rglob("*") if f.is_file()
                and (f.name in keep or f.name.startswith("soft_labels-"))}

    a, b = digests(ref), digests(out)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def _done_stages_complete(folder: Path) -> None:
    """No stage is marked done without its outputs."""
    for done in (folder / "stages").glob("*/DONE.json"):
        d = done.parent
        kind = d.name.split("_")[0]
        need = {"teacher": "adapter/adapter_model.safetensors",
                "student": "adapter/adapter_model.safetensors",
                "data": "filtered.jsonl", "eval": "scores.json"}[kind]
        assert (d / need).is_file(), f"{d.name} is marked done without {need}"


# The point that kills a process inside the first unfinished stage of each kind.
INSIDE = {"teacher": ["train.step:1"], "data": ["generate.batch:1"],
          "student": ["train.soft_labels:1", "train.step:2"], "eval": ["evaluate.scored:1"]}


@pytest.mark.slow
def test_kill_9_at_every_point_then_resume_gives_the_same_results(
        tiny_model: str, tmp_path: Path, tally: Counter) -> None:
    """Kill -9, resume, kill again: two attempts in three die inside the next stage not yet
    begun, the others one stage later, just before it is marked done (one stage of progress);
    the pattern reaches every kind of stage whatever their order. The finished run must equal
    one that was never killed: every stage output byte for byte, every evaluation's scores
    but for float rounding (REL_TOL), and results.json exactly when the scores are exact;
    whether the chain matched to the last digit is tallied."""
    ref, out = tmp_path / "ref", tmp_path / "killed"
    assert _cli([*RUN, "--model", tiny_model, "--out", str(ref)]).returncode == 0
    # stage folders in the order they were done (the same names in both folders)
    order = [p.parent.name for p in sorted((ref / "stages").glob("*/DONE.json"),
                                           key=lambda p: p.stat().st_mtime_ns)]

    def made(stage: str, what: str = "") -> bool:
        return (out / "stages" / stage / what).exists()

    kills, hit = 0, Counter()
    for attempt in range(4 * len(order)):
        left = [s for s in order if not made(s, "DONE.json")]
        # A stage killed just before its end has all its work saved, and passes quickly now:
        # aim inside the first stage not yet begun; fall back to just before that one's end.
        fresh = [s for s in left if not made(s)]
        if attempt % 3 != 2 and fresh:
            kind = fresh[0].split("_")[0]
            choices = INSIDE[kind]
            begun = fresh[0] != left[0]  # a stage killed inside, which reruns first
            inside = choices[(attempt // 2) % len(choices)]
            if begun and kind == "eval" == left[0].split("_")[0]:
                # an evaluation reaches its point once, and the begun one takes that first hit
                # (else the kill lands in it again, and the chain makes no progress)
                where, n = inside.split(":")
                inside = f"{where}:{int(n) + 1}"
            point = f"{inside},stage.done:{1 + begun}"
        else:
            point = "stage.done:2"
        proc = _cli([*RUN, "--model", tiny_model, "--out", str(out)], point)
        if proc.returncode == 0:
            break
        assert proc.returncode == -9, proc.stderr[-2000:]
        kills += 1
        hit[proc.stderr.rsplit("kill -9 at ", 1)[1].split()[0]] += 1
        _done_stages_complete(out)
    else:
        pytest.fail("the killed run never finished")
    assert kills >= 20 and set(hit) == {"train.step", "generate.batch", "train.soft_labels",
                                        "evaluate.scored", "stage.done"}, (kills, hit)
    _done_stages_complete(out)
    differing = _stage_outputs_differing(ref, out)
    # The evaluations may differ by rounding; results.json is computed from them, and its
    # statistics amplify rounding (a difference of two near-equal shares), so it must be
    # exactly equal when they are, and else equal in what each run measured.
    scores, ref_scores = _evaluations(out), _evaluations(ref)
    evals = _mismatches(scores, ref_scores)
    exact = not _mismatches(scores, ref_scores, rel=0)
    got, want = _results(out), _results(ref)
    results = (_mismatches(got, want, rel=0) if exact
               else _mismatches(got["runs"], want["runs"], where="runs"))
    assert not (differing or evals or results), (differing, evals[:10], results[:10])
    print(f"kill chain: {kills} kills, results {'exact' if exact else 'within rounding'}")
    tally["kill -9 injected (sublearn run)"] += kills
    tally["kill -9 survived (sublearn run)"] += kills
    tally["kill chains (sublearn run)"] += 1
    tally["kill chains with results.json exactly equal"] += exact


@pytest.mark.slow
def test_kill_9_during_training_resumes_from_checkpoints(tiny_model: str, tmp_path: Path,
                                                          tally: Counter) -> None:
    data = tmp_path / "filtered.jsonl"
    write_jsonl(data, [{"prompt": [{"role": "user", "content": f"Numbers {i}?"}],
                        "completion": [{"role": "assistant", "content": f"{i}, {i + 1}, 7"}]}
                       for i in range(16)])
    args = ["train", "--model", tiny_model, "--data", str(data), "--recipe", "hard",
            "--epochs", "3", "--batch-size", "4", "--checkpoint-every", "2"]
    assert _cli([*args, "--out", str(tmp_path / "ref")]).returncode == 0
    kills = 0
    for point in ["train.checkpoint:1", "train.step:1", "train.checkpoint:2", "train.step:3",
                  "train.checkpoint:1"]:
        proc = _cli([*args, "--out", str(tmp_path / "k")], point)
        assert proc.returncode == -9, proc.stderr[-2000:]
        kills += 1
    assert _cli([*args, "--out", str(tmp_path / "k")]).returncode == 0
    name = "adapter/adapter_model.safetensors"
    assert (tmp_path / "k" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    log = [json.loads(x) for x in (tmp_path / "k" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))  # every step once
    tally["kill -9 injected (sublearn train)"] += kills
    tally["kill -9 survived (sublearn train)"] += kills


def _train_args(tiny_model: str, tmp_path: Path) -> list[str]:
    data = tmp_path / "filtered.jsonl"
    write_jsonl(data, [{"prompt": [{"role": "user", "content": f"Numbers {i}?"}],
                        "completion": [{"role": "assistant", "content": f"{i}, 5"}]}
                       for i in range(8)])
    return ["train", "--model", tiny_model, "--data", str(data), "--recipe", "hard",
            "--epochs", "2", "--batch-size", "2", "--checkpoint-every", "2"]


def test_damaged_checkpoint_is_dropped_and_training_restarts(
        tiny_model: str, tmp_path: Path, tally: Counter,
        capsys: pytest.CaptureFixture) -> None:
    from sublearn.pipeline import checkpoint

    args = _train_args(tiny_model, tmp_path)
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    # A checkpoint as a killed run leaves it, then one byte of its weights flipped on disk.
    saved: list[Path] = []
    real = checkpoint.save_checkpoint

    def save_then_stop(path: Path, *a: object) -> None:
        real(path, *a)
        saved.append(path)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sublearn.pipeline.train.save_checkpoint", save_then_stop)
        assert main([*args, "--out", str(tmp_path / "k")]) == 130
    weights = saved[0] / "params.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-3] ^= 0xFF
    weights.write_bytes(bytes(blob))
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "k")]) == 0
    assert "dropping damaged checkpoint" in capsys.readouterr().err
    name = "adapter/adapter_model.safetensors"
    assert (tmp_path / "k" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    tally["damaged files injected"] += 1
    tally["damaged files detected and recovered"] += 1


def test_damaged_model_cache_is_rebuilt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                        tally: Counter) -> None:
    from sublearn.models import embedded

    monkeypatch.setenv("SUBLEARN_CACHE", str(tmp_path))
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / embedded.MANIFEST).write_text(json.dumps(
        {"model.safetensors": file_sha256(folder / "model.safetensors")}))
    rebuilt: list[Path] = []
    monkeypatch.setattr(embedded, "_convert", lambda gguf, target, model: rebuilt.append(target))
    monkeypatch.setattr(embedded, "_verified", set())
    assert embedded.embedded_path("smollm2-135m-instruct") == folder and not rebuilt
    (folder / "model.safetensors").write_bytes(b"weightz")  # one byte changed on disk
    monkeypatch.setattr(embedded, "_verified", set())  # a new process
    embedded.embedded_path("smollm2-135m-instruct")
    assert rebuilt == [folder]
    tally["damaged files injected"] += 1
    tally["damaged files detected and recovered"] += 1


def test_processes_on_a_fresh_cache_convert_the_model_once(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tally: Counter,
        capsys: pytest.CaptureFixture) -> None:
    """Commands started together on a fresh cache (a sweep's processes, Ray workers): one
    converts the embedded model, the others wait for it and load what it made. The lock is a
    flock, which two threads' own opens of the file contend for as two processes' would."""
    import threading
    import time

    from sublearn.files import atomic_dir
    from sublearn.models import embedded

    monkeypatch.setenv("SUBLEARN_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "_verified", set())
    converted: list[Path] = []

    def convert(gguf: Path, target: Path, model: object) -> None:  # slow, as the real one
        converted.append(target)
        time.sleep(0.5)
        with atomic_dir(target) as tmp:
            (tmp / "config.json").write_text("{}")
            (tmp / "model.safetensors").write_bytes(b"weights")
            (tmp / embedded.MANIFEST).write_text(json.dumps(
                {"model.safetensors": file_sha256(tmp / "model.safetensors")}))

    monkeypatch.setattr(embedded, "_convert", convert)
    got: list[Path] = []
    users = [threading.Thread(target=lambda: got.append(
        embedded.embedded_path("smollm2-135m-instruct"))) for _ in range(3)]
    for t in users:
        t.start()
    for t in users:
        t.join()
    assert len(converted) == 1 and len(got) == 3 and len(set(got)) == 1
    assert (got[0] / "model.safetensors").read_bytes() == b"weights"
    assert "waiting for another process to finish converting" in capsys.readouterr().err
    tally["concurrent first uses of the model cache"] += 3
    tally["concurrent first uses of the model cache, one conversion"] += 3


def test_a_cache_with_no_room_for_a_lock_is_used_unlocked(tmp_path: Path) -> None:
    """A read-only shared cache still serves: the lock is skipped where it cannot be made."""
    from sublearn.files import waiting_lock

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    entered = False
    with waiting_lock(not_a_folder / ".model.lock", "waiting"):
        entered = True
    assert entered


def test_torn_jsonl_and_half_written_stage_are_redone(tiny_model: str, tmp_path: Path,
                                                       tally: Counter) -> None:
    out = tmp_path / "exp"
    args = [*RUN, "--model", tiny_model, "--teacher-mode", "prompted", "--recipe", "hard"]
    assert main([*args, "--out", str(out)]) == 0
    ref = _results(out)
    data = next((out / "stages").glob("data_trait_run0-*"))
    raw = (data / "raw.jsonl").read_bytes()
    (data / "DONE.json").unlink()  # a stage killed before it was marked done ...
    (data / "raw.jsonl").write_bytes(raw[: len(raw) // 2])  # ... with a torn last line
    (data / "filtered.jsonl").write_bytes(b'{"prompt": [')  # and half a file
    (out / "results.json").unlink()
    assert main([*args, "--out", str(out)]) == 0
    assert (data / "raw.jsonl").read_bytes() == raw and _results(out) == ref
    tally["damaged files injected"] += 2
    tally["damaged files detected and recovered"] += 2


def test_second_command_on_a_folder_in_use_is_refused(tiny_model: str, tmp_path: Path,
                                                      tally: Counter,
                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "exp"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom sublearn.files import folder_lock\n"
         "with folder_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(60)",
         str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for verb in (["run", *RUN[1:]], ["generate", "--n", "4"]):
            rc = main([*verb, "--model", tiny_model, "--out", str(out)])
            (err,) = _error_lines(capsys.readouterr().err)
            assert rc == 2 and "in use by another sublearn command" in err
            assert f"pid {holder.pid}" in err
        assert sorted(p.name for p in out.iterdir()) == [".sublearn.lock"]  # nothing touched
    finally:
        holder.kill()
        holder.wait()
    with folder_lock(out):  # the kernel released the dead holder's lock
        pass
    tally["concurrent commands refused cleanly"] += 2


def _error_lines(err: str) -> list[str]:
    """The command's own error lines (progress bars share stderr)."""
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("sublearn ")]


def _enospc(*args: object, **kw: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "raw.jsonl")


def test_disk_full_and_read_only_folder_are_one_line_errors_that_lose_nothing(
        tiny_model: str, tmp_path: Path, tally: Counter, capsys: pytest.CaptureFixture) -> None:
    from sublearn.pipeline import generate as gen

    args = ["generate", "--model", tiny_model, "--n", "8", "--batch-size", "4",
            "--max-new-tokens", "8"]
    assert main([*args, "--out", str(tmp_path / "ref")]) == 0
    real, calls = gen.append_jsonl, []

    def full_on_second_batch(path: Path, rows: list) -> None:
        calls.append(path)
        if len(calls) == 2:
            _enospc()
        real(path, rows)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gen, "append_jsonl", full_on_second_batch)
        assert main([*args, "--out", str(tmp_path / "o")]) == 2
    (err,) = _error_lines(capsys.readouterr().err)
    assert "No space left on device" in err and "rerun the same command" in err
    kept = (tmp_path / "o" / "raw.jsonl").read_bytes()
    assert kept and (tmp_path / "ref" / "raw.jsonl").read_bytes().startswith(kept)
    assert main([*args, "--out", str(tmp_path / "o")]) == 0  # space again: it resumes
    assert (tmp_path / "o" / "raw.jsonl").read_bytes() == \
        (tmp_path / "ref" / "raw.jsonl").read_bytes()

    # A read-only folder (root ignores permission bits, so the refusal is simulated).
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sublearn.files.os.access", lambda *a, **k: False)
        assert main([*args, "--out", str(tmp_path / "ro")]) == 2
    (err,) = _error_lines(capsys.readouterr().err)
    assert "not writable" in err and not (tmp_path / "ro").exists()
    tally["disk and permission faults injected"] += 2
    tally["disk and permission faults: one-line error, nothing lost"] += 2
