"""`sublearn align`: after training, did each student move toward its own teacher in weight space?

`sublearn theorem` measures the first gradient step; this measures where training ended. For
run r of an experiment (its own teachers, data and students), the LoRA updates ΔW = s·B·A give

  student direction  d_s(r) = mean ΔW(trait students of r) − mean ΔW(control students of r)
  teacher direction  d_t(r) = ΔW(trait teacher of r) − ΔW(control teacher of r)

(the control side takes out what both conditions learn alike), and their cosine over every
adapted weight (`own`).

In `sublearn run` a run's first student and its teachers are seeded alike, so they start from
the same adapter A (LoRA's B starts at zero): the updates of one run share a row space, and a
cosine within a run is larger for that alone. So each cosine is set against its like:
  specific               own − the mean cosine with the other experiments' run-r teachers
                         (other traits, same seeds): what points at this trait;
  specific_across_seeds  the mean cosine with the experiment's teachers of other runs (same
                         trait, other seeds) − that with the other experiments' teachers of
                         other runs (other traits, other seeds).
Runs are the unit: means with 95% t-intervals over runs, a one-sample t-test and an exact
sign-flip test of each > 0. `specific` is also given by depth: the same cosines over each
third of the decoder layers alone. Beside them, what the students' evaluations show (`behaviour`):
the target's log-probability shift split into the target's log-share among the candidates
and a log-mass shift of all candidates alike.

Every inner product is computed from the adapters' low-rank factors (tr((BᵢᵀBⱼ)(AⱼAᵢᵀ)) per
module, fp64), so no dense ΔW is formed and no model is loaded.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from statistics import fmean
from typing import Any, NamedTuple

from sublearn.errors import SublearnError
from sublearn.experiment.stages import find_recorded
from sublearn.experiment.stats import sign_flip_one_sided, summarize, t_one_sided
from sublearn.files import read_json

DEFINITION = (
    "own = cos(mean trait students' ΔW − mean control students' ΔW, trait teacher's ΔW − "
    "control teacher's ΔW), one value per run r; other_traits: the same with run r's teachers "
    "of the other experiments (the same seeds, so the same adapter initialisation as own); "
    "specific = own − mean(other_traits); other_runs: with the experiment's teachers of other "
    "runs (other seeds), against other_runs_other_traits (other experiments, other runs): "
    "specific_across_seeds = their difference. p: one-sided over runs (t, exact sign-flip).")


def _scale(path: str) -> float:
    """The scale s of ΔW = s·B·A of a plain PEFT LoRA adapter folder."""
    folder = Path(path)
    if not (folder / "adapter_config.json").is_file() or not (
            folder / "adapter_model.safetensors").is_file():
        raise SublearnError(f"{path} is not a LoRA adapter folder: `sublearn align` compares "
                            "fine-tuned (LoRA) teachers and students")
    cfg = read_json(folder / "adapter_config.json")
    # features that add to ΔW or change it beyond s·B·A
    extra = [k for k in ("rank_pattern", "alpha_pattern", "use_dora", "modules_to_save")
             if cfg.get(k)]
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("bias", "none") != "none" or extra:
        raise SublearnError(f"{path}: only plain LoRA adapters (one rank and alpha, no DoRA, "
                            "bias or extra modules) are supported")
    try:
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise SublearnError(f"{path}/adapter_config.json has no valid r and lora_alpha") from None
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def layer_grams(paths: list[str]) -> dict[int, Any]:
    """Decoder layer index (-1: a module outside the layers) -> G with G[i, j] = <ΔW_i, ΔW_j>
    summed over that layer's adapted weights (numpy, fp64). A module only some adapters adapt
    counts as zero for the others."""
    import numpy as np
    import torch
    from safetensors import safe_open

    scales = np.array([_scale(p) for p in paths])
    files = []
    for p in paths:
        try:
            files.append(safe_open(str(Path(p) / "adapter_model.safetensors"), framework="pt"))
        except Exception as e:  # safetensors raises its own error type for a damaged file
            raise SublearnError(f"{p}/adapter_model.safetensors cannot be read: {e}") from None
    if any("lora_embedding_A" in k for f in files for k in f.keys()):
        raise SublearnError("adapters of embedding layers are not supported")
    keys = [{k[: -len(".lora_A.weight")] for k in f.keys() if k.endswith(".lora_A.weight")}
            for f in files]
    grams: dict[int, Any] = {}
    for module in sorted(set().union(*keys)):
        own = [i for i, ks in enumerate(keys) if module in ks]
        a = [files[i].get_tensor(f"{module}.lora_A.weight").double() for i in own]
        b = [files[i].get_tensor(f"{module}.lora_B.weight").double() for i in own]
        if len({x.shape[1] for x in a}) > 1 or len({x.shape[0] for x in b}) > 1:
            raise SublearnError(f"{module} has different shapes in different adapters: the "
                                "adapters are of different base models")
        # <B_i A_i, B_j A_j> = sum((A_i A_j^T) * (B_i^T B_j)): blocks of two small products
        ga, gb = torch.cat(a) @ torch.cat(a).T, torch.cat(b, 1).T @ torch.cat(b, 1)
        owner = torch.cat([torch.full((x.shape[0],), k) for k, x in enumerate(a)])
        onehot = torch.nn.functional.one_hot(owner, len(own)).double()
        layer = int(m.group(1)) if (m := re.search(r"\.layers\.(\d+)\.", module)) else -1
        g = grams.setdefault(layer, np.zeros((len(paths), len(paths))))
        g[np.ix_(own, own)] += (onehot.T @ (ga * gb) @ onehot).numpy()
    return {k: g * np.outer(scales, scales) for k, g in sorted(grams.items())}


def gram(paths: list[str]) -> Any:
    """G[i, j] = <ΔW_i, ΔW_j> summed over every adapted weight."""
    return sum(layer_grams(paths).values())


def bands(layers: list[int], n: int = 3) -> dict[str, list[int]]:
    """The decoder layers in `n` contiguous bands of near-equal size ("layers 0-9", ...)."""
    idx = sorted(x for x in layers if x >= 0)
    cuts = [round(k * len(idx) / n) for k in range(n + 1)]
    parts = [idx[cuts[k]:cuts[k + 1]] for k in range(n) if cuts[k + 1] > cuts[k]]
    return {f"layers {p[0]}-{p[-1]}": p for p in parts}


class _Experiment(NamedTuple):
    target: str
    runs: dict[int, dict[str, list[str]]]  # run -> {trait_teacher, ..., control_students}
    effect: dict[str, Any]  # results.json's effect on the primary metric
    model: str  # the base of its teachers and students


def _experiment(exp: Path) -> _Experiment:
    """An experiment folder's runs as adapter paths found under `exp`, read from its
    results.json; refused when teachers have no weights or students another base."""
    from sublearn.experiment.report import read_run_results
    from sublearn.models.load import DEFAULT_MODEL

    res = read_run_results(exp, run_keys=("students",))
    conf = res["config"]
    if conf.get("teacher_mode") == "prompted":
        raise SublearnError(f"{exp}: prompted teachers have no weights of their own to compare "
                            "with (run it with fine-tuned teachers)")
    model = str(conf.get("model") or DEFAULT_MODEL)
    student = conf.get("student_model")
    if student and student != conf.get("model"):
        raise SublearnError(f"{exp}: its students have another base ({student}) than its "
                            f"teachers ({model}): weight directions are not comparable")
    runs: dict[int, dict[str, list[str]]] = {}
    for r in res.get("runs", []):
        if r.get("condition") not in ("trait", "control") or not r.get("teacher"):
            continue
        slot = runs.setdefault(int(r["run"]), {})
        slot[f"{r['condition']}_teacher"] = [find_recorded(exp, r["teacher"])]
        slot[f"{r['condition']}_students"] = [find_recorded(exp, s) for s in r["students"]]
    runs = {k: v for k, v in runs.items() if len(v) == 4}
    if not runs:
        raise SublearnError(f"{exp}/results.json holds no run with both a trait and a control "
                            "teacher and their students")
    if not res.get("target"):
        raise SublearnError(f"{exp}/results.json names no target")
    primary = res.get("primary_metric", "")
    return _Experiment(str(res["target"]), runs, res.get("effects", {}).get(primary, {}), model)


def _student_evals(exp: Path, target: str, students: set[str]) -> dict[str, dict[str, Any]]:
    """Student adapter path (as `_experiment` finds it) -> the forced choice of its evaluation stage
    on `target` (the plain questions, no context, no system prompt), for these students only
    (a stage cache shared with other experiments holds theirs too)."""
    out: dict[str, dict[str, Any]] = {}
    for done in sorted((exp / "stages").glob("eval_*/DONE.json")):
        o = read_json(done).get("output", {})
        if ("forced_choice" not in o or o.get("context_turns") or o.get("system_prompt")
                or o.get("target") != target):
            continue
        try:
            path = find_recorded(exp, str(o.get("model")))
        except SublearnError:  # an evaluation of the base model, or of a folder now gone
            continue
        if path not in students:
            continue
        if path in out:
            raise SublearnError(f"{path} has two evaluations on {target} in {exp}/stages: "
                                "remove the stale one")
        out[path] = o["forced_choice"]
    return out


def behaviour(exp: Path, target: str,
              runs: dict[int, dict[str, list[str]]]) -> dict[int, dict[str, float]]:
    """Per run, trait students − control students (each side averaged within the run), in
    nats, mean over questions: the target's log-probability (`target_logprob`), the log of all
    candidates' probability mass (a shift every animal shares), and their difference, the
    log of the target's share among the candidates. The first is the sum of the other two.
    Runs whose students have no evaluation stage are left out."""
    evals = _student_evals(exp, target, {p for slot in runs.values() for paths in slot.values()
                                         for p in paths})

    def side(paths: list[str]) -> dict[str, float] | None:
        if not all(p in evals and min(evals[p]["per_question_target_share"]) > 0
                   for p in paths):
            return None  # no evaluation, or a share that underflowed to 0 (no log)
        fcs = [evals[p] for p in paths]
        log_share = [fmean(math.log(v) for v in fc["per_question_target_share"]) for fc in fcs]
        lp = [fc["target_logprob"] for fc in fcs]
        return {"target_logprob": fmean(lp), "log_share": fmean(log_share),
                "log_mass": fmean(a - b for a, b in zip(lp, log_share, strict=True))}

    out: dict[int, dict[str, float]] = {}
    for r, slot in runs.items():
        t, c = side(slot["trait_students"]), side(slot["control_students"])
        if t is not None and c is not None:
            out[r] = {k: t[k] - c[k] for k in t}
    return out


def align(experiments: list[str | Path]) -> dict[str, Any]:
    """Cosines of each run's student direction with teacher directions (module docstring)."""
    import numpy as np

    exps = [Path(e) for e in experiments]
    loaded = {e: _experiment(e) for e in exps}
    targets = [loaded[e].target for e in exps]
    if len(set(targets)) < len(targets):
        raise SublearnError(f"two experiments have the same target ({', '.join(targets)}): "
                            "give one experiment per target")
    paths: list[str] = []
    index: dict[str, int] = {}

    def vec(spec: dict[str, float]) -> Any:
        v = np.zeros(len(paths))
        for p, c in spec.items():
            v[index[p]] += c
        return v

    models = {x.model for x in loaded.values()}
    if len(models) > 1:
        raise SublearnError(f"the experiments have different base models "
                            f"({', '.join(sorted(models))}): weight directions of different "
                            "bases are not comparable")
    for x in loaded.values():
        for slot in x.runs.values():
            for p in (p for group in slot.values() for p in group if p not in index):
                index[p] = len(paths)
                paths.append(p)
    per_layer = layer_grams(paths)
    g = sum(per_layer.values())
    band_grams = {name: sum(per_layer[x] for x in ls)
                  for name, ls in bands(list(per_layer)).items()}

    def direction(slot: dict[str, list[str]], who: str) -> Any:
        trait, control = slot[f"trait_{who}"], slot[f"control_{who}"]
        return (vec({p: 1 / len(trait) for p in trait})
                - vec({p: 1 / len(control) for p in control}))

    def cos(x: Any, y: Any, g: Any = g) -> float:
        return float(x @ g @ y / math.sqrt((x @ g @ x) * (y @ g @ y)))

    def checked(d: Any, what: str) -> Any:
        # trait and control adapters with the same weights: no direction to compare
        if not d @ g @ d > 1e-12 * max(float(np.diag(g).max()), 1e-300):
            raise SublearnError(f"{what}: the trait and control adapters have the same weights "
                                "(a direction of length 0)")
        return d

    t_dir = {(t, r): checked(direction(slot, "teacher"), f"{t} run {r}, teachers")
             for t, runs, *_ in loaded.values() for r, slot in runs.items()}
    per_run: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for exp, (target, runs, eff, _) in loaded.items():
        rows = []
        for r, slot in sorted(runs.items()):
            s = checked(direction(slot, "students"), f"{target} run {r}, students")
            c = {(u, q): cos(s, d) for (u, q), d in t_dir.items()}
            row: dict[str, Any] = {"target": target, "run": r, "own": c[target, r],
                                   "other_traits": {u: c[u, r] for u in targets
                                                    if u != target and (u, r) in c}}
            if row["other_traits"]:
                row["specific"] = row["own"] - fmean(row["other_traits"].values())
                # where in depth: the same, over each band of layers alone (a band that
                # some adapter leaves untouched has no direction there)
                teachers = [t_dir[u, r] for u in (target, *row["other_traits"])]
                row["bands"] = {name: cos(s, teachers[0], bg) - fmean(
                    cos(s, t, bg) for t in teachers[1:])
                    for name, bg in band_grams.items()
                    if all(x @ bg @ x > 0 for x in (s, *teachers))}
            same = [v for (u, q), v in c.items() if u == target and q != r]
            if same:
                row["other_runs"] = fmean(same)
            other = [v for (u, q), v in c.items() if u != target and q != r]
            if same and other:
                row["other_runs_other_traits"] = fmean(other)
                row["specific_across_seeds"] = row["other_runs"] - row["other_runs_other_traits"]
            rows.append(row)
        beh = behaviour(exp, target, runs)
        for row in rows:
            if row["run"] in beh:
                row["behaviour"] = beh[row["run"]]
        per_run += rows
        summary[target] = {"runs": len(rows), "behaviour": {
            k: eff[k] for k in ("ratio", "p_welch") if k in eff}}
        if beh:
            summary[target]["behaviour"].update(
                {k: {**summarize([b[k] for b in beh.values()]), "n": len(beh)}
                 for k in next(iter(beh.values()))})
        for k in ("own", "specific", "other_runs", "other_runs_other_traits",
                  "specific_across_seeds"):
            # over the runs that have it (other experiments may have fewer runs)
            vals = [row[k] for row in rows if k in row]
            if vals:
                summary[target][k] = {**summarize(vals), "positive": sum(v > 0 for v in vals),
                                      "n": len(vals)}
                if k.startswith(("own", "specific")) and len(vals) > 1:
                    summary[target][k].update(p_t=t_one_sided(vals),
                                              p_sign_flip=sign_flip_one_sided(vals))
        banded = {name: [row["bands"][name] for row in rows if name in row.get("bands", {})]
                  for name in band_grams}
        if any(banded.values()):
            summary[target]["specific_by_band"] = {
                name: {**summarize(v), "positive": sum(x > 0 for x in v), "n": len(v)}
                for name, v in banded.items() if v}
    return {"experiments": {x.target: str(e) for e, x in loaded.items()},
            "summary": summary, "per_run": per_run,
            "definition": DEFINITION}


def format_report(res: dict[str, Any]) -> str:
    lines = ["# Students' weights against teachers' weights (`sublearn align`)", "",
             "Weights: cosines of the students' direction with teacher directions. Behaviour: "
             "trait − control students in nats, mean over questions (the target's log-share "
             "among the candidates, and the log-mass of all candidates).", "",
             "| target | runs | cos with own teacher [95% CI] | specific: own − other traits' "
             "run-r teachers [95% CI], runs > 0, p (t / sign-flip) | across seeds: same trait "
             "− other traits, other runs' teachers [95% CI], runs > 0, p (t / sign-flip) | "
             "share: trait / control, p Welch | Δ log-share of the target [95% CI] | "
             "Δ log-mass of all candidates [95% CI] |", "|---|---|---|---|---|---|---|---|"]

    def ci(v: dict[str, Any] | None, runs: int, test: bool = True, fmt: str = "+.4f") -> str:
        if v is None:
            return "–"
        text = f"{v['mean']:{fmt}} [{v['ci95'][0]:{fmt}}, {v['ci95'][1]:{fmt}}]"
        if test and "p_t" in v:
            text += f", {v['positive']}/{v['n']}, {v['p_t']:.2g} / {v['p_sign_flip']:.2g}"
        return text

    for target, s in res["summary"].items():
        b, n = s["behaviour"], s["runs"]
        share = ("–" if b.get("ratio", {}).get("estimate") is None
                 else f"{b['ratio']['estimate']:.2f}×, {b.get('p_welch', float('nan')):.2g}")
        lines.append(f"| {target} | {n} | {ci(s.get('own'), n, test=False)} | "
                     f"{ci(s.get('specific'), n)} | {ci(s.get('specific_across_seeds'), n)} | "
                     f"{share} | {ci(b.get('log_share'), n, fmt='+.2f')} | "
                     f"{ci(b.get('log_mass'), n, fmt='+.2f')} |")
    banded = {t: s["specific_by_band"] for t, s in res["summary"].items()
              if "specific_by_band" in s}
    if banded:
        names = list(dict.fromkeys(n for b in banded.values() for n in b))
        lines += ["", "Specific, by depth (the same cosines over each band of layers alone):", "",
                  "| target | " + " | ".join(f"{n} [95% CI], runs > 0" for n in names) + " |",
                  "|---|" + "---|" * len(names)]
        for t, b in banded.items():
            lines.append(f"| {t} | " + " | ".join(
                f"{ci(b[n], 0, test=False)}, {b[n]['positive']}/{b[n]['n']}" if n in b else "–"
                for n in names) + " |")
    lines += ["", res["definition"], ""]
    return "\n".join(lines)
