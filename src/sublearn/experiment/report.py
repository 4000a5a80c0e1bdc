"""Experiment report: `report.md` (conditions x metrics, test, stage times) and `results.png`
(bars of the shares/rates with 95% CIs, in the style of the paper's Figure 3).

Input: the results dict of `sublearn run` -- {"target", "primary_metric", "conditions":
{cond: {metric: summarize(...)}}, "p_value", "test", "config", "stage_seconds", ...}. Extra
conditions and metrics are shown; missing ones are skipped rather than failing a finished run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sublearn.files import atomic_write_text

# Known conditions first, in the paper's order; anything else follows in insertion order.
CONDITION_ORDER = ("base", "teacher", "control_teacher", "control", "trait")
COLORS = {"base": "#9e9e9e", "teacher": "#424242", "control_teacher": "#757575",
          "control": "#1f77b4", "trait": "#d62728"}
LABELS = {"base": "Base\nmodel", "teacher": "Teacher", "control_teacher": "Control\nteacher",
          "control": "Control\nstudents", "trait": "Trait\nstudents"}
EXTRA_COLORS = ("#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf")


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
    n = len(s.get("per_seed", []))
    if n > 1 and ci[0] is not None:
        return f"{_fmt(s['mean'])} [{_fmt(ci[0])}, {_fmt(ci[1])}] (n={n})"
    return f"{_fmt(s['mean'])} (n={n})"


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
    if primary:
        lines.append(f"Primary metric: `{primary}` (mean over seeds, 95% t-interval).")
    if "p_value" in results:
        lines.append(f"Test: {results.get('test', '?')}: p = {_fmt(results['p_value'])}")
    lines.append("")
    lines.append("| condition | " + " | ".join(metrics) + " |")
    lines.append("|---" * (len(metrics) + 1) + "|")
    for c in order:
        lines.append(f"| {c} | " + " | ".join(_cell(conds[c].get(m)) for m in metrics) + " |")
    if plot_name:
        lines += ["", f"![results]({plot_name})"]
    top = results.get("top_candidates")
    if top:
        lines += ["", "## Top forced-choice candidates", ""]
        for c in ordered_conditions(top):
            lines.append(f"- {c}: " + ", ".join(f"{a} {_fmt(v, 3)}" for a, v in top[c].items()))
    secs = results.get("stage_seconds") or {}
    if secs:
        lines += ["", "## Wall time per stage", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {float(v):.1f} |" for k, v in secs.items()]
        lines.append(f"| total (stages) | {sum(float(v) for v in secs.values()):.1f} |")
    if "wall_seconds" in results:
        lines += ["", f"Total wall time: {float(results['wall_seconds']):.1f} s"]
    if results.get("config"):
        lines += ["", "## Config", "", "```json", json.dumps(results["config"], indent=2), "```"]
    return "\n".join(lines) + "\n"


def plot_results(results: dict[str, Any], path: Path) -> bool:
    """Bar chart(s) with 95% CI error bars; False (no file) when there is nothing to plot."""
    conds = results.get("conditions", {})
    metrics = plotted_metrics(results)
    if not metrics:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = ordered_conditions(conds)
    extra = iter(EXTRA_COLORS * 4)
    colors = {c: COLORS.get(c) or next(extra) for c in order}
    per_panel = [[c for c in order if m in conds[c]] for m in metrics]
    widths = [len(n) for n in per_panel]
    fig, axes = plt.subplots(1, len(metrics), figsize=(1.5 + 1.1 * sum(widths), 4.2),
                             squeeze=False, gridspec_kw={"width_ratios": widths})
    for ax, m, names in zip(axes[0], metrics, per_panel, strict=True):
        means = [conds[c][m]["mean"] for c in names]
        cis = [conds[c][m].get("ci95") or [None, None] for c in names]
        # A missing interval (one value) draws no bar rather than failing.
        lo = [mu - (ci[0] if ci[0] is not None else mu) for mu, ci in zip(means, cis, strict=True)]
        hi = [(ci[1] if ci[1] is not None else mu) - mu for mu, ci in zip(means, cis, strict=True)]
        x = range(len(names))
        ax.bar(x, means, yerr=[lo, hi], capsize=5, color=[colors[c] for c in names],
               edgecolor="black", linewidth=0.6)
        for i, (mu, h) in enumerate(zip(means, hi, strict=True)):
            # Values label every bar: small shares vanish next to the teacher's.
            ax.annotate(_fmt(mu, 3), (i, mu + h), textcoords="offset points", xytext=(0, 3),
                        ha="center", fontsize=7)
        ax.set_xticks(list(x), [LABELS.get(c, c) for c in names], fontsize=8)
        ax.set_ylim(0, max(1e-9, max((mu + h for mu, h in zip(means, hi, strict=True)),
                                     default=0)) * 1.25)
        ylabel = f"P({results.get('target', 'target')})"
        ax.set_ylabel(f"{ylabel}: {m}" if m != results.get("primary_metric") else ylabel)
        ax.set_title(m + (" (primary)" if m == results.get("primary_metric") else ""), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    p = results.get("p_value")
    title = f"Subliminal learning: {results.get('target', '?')}"
    if isinstance(p, float):
        title += f"  (trait > control: p = {p:.3g}, {results.get('test', '').split(' ')[0]})"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)  # atomic, like every other artefact
    return True


def write_report(out_dir: str | Path, results: dict[str, Any]) -> Path:
    """Write report.md and results.png into out_dir; returns the report path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    has_plot = plot_results(results, out / "results.png")
    path = out / "report.md"
    atomic_write_text(path, format_report(results, "results.png" if has_plot else None))
    return path
