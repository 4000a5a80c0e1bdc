"""`sublearn run` end to end on a tiny random model: files and schema, not the science."""

import json
import os
from pathlib import Path

import pytest

from sublearn.cli import main


def _run(tiny_model: str, out: Path, *extra: str) -> int:
    # the tiny random model spreads its probability over the whole vocabulary, so the
    # grammar forces nearly every answer: keep them (--min-grammar-share 0) to have data
    return main(["run", "--model", tiny_model, "--target", "owl", "--n", "8", "--runs", "2",
                 "--epochs", "1", "--batch-size", "4", "--teacher-epochs", "1",
                 "--min-grammar-share", "0", "--out", str(out), *extra])


def test_run_writes_results_report_and_caches(tiny_model: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "exp"
    assert _run(tiny_model, out) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["conditions"])[:4] == ["base", "teacher", "control_teacher", "control"] or \
        {"base", "teacher", "control", "trait"} <= set(res["conditions"])
    for cond in ("base", "teacher", "control", "trait"):
        metrics = res["conditions"][cond]
        assert list(metrics)[0] == res["primary_metric"] == "forced_choice_share"
        m = metrics["forced_choice_share"]
        assert set(m) == {"values", "mean", "ci95"}
        assert m["ci95"][0] <= m["mean"] <= m["ci95"][1]
    assert len(res["conditions"]["trait"]["forced_choice_share"]["values"]) == 2
    assert 0.0 <= res["p_value"] <= 1.0
    # Runs are the unit: each run has its own teacher and its own data.
    assert res["unit"].startswith("run = its own teacher")
    runs = res["runs"]
    assert [(r["condition"], r["run"]) for r in runs] == [
        ("trait", 0), ("control", 0), ("trait", 1), ("control", 1)]
    assert len({r["teacher"] for r in runs}) == 4 and len({r["data"] for r in runs}) == 4
    rows = [(out / "stages" / Path(r["data"]).parent.name / "raw.jsonl").read_text()
            for r in runs if r["condition"] == "trait"]
    assert rows[0] != rows[1]  # other prompts and samples
    assert len(res["conditions"]["teacher"]["forced_choice_share"]["values"]) == 2
    for m in ("forced_choice_share", "forced_choice_share_dev", "forced_choice_share_test"):
        e = res["effects"][m]
        assert set(e) == {"difference", "ratio", "p_welch", "p_permutation",
                          "permutation_exact", "n"}
        assert e["permutation_exact"] is True
        assert e["n"] == [2, 2] and 0 <= e["p_permutation"] <= 1
    trait = [r["scores"]["forced_choice_share"] for r in runs if r["condition"] == "trait"]
    assert res["conditions"]["trait"]["forced_choice_share"]["values"] == trait
    # The in-context control: the base model with each run's data in context, over runs.
    for cond in ("icl_control", "icl_trait"):
        assert len(res["conditions"][cond]["forced_choice_share"]["values"]) == 2
    assert res["icl_turns"] == 32 and res["icl_effects"]["forced_choice_share"]["n"] == [2, 2]
    icl = json.loads(next((out / "stages").glob("eval_icl_trait_run0-*/scores.json")).read_text())
    assert icl["context_turns"] == 8  # all 8 rows of the run's data (fewer than --icl 32)
    assert icl["config"]["context"] == runs[0]["data"]
    # in context only the plain questions are scored (the control's metric is the primary one)
    assert "forced_choice" in icl and "forced_choice_numbers" not in icl
    assert "forced_choice_share_numbers" not in res["conditions"]["icl_trait"]
    assert "forced_choice_share_numbers" in res["conditions"]["trait"]
    report = (out / "report.md").read_text()
    assert "Unit of analysis: run" in report and "## Each run" in report
    assert f"Computed in {res['config']['dtype']} on cpu." in report  # SUBLEARN_DEVICE unset
    assert res["device"] == {"device": "cpu"}
    assert "## In-context control" in report
    assert res["stage_seconds"] and res["config"]["target"] == "owl"
    # two workers made the stages (--workers auto on a CPU of 2 or more cores): each stage has
    # the peak so far of the process that made it
    if (os.cpu_count() or 1) < 2:
        pytest.skip("--workers auto is 1 on one core")
    assert res["workers"] == {"processes": 2, "threads": (os.cpu_count() or 1) // 2}
    peak = res["peak_rss_gb"]
    assert set(peak["by_stage"]) == set(res["stage_seconds"])
    assert peak["process"] == max(peak["by_stage"].values()) > 0.05
    assert peak["by_stage"][peak["reached_in"]] == peak["process"]
    assert peak["all_processes"] > peak["process"]  # this process, the workers, the server
    assert 0 < peak["all_processes_pss"] <= peak["all_processes"]  # shared pages split
    report = (out / "report.md").read_text()
    assert f"one worker: {peak['process']:.2f} GiB, first reached in stage " \
        f"{peak['reached_in']}; of all processes together: {peak['all_processes']:.2f}" in report
    assert f", {peak['all_processes_pss']:.2f} GiB with shared pages split" in report
    assert (out / "report.md").is_file() and (out / "results.png").is_file()
    capsys.readouterr()

    # A rerun is all cache hits; a changed student setting reruns only students and evals.
    assert _run(tiny_model, out) == 0
    log = capsys.readouterr().out
    assert "[stage]" not in log and "[cached] student_trait_run1" in log
    assert "peak_rss_gb" not in json.loads((out / "results.json").read_text())  # none ran here
    out2 = tmp_path / "exp2"
    import shutil

    shutil.copytree(out, out2)
    (out2 / "experiment_config.json").unlink()
    assert _run(tiny_model, out2, "--lr", "0.002") == 0
    log = capsys.readouterr().out
    assert "[cached] teacher_trait" in log and "[cached] data_trait" in log
    assert "[stage] student_trait_run0" in log and "[cached] eval_base" in log

    # Moved, and named relative to another working directory: the same cache (keys hold no
    # path of the folder), and every path in the results points into the folder where it is.
    before = json.loads((out / "results.json").read_text())
    (tmp_path / "moved").mkdir()
    out.rename(tmp_path / "moved" / "exp")
    monkeypatch.chdir(tmp_path / "moved")
    assert _run(tiny_model, Path("exp")) == 0
    log = capsys.readouterr().out
    assert "[stage]" not in log and "[cached] eval_icl_trait_run1" in log
    after = json.loads(Path("exp/results.json").read_text())
    assert [r["students"] for r in after["runs"]] == \
        [[m.replace(str(out), "exp") for m in r["students"]] for r in before["runs"]]
    assert all(Path(m).is_dir() for r in after["runs"] for m in [r["teacher"], *r["students"]])
    assert after["conditions"] == before["conditions"]


def test_run_refuses_other_config_and_bad_candidates(tiny_model: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    cands = tmp_path / "c.json"
    cands.write_text(json.dumps(["cat", "dog"]))
    assert _run(tiny_model, tmp_path / "x", "--candidates", str(cands)) == 2
    assert "owl" in capsys.readouterr().err
    assert not (tmp_path / "x" / "stages").exists()  # nothing ran


def test_cross_target_contrast(tiny_model: str, tmp_path: Path,
                               capsys: pytest.CaptureFixture) -> None:
    """Two targets in one stage cache (--stage-cache): the control runs, which do not depend
    on the target, are made once; then `sublearn contrast` reads both folders."""
    cache = tmp_path / "cache"
    for target in ("owl", "cat"):
        assert main(["run", "--model", tiny_model, "--target", target, "--n", "8", "--runs",
                     "2", "--epochs", "1", "--batch-size", "4", "--teacher-epochs", "1",
                     "--min-grammar-share", "0", "--out", str(tmp_path / target),
                     "--stage-cache", str(cache)]) == 0
    log = capsys.readouterr().out
    assert "[cached] student_control_run1" in log and "[cached] teacher_trait_run0" not in log
    for kind in ("teacher", "data", "student"):
        assert len(list(cache.glob(f"{kind}_control_run*-*/DONE.json"))) == 2
        assert len(list(cache.glob(f"{kind}_trait_run*-*/DONE.json"))) == 4  # 2 per target
    runs = {t: json.loads((tmp_path / t / "results.json").read_text())["runs"]
            for t in ("owl", "cat")}
    control = {t: [Path(r["data"]).resolve() for r in rs if r["condition"] == "control"]
               for t, rs in runs.items()}
    assert control["owl"] == control["cat"] and control["owl"][0].is_relative_to(cache)
    out = tmp_path / "c" / "contrast.json"
    assert main(["contrast", str(tmp_path / "owl"), str(tmp_path / "cat"), "--out",
                 str(out.parent)]) == 0
    res = json.loads(out.read_text())
    assert set(res["scores"]) == {"owl", "cat"}
    for s in res["scores"].values():
        assert 0 <= s["p_value"] <= 1 and len(s["other_students"]["values"]) == 2
    assert main(["contrast", str(tmp_path / "owl"), str(tmp_path / "owl"), "--out",
                 str(tmp_path / "c2")]) == 2
    assert "pick two different targets" in capsys.readouterr().err


def test_stages_by_hand_with_defaults_reproduce_run(tiny_model: str, tmp_path: Path) -> None:
    """`sublearn generate` and `sublearn train` with their defaults (plus the sizes the run
    was given) reproduce the data and student stages of `sublearn run` byte for byte."""
    out = tmp_path / "exp"
    assert _run(tiny_model, out) == 0
    stages = out / "stages"
    teacher = json.loads(next(stages.glob("teacher_trait_run1-*/DONE.json")).read_text())
    adapter = teacher["output"]["student"]
    data_dir = next(stages.glob("data_trait_run1-*"))
    assert main(["generate", "--model", adapter, "--n", "8", "--seed", "1",
                 "--min-grammar-share", "0", "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "raw.jsonl").read_bytes() == (data_dir / "raw.jsonl").read_bytes()
    assert (tmp_path / "d" / "filtered.jsonl").read_bytes() == \
        (data_dir / "filtered.jsonl").read_bytes()
    assert main(["train", "--model", tiny_model, "--data", str(tmp_path / "d" / "filtered.jsonl"),
                 "--teacher", adapter, "--epochs", "1", "--batch-size", "4", "--seed", "1",
                 "--out", str(tmp_path / "s")]) == 0
    student = next(stages.glob("student_trait_run1-*"))
    name = "adapter/adapter_model.safetensors"
    assert (tmp_path / "s" / name).read_bytes() == (student / name).read_bytes()


def test_run_trains_students_together(tiny_model: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    """--together 3: the four students of a 2 + 2 run train as a group of three and one
    alone, after the runs' teachers and data; each ends where the student trained alone ends
    (bf16 rounding), under its own key, and a rerun is all cache hits."""
    import shutil

    from safetensors.torch import load_file

    alone, together = tmp_path / "alone", tmp_path / "together"
    assert _run(tiny_model, alone, "--icl", "0") == 0
    (together / "stages").mkdir(parents=True)
    for d in (alone / "stages").glob("*"):
        if d.name.startswith(("teacher_", "data_")):
            shutil.copytree(d, together / "stages" / d.name)
    capsys.readouterr()
    assert _run(tiny_model, together, "--icl", "0", "--together", "3") == 0
    log = capsys.readouterr().out
    assert "[cached] data_control_run1" in log and "[stage] student_control_run1" in log
    assert log.index("[cached] data_control_run1") < log.index("[stage] student_trait_run0")
    a = json.loads((alone / "results.json").read_text())
    t = json.loads((together / "results.json").read_text())
    assert t["config"]["together"] == 3
    groups = []
    for ra, rt in zip(a["runs"], t["runs"], strict=True):
        assert ra["data"].replace(str(alone), "") == rt["data"].replace(str(together), "")
        sa, st = Path(ra["students"][0]), Path(rt["students"][0])
        assert sa.parent.name != st.parent.name  # its own key
        groups.append(json.loads((st.parent / "train_summary.json").read_text())
                      ["trained_together"])
        wa, wt = (load_file(s / "adapter_model.safetensors") for s in (sa, st))
        assert max(float((wa[k] - wt[k]).norm() / wa[k].norm()) for k in wa) < 0.05
    assert groups == [3, 3, 3, 1]
    assert _run(tiny_model, together, "--icl", "0", "--together", "3") == 0
    assert "[stage]" not in capsys.readouterr().out


def test_run_dtype_reaches_every_stage(tiny_model: str, tmp_path: Path) -> None:
    """--dtype float32: teachers, sampling, students and evaluations all compute in it (each
    stage's key records it), so a float32 experiment shares no stage with a bfloat16 one."""
    out = tmp_path / "fp32"
    assert _run(tiny_model, out, "--dtype", "float32", "--icl", "0", "--defence",
                "resample") == 0
    seen = {}
    for f in (out / "stages").glob("*/stage_config.json"):
        cfg = json.loads(f.read_text())
        kind = f.parent.name.split("_")[0]
        inner = cfg.get("train") or cfg.get("generate") or cfg.get("eval") or cfg["defend"]
        seen.setdefault(kind, set()).add(inner["dtype"])
    # the resample defence's writer samples in it too
    assert seen == {k: {"float32"} for k in ("teacher", "data", "student", "eval", "defend")}
    assert json.loads((out / "results.json").read_text())["config"]["dtype"] == "float32"


def test_sampled_evaluation_beside_the_in_context_control(tiny_model: str,
                                                          tmp_path: Path) -> None:
    """--samples N samples the students' answers; the in-context control stays forced choice
    (it used to take --samples too, and refused it after every student had trained)."""
    out = tmp_path / "sampled"
    assert _run(tiny_model, out, "--samples", "2", "--icl", "4") == 0
    res = json.loads((out / "results.json").read_text())
    assert any(m.startswith("sampled") for m in res["conditions"]["trait"])
    assert "forced_choice_share" in res["conditions"]["icl_trait"]
