"""`sublearn audit --experiment DIR`: how well do the detectors tell an experiment's trait
datasets from its control datasets, runs as the unit?

Each run's trait data and control data get one dataset score per detector:
  teacher  mean LLS per token under a *held-out* trait teacher -- run r's datasets are scored
           by the trait teacher of run r+1 (mod runs), so the trait data is never scored by
           the model that wrote it (an auditor suspects a trait, not the exact model);
  probe    (--probe) the base fine-tuned briefly on the dataset: log(target share after /
           target share of the base), forced choice on the evaluation questions.
The ROC-AUC over datasets and a permutation test over runs (trait > control; exact up to
100,000 splits) follow.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from sublearn.errors import SublearnError
from sublearn.experiment.stages import find_recorded
from sublearn.files import atomic_write_json, atomic_write_text


def audit_experiment(exp: str | Path, out: str | Path, probe: bool = False,
                     max_samples: int | None = None, probe_epochs: float = 1.0,
                     progress: bool = True, dtype: str = "float32",
                     target: str | None = None) -> dict[str, Any]:
    """Score every run's trait and control data of the `sublearn run` folder `exp` with a
    held-out teacher (and the probe); `target`, when given, must be the experiment's."""
    from sublearn.audit.audit import AuditConfig, _probe, roc_auc
    from sublearn.audit.scores import score_rows
    from sublearn.experiment.report import read_run_results
    from sublearn.experiment.stats import permutation_exact, permutation_one_sided
    from sublearn.files import check_out_dir, locked_out_dir
    from sublearn.models import load_model
    from sublearn.pipeline.evaluate import EvalConfig, evaluate_model
    from sublearn.pipeline.train import load_rows
    from sublearn.protocol.paper import teacher_system_prompt

    exp = Path(exp)
    res = read_run_results(exp, config_keys=("target", "category"), run_keys=("data",))
    conf = res["config"]
    runs = sorted(res["runs"], key=lambda r: (r["run"], r["condition"]))
    ids = sorted({r["run"] for r in runs})
    if len(ids) < 2:
        raise SublearnError("an experiment audit needs at least 2 runs per condition")
    if target is not None and conf.get("trait") == "misalignment":
        raise SublearnError(f"--target {target}: a misalignment experiment has no target "
                            "animal (leave --target out)")
    if target is not None and target.strip().lower() != str(conf["target"]).lower():
        raise SublearnError(f"--target {target}: the experiment's target is {conf['target']} "
                            "(--experiment audits for the experiment's own target)")
    if probe and conf.get("trait", "animal") != "animal":
        raise SublearnError("--probe scores the target's forced-choice share: it applies to "
                            "animal-trait experiments")
    check_out_dir(out)
    prompted = conf.get("teacher_mode") == "prompted"
    # prompted teachers are one model (the base + the trait prompt): nothing to hold out
    trait_teacher = {r["run"]: None if prompted else find_recorded(exp, r["teacher"]) for r in runs
                     if r["condition"] == "trait"}
    system = teacher_system_prompt(conf["target"], conf["category"]) if prompted else None
    base = load_model(conf.get("model"))
    ecfg = EvalConfig(target=conf["target"], questions=conf.get("questions"),
                      candidates=conf.get("candidates"), dtype=conf.get("dtype", "bfloat16"))
    base_share = None
    rows_out: list[dict[str, Any]] = []
    with locked_out_dir(out) as folder:
        for i, r_id in enumerate(ids):
            scorer_path = trait_teacher[ids[(i + 1) % len(ids)]]
            scorer = load_model(scorer_path) if system is None else base
            for run in (r for r in runs if r["run"] == r_id):
                rows = load_rows(find_recorded(exp, run["data"]))[:max_samples]
                ss = score_rows(scorer, base, rows, scorer_system=system, progress=progress,
                                dtype=dtype)
                rec = {"run": r_id, "condition": run["condition"],
                       "scorer": scorer_path or "base + the trait system prompt",
                       "teacher_lls": statistics.fmean(s.lls_mean for s in ss),
                       "teacher_kl": statistics.fmean(s.kl_mean for s in ss)}
                if probe:
                    if base_share is None:
                        base_share = evaluate_model(base, ecfg, variants=("plain",))[
                            "forced_choice"]["target_share"]
                    cfg = AuditConfig(probe=True, probe_epochs=probe_epochs, base=conf.get("model"),
                                      seed=r_id)
                    p = _probe(cfg, rows, folder / f"probe_{run['condition']}_run{r_id}",
                               progress)
                    share = evaluate_model(p["model"], ecfg, variants=("plain",))[
                        "forced_choice"]["target_share"]
                    rec["probe_shift"] = math.log(share / base_share)
                rows_out.append(rec)
        detectors = {}
        for name in ("teacher_lls", "teacher_kl", "probe_shift"):
            t = [r[name] for r in rows_out if r["condition"] == "trait" and name in r]
            c = [r[name] for r in rows_out if r["condition"] == "control" and name in r]
            if t and c:
                detectors[name] = {"auc": roc_auc(t, c),
                                   "p_permutation": permutation_one_sided(t, c),
                                   "permutation_exact": permutation_exact(len(t), len(c)),
                                   "trait_mean": statistics.fmean(t),
                                   "control_mean": statistics.fmean(c), "n": [len(t), len(c)]}
        summary = {"experiment": str(exp), "target": conf["target"], "datasets": rows_out,
                   "detectors": detectors,
                   "scorer": "the trait system prompt on the base (the prompted teacher itself)"
                   if prompted else "trait teacher of the next run (held out)",
                   "probe_epochs": probe_epochs if probe else None, "max_samples": max_samples,
                   "dtype": dtype}
        atomic_write_json(folder / "summary.json", summary)
        atomic_write_text(folder / "report.md", format_runs(summary))
        return summary


def format_runs(s: dict[str, Any]) -> str:
    lines = [f"# Audit of the datasets of {s['experiment']} (target {s['target']})", "",
             f"Scorer: {s['scorer']}. Runs are the unit: one score per dataset.", "",
             "| detector | ROC-AUC (trait vs control datasets) | p (permutation, "
             "trait > control) | trait mean | control mean | datasets |",
             "|---|---|---|---|---|---|"]
    for name, d in s["detectors"].items():
        how = "exact" if d.get("permutation_exact", True) else "Monte Carlo"
        lines.append(f"| {name} | {d['auc']:.3f} | {d['p_permutation']:.3g} ({how}) | "
                     f"{d['trait_mean']:.4g} | {d['control_mean']:.4g} | "
                     f"{d['n'][0]} + {d['n'][1]} |")
    lines += ["", "| run | condition | teacher LLS per token | teacher KL per token | "
              "probe log share shift |", "|---|---|---|---|---|"]
    for r in s["datasets"]:
        probe = f"{r['probe_shift']:.4g}" if "probe_shift" in r else "-"
        lines.append(f"| {r['run']} | {r['condition']} | {r['teacher_lls']:.4g} | "
                     f"{r['teacher_kl']:.4g} | {probe} |")
    return "\n".join(lines) + "\n"
