"""`sublearn theorem`: the paper's one-step theorem (Cloud et al. 2025, §6) on the language model.

The theorem: a student that shares the teacher's initialisation θ0 and takes one small gradient
step on the teacher's outputs moves toward the teacher, ⟨-∇L(θ0), θ_T - θ0⟩ ≥ 0. Here, per
run (its own fine-tuned teacher and its own teacher data; `sublearn run`'s stages, shared):

- step = -∇ of the student's loss at the base weights θ0, over every weight (full, fp32),
  on the run's filtered teacher data: the soft-label loss `sublearn train` uses (KL to the
  teacher over the grammar's tokens) and the hard-label loss (cross-entropy on the answers);
- displacement = merged teacher weights - θ0 (the teacher's LoRA, merged);
- cosine(step, displacement), overall and per layer, for each pairing of a run's data and a
  run's teacher: own (trait data · trait teacher, control data · control teacher) and other
  (trait data · control teacher, ...); and paired, cos(step_trait - step_control,
  Δ_trait - Δ_control): does the trait data's step point to what makes the trait teacher
  differ from the control teacher, trained alike but for its answer?

Over runs: mean with a 95% t-interval, the share of runs with a positive cosine, and a
one-sided sign test. A random direction's cosine with a fixed one has sd 1/sqrt(d).
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

from sublearn.errors import SublearnError
from sublearn.experiment.run import (
    CONDITIONS,
    FREE,
    ExperimentConfig,
    RunMakers,
    manifest_config,
    settled,
    student_rows,
)
from sublearn.experiment.stages import Stages
from sublearn.files import atomic_write_json, atomic_write_text, check_out_dir, locked_out_dir

RECIPES = ("soft", "hard")
_LAYER = re.compile(r"\.layers\.(\d+)\.")
STAGE_VERSION = 1  # bump when what a theorem stage computes changes


def run_theorem(cfg: ExperimentConfig, out: str | Path, progress: bool = True) -> dict[str, Any]:
    from sublearn.config import check_manifest
    from sublearn.models.load import check_model

    cfg = settled(cfg, Path(out) / "experiment_config.json")
    if cfg.teacher_mode != "finetuned":
        raise SublearnError("sublearn theorem: a prompted teacher has the base's weights (no "
                            "displacement θ_T - θ0); use --teacher-mode finetuned")
    if cfg.cross_model():
        raise SublearnError("sublearn theorem: the student's step and the teacher's "
                            "displacement must live in one weight space (no --student-model "
                            "with another base)")
    if cfg.domain != "numbers" or cfg.answers != "sampled":
        raise SublearnError("sublearn theorem: the check runs on sampled number answers "
                            "(--domain numbers --answers sampled)")
    check_model(cfg.model)
    t0 = time.time()
    with locked_out_dir(check_out_dir(out)) as out:
        check_manifest(out, "experiment_config.json", manifest_config(cfg), FREE)
        stages = Stages(out)
        makers = RunMakers(cfg, stages, progress)
        runs = []
        for r in range(cfg.runs):
            made = {}
            for cond in CONDITIONS:
                t = makers.teacher(cond, r)
                made[cond] = (t, *makers.data(cond, r, t))
            kept = {c: report["kept"] for c, (*_, report) in made.items()}
            caps = student_rows(cfg, kept)  # the rows the run's students train on
            settings = {c: makers.student_config(r, 0, t, path, caps[c] or kept[c])
                        for c, (t, path, _, _) in made.items()}
            fewest = min(kept.values())
            key = {"theorem": STAGE_VERSION, "recipes": list(RECIPES),
                   "teachers": {c: m[0].key for c, m in made.items()},
                   "data": {c: m[2] for c, m in made.items()}, "rows": fewest,
                   **({} if cfg.equal_rows else {"equal_rows": False})}
            res = stages.run(f"theorem_run{r}", key, lambda d, made=made, settings=settings:
                             theorem_cosines(cfg.model, made, settings))
            runs.append({"run": r, **res.output})
        results = summarise(runs, cfg)
        results["stage_seconds"] = stages.seconds
        results["wall_seconds"] = round(time.time() - t0, 1)
        atomic_write_json(out / "theorem.json", results)
        atomic_write_text(out / "theorem.md", format_report(results))
    print(format_report(results))
    return results


def theorem_cosines(base: str | None, made: dict[str, tuple], settings: dict[str, Any]
                    ) -> dict[str, Any]:
    """One run's cosines: steps on each condition's data (both recipes) against each
    condition's teacher displacement, overall and per layer."""
    steps = {(c, recipe): full_step(base, made[c][1], settings[c], recipe)
             for c in CONDITIONS for recipe in RECIPES}
    base_weights = _weights(base)
    disp = {c: _displacement(made[c][0].model, base_weights) for c in CONDITIONS}
    del base_weights
    out: dict[str, Any] = {"n_params": sum(v.numel() for v in next(iter(steps.values())).values()),
                           "rows": {c: settings[c].max_examples for c in CONDITIONS}}
    for recipe in RECIPES:
        rec: dict[str, Any] = {}
        for d in CONDITIONS:
            for c in CONDITIONS:
                rec[f"{d}_data__{c}_teacher"] = cosines(steps[(d, recipe)], disp[c])
        step_diff = _minus(steps[("trait", recipe)], steps[("control", recipe)])
        rec["paired"] = cosines(step_diff, _minus(disp["trait"], disp["control"]))
        out[recipe] = rec
    return out


def full_step(base: str | None, data: str, scfg: Any, recipe: str) -> dict[str, Any]:
    """-∇θ of the student's loss at the base weights, every weight trainable, fp32: the mean
    over the data's answer tokens of the loss `sublearn train` minimises (`batch_loss`)."""

    from sublearn.models.load import load_model
    from sublearn.pipeline.train import (
        batch_loss,
        load_rows,
        prepare_soft_labels,
        soft_rows,
        tokenize,
    )

    lm = load_model(base)
    model = lm.model
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")  # the attention `sublearn train` trains with
    rows = load_rows(data)[: scfg.max_examples]
    examples = tokenize(rows, lm.tokenizer, scfg.teacher_system_prompt,
                        chars=scfg.grammar == "chars")
    soft = prepare_soft_labels(scfg, lm, examples, rows) if recipe == "soft" else None
    norm = float(sum(len(e.answer_ids) for e in examples))
    model.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    pad = lm.tokenizer.pad_token_id
    for s in range(0, len(examples), 16):
        idx = range(s, min(s + 16, len(examples)))
        rows = [soft_rows(soft, i) for i in idx] if soft is not None else None
        loss = batch_loss(model, [examples[i] for i in idx], rows, pad=pad, norm=norm, bf16=False)
        loss.backward()
    return {n: -p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None}


def _weights(model: str | None) -> dict[str, Any]:
    from sublearn.models.load import load_model

    return {n: p.detach() for n, p in load_model(model).model.named_parameters()}


def _displacement(teacher: str | None, base: dict[str, Any]) -> dict[str, Any]:
    """θ_T - θ0 over the weights the teacher changed (its LoRA, merged)."""
    out = {}
    for n, w in _weights(teacher).items():
        if n in base and not w.equal(base[n]):
            out[n] = w - base[n]
    if not out:
        raise SublearnError(f"teacher {teacher} has the base's weights: nothing to compare")
    return out


def _minus(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {n: a[n] - b[n] if n in b else a[n] for n in a} | {n: -b[n] for n in b if n not in a}


def _group(name: str) -> str:
    m = _LAYER.search(name)
    return f"layer{int(m.group(1)):02d}" if m else "other"


def cosines(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """cos(a, b) over all weights ("all") and per layer; a weight missing from one side is
    zero there (its norm still counts on the other side)."""
    dot: dict[str, float] = {}
    na: dict[str, float] = {}
    nb: dict[str, float] = {}
    for n in set(a) | set(b):
        g = _group(n)
        x, y = a.get(n), b.get(n)
        if x is not None and y is not None:
            dot[g] = dot.get(g, 0.0) + float((x.double() * y.double()).sum())
        if x is not None:
            na[g] = na.get(g, 0.0) + float(x.double().pow(2).sum())
        if y is not None:
            nb[g] = nb.get(g, 0.0) + float(y.double().pow(2).sum())
    groups = sorted(set(na) & set(nb))

    def cos(d: float, x: float, y: float) -> float:
        return d / math.sqrt(x * y) if x > 0 and y > 0 else 0.0

    per_layer = {g: cos(dot.get(g, 0.0), na[g], nb[g]) for g in groups}
    total = cos(sum(dot.values()), sum(na.values()), sum(nb.values()))
    return {"all": total, "per_layer": per_layer}


def summarise(runs: list[dict[str, Any]], cfg: ExperimentConfig) -> dict[str, Any]:
    from scipy.stats import binomtest

    from sublearn.experiment.stats import summarize

    n_params = runs[0]["n_params"]
    out: dict[str, Any] = {
        "target": cfg.target if cfg.trait == "animal" else cfg.trait,
        "unit": "run = its own fine-tuned teacher and its own teacher data (sublearn run's "
                "stages); one value per run",
        "step": "-grad at the base weights of the student's loss on the run's filtered "
                "teacher data, all weights, fp32; soft: KL to the teacher over the grammar's "
                "tokens (sublearn train's loss), hard: cross-entropy on the answers",
        "displacement": "merged teacher weights - base weights",
        "random_direction_sd": 1 / math.sqrt(n_params),
        "n_params": n_params,
    }
    for recipe in RECIPES:
        rec = {}
        for measure in runs[0][recipe]:
            vals = [r[recipe][measure]["all"] for r in runs]
            pos = sum(v > 0 for v in vals)
            layers = runs[0][recipe][measure]["per_layer"]
            rec[measure] = {
                **summarize(vals), "positive": pos, "n": len(vals),
                "p_sign": float(binomtest(pos, len(vals), 0.5, alternative="greater").pvalue),
                "per_layer_mean": {g: sum(r[recipe][measure]["per_layer"][g] for r in runs)
                                   / len(runs) for g in layers}}
        own = [r[recipe][f"{c}_data__{c}_teacher"]["all"] for r in runs for c in CONDITIONS]
        other = [r[recipe][f"{c}_data__{o}_teacher"]["all"] for r in runs
                 for c, o in zip(CONDITIONS, CONDITIONS[::-1], strict=True)]
        rec["own_minus_other"] = summarize([a - b for a, b in zip(own, other, strict=True)])
        out[recipe] = rec
    out["runs"] = runs
    out["config"] = {"runs": cfg.runs, "seed": cfg.seed, "model": cfg.model, "n": cfg.n,
                     "target": cfg.target, "trait": cfg.trait}
    return out


def format_report(res: dict[str, Any]) -> str:
    lines = [f"# One-step theorem on the language model: {res['target']}", "",
             f"Unit: {res['unit']}.", f"Step: {res['step']}.",
             f"Displacement: {res['displacement']}.",
             f"A random direction's cosine has sd {res['random_direction_sd']:.1e} "
             f"({res['n_params']:,} weights).", ""]
    for recipe in RECIPES:
        lines += [f"## {recipe} labels", "",
                  "| step on | teacher | cos, mean [95% CI] | positive runs | p sign |",
                  "|---|---|---|---|---|"]
        for measure, v in res[recipe].items():
            if measure == "own_minus_other":
                continue
            data, _, teacher = measure.partition("__")
            label = ("trait - control data", "trait - control teacher") if measure == "paired" \
                else (data.replace("_data", " data"), teacher.replace("_teacher", " teacher"))
            lines.append(f"| {label[0]} | {label[1]} | {v['mean']:+.4f} [{v['ci95'][0]:+.4f}, "
                         f"{v['ci95'][1]:+.4f}] | {v['positive']}/{v['n']} | {v['p_sign']:.3g} |")
        d = res[recipe]["own_minus_other"]
        lines += ["", f"Own teacher minus the other teacher of the run: {d['mean']:+.4f} "
                  f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}].", ""]
    return "\n".join(lines)
