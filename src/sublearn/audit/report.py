"""The audit's report.md and histogram.png (per-sample LLS per token, data vs reference)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sublearn.files import atomic_savefig, atomic_write_text

WHAT = {"teacher": "suspected teacher vs base", "probe": "short fine-tune on the data vs base"}


def _f(x: Any) -> str:
    return "n/a" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def format_audit(summary: dict[str, Any], plot: str | None) -> str:
    lines = [f"# Audit of {summary['data']}", "",
             "Per-sample LLS = log p_scorer(answer | prompt) - log p_base(answer | prompt), "
             "per answer token; KL = KL(scorer || base) per answer position.", ""]
    for name, d in summary["detectors"].items():
        lines += [f"## Detector: {name} ({WHAT.get(name, name)})", "",
                  "| dataset | rows | LLS per token | LLS per sample | KL per token | "
                  "argmax differs |", "|---|---|---|---|---|---|"]
        for k in ("data", "reference"):
            if k in d:
                lines.append(f"| {k} | {summary['rows'][k]} | {_f(d[k]['lls_mean'])} | "
                             f"{_f(d[k]['lls_sum'])} | {_f(d[k]['kl_mean'])} | "
                             f"{_f(d[k]['argmax_disagree'])} |")
        v = d.get("verdict")
        if v:
            lo, hi = v["difference"]["ci95"]
            lines += ["", f"Verdict (data > reference, {v['test']}): p = "
                      f"{_f(v['p_permutation'])}; difference in LLS per token "
                      f"{_f(v['difference']['estimate'])} [{_f(lo)}, {_f(hi)}]; Cohen's d "
                      f"{_f(v['cohens_d'])}; sample ROC-AUC {_f(v['auc'])}."]
        top = d["data"]["top_tokens"][:5]
        lines += ["", "Most divergent answer tokens (mean KL): "
                  + ", ".join(f"`{t['token']}` {_f(t['kl_mean'])} (n={t['count']})"
                              for t in top)]
        shift = d.get("trait_shift")
        if shift:
            top5 = list(shift["log_share_shift"].items())[:5]
            lines += ["", f"Traits the short fine-tune moved most (log share shift relative to "
                      f"the {shift['relative_to']}): "
                      + ", ".join(f"{a} {v:+.3f}" for a, v in top5)
                      + f"; `{summary['config']['target']}` ranks {shift['target_rank']}."]
        lines.append("")
    if plot:
        lines += [f"![histogram]({plot})", ""]
    return "\n".join(lines)


def plot_histogram(records: list[dict[str, Any]], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    detectors = list(dict.fromkeys(r["detector"] for r in records))
    if not detectors:
        return False
    fig, axes = plt.subplots(1, len(detectors), figsize=(4.5 * len(detectors), 3.4),
                             squeeze=False)
    for ax, det in zip(axes[0], detectors, strict=True):
        for k, color in (("data", "#d62728"), ("reference", "#1f77b4")):
            vals = [r["lls_mean"] for r in records if r["detector"] == det and r["dataset"] == k]
            if vals:
                ax.hist(vals, bins=30, alpha=0.55, color=color, label=k)
        ax.set_xlabel("LLS per answer token (nats)", fontsize=8)
        ax.set_title(WHAT.get(det, det), fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    return True


def write_audit_report(out: Path, summary: dict[str, Any], records: list[dict]) -> None:
    has = plot_histogram(records, out / "histogram.png")
    atomic_write_text(out / "report.md", format_audit(summary, "histogram.png" if has else None))
