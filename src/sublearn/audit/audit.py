"""`sublearn audit DATA`: does this dataset carry a hidden trait?

Two detectors, each scoring every sample against the base model B (`sublearn.audit.scores`):
  teacher  given a suspected teacher T: LLS = log p_T(y|x) - log p_B(y|x), and the per-token
           divergence of T from B (KL, argmax);
  probe    teacher-free: B fine-tuned briefly on the data (LoRA, hard labels) scores the data
           the same way, and its forced-choice shares over the candidate traits are compared
           with B's (which trait did the short fine-tune move?).
With a reference dataset (the control teacher's data, or data the user trusts) each detector
gives a dataset-level verdict: a one-sided permutation test over samples (this data scores
higher than the reference), the difference in means with a 95% interval, Cohen's d and the
samples' ROC-AUC; the probe's trait shifts become differences to the reference's probe.

Outputs in the output folder: scores.jsonl (one record per sample and detector),
summary.json, histogram.png, report.md.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sublearn.errors import SublearnError
from sublearn.files import atomic_write_json, check_out_dir, locked_out_dir, write_jsonl

SAMPLE_PERMUTATIONS = 10_000  # Monte Carlo resamples for sample-level tests


@dataclass(frozen=True)
class AuditConfig:
    teacher: str | None = field(default=None, metadata={
        "help": "suspected teacher (model or adapter folder) for the LLS/divergence detector"})
    teacher_system_prompt: str | None = field(default=None, metadata={
        "help": "a system prompt only the suspected teacher sees (a prompted trait)"})
    base: str | None = field(default=None, metadata={
        "help": "the base model B (default: embedded smollm2-135m-instruct)"})
    reference: str | None = field(default=None, metadata={
        "help": "a reference filtered.jsonl (trusted or control data) for the dataset verdict"})
    probe: bool = field(default=False, metadata={
        "help": "teacher-free detector: fine-tune B briefly on the data (and the reference) "
                "and score the shift"})
    probe_epochs: float = field(default=1.0, metadata={"help": "probe: epochs over the data"})
    target: str = field(default="owl", metadata={
        "help": "the trait named in the summary (every candidate's shift is reported)"})
    max_samples: int | None = field(default=None, metadata={
        "help": "score only the first N rows of each dataset"})
    seed: int = field(default=0, metadata={"help": "probe seed and permutation seed"})
    dtype: str = field(default="float32", metadata={
        "help": "scoring precision: float32 (equal to a naive per-sample loop) or bfloat16 "
                "(autocast bodies, 2-3x faster on CPUs with bf16 matmuls)",
        "choices": ["float32", "bfloat16"]})

    def validate(self) -> AuditConfig:
        if self.teacher is None and self.teacher_system_prompt is None and not self.probe:
            raise SublearnError("give a suspected --teacher (or --teacher-system-prompt), "
                                "--probe, or both")
        if not 0 < self.probe_epochs < math.inf or (self.max_samples is not None
                                                    and self.max_samples < 2):
            raise SublearnError("--probe-epochs must be positive and finite and --max-samples "
                                "at least 2")
        return self


def audit_dataset(cfg: AuditConfig, data: str | Path, out: str | Path,
                  progress: bool = True) -> dict[str, Any]:
    from sublearn.pipeline.train import load_rows

    cfg = cfg.validate()
    check_out_dir(out)
    sets = {"data": load_rows(data)[: cfg.max_samples]}
    if cfg.reference:
        sets["reference"] = load_rows(cfg.reference)[: cfg.max_samples]
    from sublearn.models.load import check_model

    for m in (cfg.teacher, cfg.base):  # before the folder is made
        check_model(m)
    with locked_out_dir(out) as folder:
        return _audit(cfg, sets, str(data), folder, progress)


def _audit(cfg: AuditConfig, sets: dict[str, list[dict]], data: str, out: Path,
           progress: bool) -> dict[str, Any]:
    from sublearn.audit.scores import score_rows
    from sublearn.models import load_model

    base = load_model(cfg.base)
    records: list[dict] = []
    detectors: dict[str, dict[str, Any]] = {}
    if cfg.teacher or cfg.teacher_system_prompt:
        teacher = load_model(cfg.teacher) if cfg.teacher else base
        scores = {k: score_rows(teacher, base, rows, scorer_system=cfg.teacher_system_prompt,
                                progress=progress, dtype=cfg.dtype) for k, rows in sets.items()}
        detectors["teacher"] = _detector(scores, cfg.seed)
        records += [{"detector": "teacher", "dataset": k, **s.record()}
                    for k, ss in scores.items() for s in ss]
    if cfg.probe:
        probes = {k: _probe(cfg, rows, out / f"probe_{k}", progress) for k, rows in sets.items()}
        scores = {k: score_rows(probes[k]["model"], base, rows, progress=progress,
                                dtype=cfg.dtype) for k, rows in sets.items()}
        detectors["probe"] = _detector(scores, cfg.seed)
        detectors["probe"]["trait_shift"] = _trait_shift(cfg, base, probes)
        records += [{"detector": "probe", "dataset": k, **s.record()}
                    for k, ss in scores.items() for s in ss]
    write_jsonl(out / "scores.jsonl", records)
    summary = {"data": data, "rows": {k: len(v) for k, v in sets.items()},
               "detectors": detectors, "config": asdict(cfg)}
    atomic_write_json(out / "summary.json", summary)
    from sublearn.audit.report import write_audit_report

    write_audit_report(out, summary, records)
    return summary


def _detector(scores: dict[str, list[Any]], seed: int) -> dict[str, Any]:
    """Per-dataset means and, with a reference, the dataset-level verdict on lls_mean."""
    out: dict[str, Any] = {
        k: {"lls_mean": statistics.fmean(s.lls_mean for s in ss),
            "lls_sum": statistics.fmean(s.lls_sum for s in ss),
            "kl_mean": statistics.fmean(s.kl_mean for s in ss),
            "argmax_disagree": statistics.fmean(s.argmax_disagree for s in ss),
            "top_tokens": _top_tokens(ss)}
        for k, ss in scores.items()}
    if "reference" in scores:
        a = [s.lls_mean for s in scores["data"]]
        b = [s.lls_mean for s in scores["reference"]]
        out["verdict"] = verdict(a, b, seed)
    return out


def verdict(a: list[float], b: list[float], seed: int = 0) -> dict[str, Any]:
    """Does `a` (per-sample scores of the data) exceed `b` (the reference)? Samples are the
    units here: this tests whether the two datasets differ under the scorer."""
    from sublearn.experiment.stats import (
        difference_ci,
        permutation_exact,
        permutation_one_sided,
    )

    if len(a) < 2 or len(b) < 2:
        raise SublearnError(f"a verdict needs at least 2 samples in the data and in the "
                            f"reference, got {len(a)} and {len(b)}")
    sd = math.sqrt((statistics.variance(a) + statistics.variance(b)) / 2)
    diff = statistics.fmean(a) - statistics.fmean(b)
    exact = permutation_exact(len(a), len(b), SAMPLE_PERMUTATIONS)
    how = "exact" if exact else f"{SAMPLE_PERMUTATIONS} Monte Carlo resamples"
    return {"metric": "lls_mean", "difference": difference_ci(a, b),
            "cohens_d": diff / sd if sd > 0 else None, "auc": roc_auc(a, b),
            "p_permutation": permutation_one_sided(a, b, SAMPLE_PERMUTATIONS, seed),
            "test": f"one-sided permutation test over samples, {how} (data > reference)"}


def roc_auc(pos: list[float], neg: list[float]) -> float:
    """P(a random positive scores above a random negative), ties counted half: the ROC-AUC
    of the score as a detector (Mann-Whitney U / (n_pos * n_neg))."""
    from scipy.stats import mannwhitneyu

    if not pos or not neg:
        raise SublearnError("ROC-AUC needs positives and negatives")
    return float(mannwhitneyu(pos, neg).statistic) / (len(pos) * len(neg))


def _top_tokens(scores: list[Any], k: int = 10) -> list[dict[str, Any]]:
    """The answer tokens with the largest mean KL (teacher vs base), over every position."""
    by: dict[str, list[float]] = {}
    for s in scores:
        for t, v in zip(s.tokens, s.token_kl, strict=True):
            by.setdefault(t, []).append(v)
    rows = [{"token": t, "kl_mean": statistics.fmean(v), "count": len(v)} for t, v in by.items()]
    return sorted(rows, key=lambda r: -r["kl_mean"])[:k]


def _probe(cfg: AuditConfig, rows: list[dict], out: Path, progress: bool) -> dict[str, Any]:
    from sublearn.files import write_jsonl as write
    from sublearn.models import load_model
    from sublearn.pipeline.train import train
    from sublearn.pipeline.train_config import TrainConfig

    out.mkdir(parents=True, exist_ok=True)
    write(out / "data.jsonl", rows)
    tcfg = TrainConfig(recipe="hard", model=cfg.base, epochs=cfg.probe_epochs, seed=cfg.seed)
    res = train(tcfg, out / "data.jsonl", out / "train", progress=progress)
    return {"path": res["student"], "model": load_model(res["student"])}


def _trait_shift(cfg: AuditConfig, base: Any, probes: dict[str, dict]) -> dict[str, Any]:
    """log(share after the probe's fine-tune / the base's share) for every forced-choice
    candidate; with a reference, minus the reference probe's: the traits the data moved."""
    from sublearn.pipeline.evaluate import EvalConfig, evaluate_model

    ecfg = EvalConfig(target=cfg.target)
    shares = {"base": evaluate_model(base, ecfg, variants=("plain",))["forced_choice"]["shares"]}
    for k, p in probes.items():
        shares[k] = evaluate_model(p["model"], ecfg, variants=("plain",))["forced_choice"][
            "shares"]
    shift = {a: math.log(shares["data"][a] / shares["base"][a]) for a in shares["base"]}
    if "reference" in shares:
        shift = {a: v - math.log(shares["reference"][a] / shares["base"][a])
                 for a, v in shift.items()}
    ranked = dict(sorted(shift.items(), key=lambda kv: -kv[1]))
    return {"log_share_shift": ranked, "shares": shares,
            "target_rank": 1 + list(ranked).index(cfg.target) if cfg.target in ranked else None,
            "relative_to": "reference probe" if "reference" in shares else "base"}
