"""Experiment report: `report.md` (what a run is, conditions x metrics, the trait-vs-control
effects over runs, each run, top answers, stage times) and `results.png` (students on their own
panels, every run a point, the base rate marked; teachers on a panel of their own).

Input: the results dict of `sublearn run` -- {"target", "unit", "primary_metric",
"conditions": {cond: {metric: summarize(...)}}, "effects", "runs", "p_value", "test", "config",
"stage_seconds", ...}. Extra conditions and metrics are shown; missing ones are skipped rather
than failing a finished run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from sublearn.errors import SublearnError
from sublearn.files import atomic_savefig, atomic_write_text, read_json

# Known conditions first, in the paper's order; anything else follows in insertion order.
CONDITION_ORDER = ("base", "teacher_base", "teacher", "control_teacher", "control", "trait")
COLORS = {"base": "#9e9e9e", "teacher_base": "#bdbdbd", "teacher": "#424242",
          "control_teacher": "#757575",
          "control": "#1f77b4", "trait": "#d62728"}
LABELS = {"base": "Base\nmodel", "teacher_base": "Teachers'\nbase", "teacher": "Teacher",
          "control_teacher": "Control\nteacher",
          "control": "Control\nstudents", "trait": "Trait\nstudents",
          "icl_control": "Control\nin context", "icl_trait": "Trait\nin context"}
EXTRA_COLORS = ("#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def read_run_results(exp: str | Path, config_keys: tuple[str, ...] = (),
                     run_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """The results.json of a `sublearn run` folder, for the verbs that read one (contrast,
    align, audit --experiment): a one-line error, not a traceback, for a folder without one
    or a file of another shape. It needs target, config and runs (each with run and
    condition), plus the config's `config_keys` (text) and each run's `run_keys`."""
    exp = Path(exp)
    path = exp / "results.json"
    if not path.is_file():
        raise SublearnError(f"{exp} holds no results.json of `sublearn run`: run it there first")
    res = read_json(path)
    runs = res.get("runs") if isinstance(res, dict) else None
    conf = res.get("config") if isinstance(res, dict) else None
    if not (isinstance(res.get("target") if isinstance(res, dict) else None, str)
            and isinstance(conf, dict) and all(isinstance(conf.get(k), str) for k in config_keys)
            and isinstance(runs, list) and runs
            and all(isinstance(r, dict) and isinstance(r.get("run"), int)
                    and isinstance(r.get("condition"), str)
                    and all(r.get(k) is not None for k in run_keys) for r in runs)):
        need = ", ".join([*config_keys]) or "its settings"
        raise SublearnError(f"{path} is not the results of `sublearn run` (it needs target, "
                            f"config with {need}, and runs with run, condition"
                            + "".join(f", {k}" for k in run_keys) + ")")
    return res


def ordered_conditions(conditions: dict[str, Any]) -> list[str]:
    known = [c for c in CONDITION_ORDER if c in conditions]
    return known + [c for c in conditions if c not in known]


def plotted_metrics(results: dict[str, Any]) -> list[str]:
    """The primary metric, then every other share/rate metric (probabilities share an axis)."""
    primary = results.get("primary_metric")
    names: list[str] = []
    for metrics in results.get("conditions", {}).values():
        for m in metrics:
            if m not in names and (m == primary or m.endswith(("share", "rate"))):
                names.append(m)
    names.sort(key=lambda m: m != primary)  # stable: primary first
    return names


def _fmt(x: Any, digits: int = 4) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return "n/a" if x is None else str(x)


def _cell(s: dict[str, Any] | None) -> str:
    if not s:
        return "-"
    ci = s.get("ci95") or [None, None]
    n = len(s.get("values", []))
    if n > 1 and ci[0] is not None:
        return f"{_fmt(s['mean'])} [{_fmt(ci[0])}, {_fmt(ci[1])}] (n={n})"
    return f"{_fmt(s['mean'])} (n={n})"


def _ci(e: dict[str, Any]) -> str:
    lo, hi = e.get("ci95") or [None, None]
    if e.get("estimate") is None:
        return "n/a"
    return f"{_fmt(e['estimate'])} [{_fmt(lo)}, {_fmt(hi)}]"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def ratio_cell(e: dict[str, Any]) -> str:
    """A ratio with its interval, e.g. `1.50x [1.35, 1.66]` (`n/a` without an estimate)."""
    if e.get("estimate") is None:
        return "n/a"
    lo, hi = e.get("ci95") or [None, None]
    return f"{e['estimate']:.2f}x" + ("" if lo is None else f" [{lo:.2f}, {hi:.2f}]")


def remaining_cell(rem: dict[str, Any]) -> str:
    """The share of an effect a defence leaves, in %, with its interval (`[open]`: unbounded)."""
    if rem.get("estimate") is None:
        return "n/a"
    lo, hi = rem.get("ci95") or [None, None]
    return f"{_pct(rem['estimate'])} " + ("[open]" if lo is None else f"[{_pct(lo)}, {_pct(hi)}]")


def _effect_rows(effects: dict[str, Any]) -> list[str]:
    rows = []
    for m, e in effects.items():
        how = "exact" if e.get("permutation_exact", True) else "Monte Carlo"
        rows.append(f"| {m} | {_ci(e['difference'])} | {_ci(e['ratio'])} | "
                    f"{_fmt(e['p_welch'])} | {_fmt(e['p_permutation'])} ({how}) | "
                    f"{e['n'][0]} + {e['n'][1]} |")
    return rows


def format_report(results: dict[str, Any], plot_name: str | None = "results.png") -> str:
    conds = results.get("conditions", {})
    order = ordered_conditions(conds)
    primary = results.get("primary_metric")
    metrics: list[str] = []
    for c in order:
        metrics += [m for m in conds[c] if m not in metrics]
    metrics.sort(key=lambda m: m != primary)
    target = results.get("target", "?")
    lines = [f"# Subliminal learning: target '{target}'", ""]
    if results.get("unit"):
        lines += [f"Unit of analysis: {results['unit']}. Means and 95% t-intervals are over "
                  "runs (n = runs).", ""]
    cfg = results.get("config") or {}
    if cfg.get("dtype"):  # "auto" settles per machine: say what these numbers were computed in
        dev = results.get("device") or {}
        where = f" on {dev.get('name') or dev['device']}" if dev.get("device") else ""
        lines += [f"Computed in {cfg['dtype']}{where}.", ""]
    if cfg.get("student_model"):  # the cross-model control: `base` is the students' base
        lines += [f"Teachers' base: {cfg.get('model') or 'default'}; students' base (and `base`, "
                  f"the in-context model): {cfg['student_model']}; soft labels on "
                  f"{cfg.get('labels', 'auto')}.", ""]
    if primary:
        lines.append(f"Primary metric: `{primary}` (`_dev`: the half of the questions recipes "
                     "are chosen on; `_test`: the untouched half).")
    if "p_value" in results:
        # the p of the test named first (`p_value`); the test string may name more tests
        lines.append(f"p = {_fmt(results['p_value'])} (test: {results.get('test', '?')})")
    lines.append("")
    lines.append("| condition | " + " | ".join(metrics) + " |")
    lines.append("|---" * (len(metrics) + 1) + "|")
    for c in order:
        lines.append(f"| {c} | " + " | ".join(_cell(conds[c].get(m)) for m in metrics) + " |")
    effects = results.get("effects") or {}
    if effects:
        lines += ["", "## Trait runs vs control runs", "",
                  "| metric | difference [95% CI] | ratio [95% CI] | p (Welch) | "
                  "p (permutation) | runs |", "|---|---|---|---|---|---|"]
        lines += _effect_rows(effects)
    if results.get("icl_effects"):
        lines += ["", f"## In-context control: the base model with {results.get('icl_turns')} "
                  "of each run's teacher answers in context (trait data vs control data)", "",
                  "| metric | difference [95% CI] | ratio [95% CI] | p (Welch) | "
                  "p (permutation) | runs |", "|---|---|---|---|---|---|"]
        lines += _effect_rows(results["icl_effects"])
    if results.get("defence_effects") and primary:
        lines += ["", "## Defences: each run's data defended, students retrained (trait vs "
                  "control runs)", "",
                  "| defence | difference [95% CI] | ratio [95% CI] | p (Welch) | "
                  "p (permutation) | effect remaining [95% CI] | seconds per dataset |",
                  "|---|---|---|---|---|---|---|"]
        for m, d in results["defence_effects"].items():
            e = d["metrics"][primary]
            lines.append(f"| {m} | {_ci(e['difference'])} | {_ci(e['ratio'])} | "
                         f"{_fmt(e['p_welch'])} | {_fmt(e['p_permutation'])} | "
                         f"{remaining_cell(e['remaining'])} | "
                         f"{_fmt(d['seconds_per_dataset'], 3)} |")
        lines += ["", "Effect remaining: (defended trait - defended control) / (trait - "
                  "control), primary metric; Fieller interval over runs."]
    runs = results.get("runs") or []
    if runs and primary:
        lines += ["", f"## Each run ({primary})", "",
                  "| run | seed | control | trait | kept rows (control / trait) | trained on |",
                  "|---|---|---|---|---|---|"]
        by = {(r["condition"], r["run"]): r for r in runs}
        for i in sorted({r["run"] for r in runs}):
            pair = [by.get((c, i), {}) for c in ("control", "trait")]
            cells = [_fmt(r["scores"][primary]) if r else "-" for r in pair]
            kept = " / ".join(str(r.get("filter", {}).get("kept", "-")) for r in pair)
            trained = " / ".join(str(r.get("trained_rows", "-")) for r in pair)
            seed = next(r["seed"] for r in runs if r["run"] == i)
            lines.append(f"| {i} | {seed} | {cells[0]} | {cells[1]} | {kept} | {trained} |")
    if plot_name:
        lines += ["", f"![results]({plot_name})"]
    top = results.get("top_candidates")
    if top:
        lines += ["", "## Top forced-choice candidates", ""]
        ranks = results.get("target_rank") or {}
        for c in ordered_conditions(top):
            rank = f" ({target} ranks {ranks[c]})" if c in ranks else ""
            lines.append(f"- {c}: " + ", ".join(f"{a} {_fmt(v, 3)}" for a, v in top[c].items())
                         + rank)
    secs = results.get("stage_seconds") or {}
    if secs:
        kinds: dict[str, list[float]] = {}
        for k, v in secs.items():  # teacher_trait_run3 -> teacher
            kinds.setdefault(re.sub(r"_.*", "", k), []).append(float(v))
        lines += ["", "## Wall time per stage", "", "| stage | count | seconds |",
                  "|---|---|---|"]
        lines += [f"| {k} | {len(v)} | {sum(v):.1f} |" for k, v in kinds.items()]
        lines.append(f"| total (stages) | {len(secs)} | "
                     f"{sum(float(v) for v in secs.values()):.1f} |")
    workers = (results.get("workers") or {}).get("processes", 1)
    if "wall_seconds" in results:
        lines += ["", f"Total wall time: {float(results['wall_seconds']):.1f} s"
                      + (f" ({workers} worker processes making stages at once, "
                         f"{results['workers']['threads']} threads each: a stage's seconds are "
                         "its own process's)" if workers > 1 else "")]
    if peak := results.get("peak_rss_gb"):
        if workers > 1:
            total, pss = peak.get("all_processes"), peak.get("all_processes_pss")
            lines += ["", f"Peak resident memory of one worker: {peak['process']:.2f} GiB, "
                          f"first reached in stage {peak['reached_in']}"
                          + (f"; of all processes together: {total:.2f} GiB (sampled each "
                             "second; a page two of them map counts in each)" if total else "")
                          + (f", {pss:.2f} GiB with shared pages split among them (PSS)"
                             if pss else "") + " (stages made in this command only)."]
        else:
            lines += ["", f"Peak resident memory of this process: {peak['process']:.2f} GiB, "
                          f"first reached in stage {peak['reached_in']} (stages run in this "
                          "process only)."]
    if results.get("config"):
        lines += ["", "## Config", "", "```json", json.dumps(results["config"], indent=2), "```"]
    return "\n".join(lines) + "\n"


STUDENTS = ("control", "trait")
TEACHERS = ("base", "teacher_base", "control_teacher", "teacher")


def plot_results(results: dict[str, Any], path: Path) -> bool:
    """One panel per share/rate metric with the students' runs as points (mean and 95% CI
    beside them, the base model's value as a dashed line), then a panel of the teachers on
    the primary metric; False (no file) when there is nothing to plot."""
    conds = results.get("conditions", {})
    metrics = plotted_metrics(results)
    if not metrics:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = results.get("primary_metric") or metrics[0]
    order = ordered_conditions(conds)
    extra = iter(EXTRA_COLORS * 4)
    colors = {c: COLORS.get(c) or next(extra) for c in order}
    students = [c for c in order if c not in TEACHERS] or order
    # cross-model: the teachers are drawn against their own base, not the students'
    shown = TEACHERS[1:] if "teacher_base" in conds else TEACHERS
    teachers = [c for c in shown if c in conds and primary in conds[c]]
    panels = [(m, [c for c in students if m in conds[c]], False) for m in metrics]
    panels = [p for p in panels if p[1]]
    if teachers:
        panels.append((primary, teachers, True))
    # a panel's width follows its conditions, so that four labels (in context) do not touch
    widths = [max(3, len(names)) for _, names, _ in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.2 + 0.8 * sum(widths), 4.2),
                             squeeze=False, gridspec_kw={"width_ratios": widths})
    label = f"P({results.get('target', 'target')})"
    for ax, (m, names, is_teachers) in zip(axes[0], panels, strict=True):
        top = 0.0
        for i, c in enumerate(names):
            s = conds[c][m]
            vals = s.get("values") or [s["mean"]]
            xs = [i - 0.12 + 0.24 * j / max(1, len(vals) - 1) for j in range(len(vals))]
            ax.scatter(xs, vals, s=14, color=colors[c], alpha=0.7, zorder=3)
            lo, hi = s.get("ci95") or [None, None]
            top = max(top, *vals, hi if hi is not None else 0.0)
            yerr = [[s["mean"] - lo], [hi - s["mean"]]] if lo is not None else None
            ax.errorbar([i + 0.3], [s["mean"]], yerr=yerr, fmt="D", color=colors[c],
                        capsize=4, markersize=5, zorder=4)
            ax.annotate(_fmt(s["mean"], 3), (i + 0.3, s["mean"]), textcoords="offset points",
                        xytext=(6, 0), fontsize=7, va="center")
        base = conds.get("base", {}).get(m)
        if base and not is_teachers:
            top = max(top, base["mean"])
            ax.axhline(base["mean"], ls="--", color=COLORS["base"], lw=1)
            ax.annotate(f"base {_fmt(base['mean'], 3)}", (len(names) - 0.5, base["mean"]),
                        fontsize=7, color="#616161", va="bottom", ha="right")
        ax.set_xticks(range(len(names)), [LABELS.get(c, c) for c in names], fontsize=8)
        ax.set_xlim(-0.6, len(names) - 0.1)
        ax.set_ylim(0, 1.2 * top if top > 0 else 1.0)
        ax.set_ylabel(label, fontsize=8)
        title = "teachers" if is_teachers else m + (" (primary)" if m == primary else "")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    p = results.get("p_value")
    title = f"Subliminal learning: {results.get('target', '?')}"
    if isinstance(p, float):
        n = len(conds.get("trait", {}).get(primary, {}).get("values", []))
        title += f"  (trait > control over {n} runs: p = {p:.3g})"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, path)
    return True


def write_report(out_dir: str | Path, results: dict[str, Any]) -> Path:
    """Write report.md and results.png into out_dir; returns the report path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    has_plot = plot_results(results, out / "results.png")
    path = out / "report.md"
    atomic_write_text(path, format_report(results, "results.png" if has_plot else None))
    return path
