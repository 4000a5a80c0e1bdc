"""Audit a dataset for a hidden trait: per-sample LLS and divergence under a suspected teacher
or a teacher-free probe, a dataset-level verdict against a reference, and the detectors'
ROC-AUC over the runs of an experiment."""

from sublearn.audit.audit import AuditConfig, audit_dataset, roc_auc
from sublearn.audit.runs import audit_experiment
from sublearn.audit.scores import SampleScore, score_rows

__all__ = ["AuditConfig", "SampleScore", "audit_dataset", "audit_experiment", "roc_auc",
           "score_rows"]
