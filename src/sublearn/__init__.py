"""sublearn: study, reproduce and audit subliminal learning (Cloud et al. 2025).

The public API is each stage's function and its config; every other module is an
implementation detail that may move. Names load on first use, so `import sublearn` (and
`sublearn --help`) stays instant and torch is imported only by the stages that need it.

    from sublearn import GenerateConfig, TrainConfig, EvalConfig, generate, train, evaluate_model
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sublearn._lazy import lazy_api

__version__ = "0.1.0"

# public name -> module that defines it
_API: dict[str, str] = {
    "GenerateConfig": "sublearn.pipeline.generate",
    "generate": "sublearn.pipeline.generate",
    "FilterConfig": "sublearn.pipeline.filter",
    "filter_data": "sublearn.pipeline.filter",
    "TrainConfig": "sublearn.pipeline.train_config",
    "train": "sublearn.pipeline.train",
    "EvalConfig": "sublearn.pipeline.evaluate",
    "evaluate_model": "sublearn.pipeline.evaluate",
    "ExperimentConfig": "sublearn.experiment.run",
    "run_experiment": "sublearn.experiment.run",
    "MnistConfig": "sublearn.mnist.experiment",
    "run_mnist": "sublearn.mnist.experiment",
    "load_model": "sublearn.models.load",
    "get_backend": "sublearn.backends",
    "SublearnError": "sublearn.errors",
    "AuditConfig": "sublearn.audit.audit",
    "audit_dataset": "sublearn.audit.audit",
    "audit_experiment": "sublearn.audit.runs",
    "DefendConfig": "sublearn.defences.defend",
    "DOMAINS": "sublearn.domains",
    "defend_data": "sublearn.defences.defend",
}

__all__ = [
    "DOMAINS", "AuditConfig", "DefendConfig", "EvalConfig", "ExperimentConfig", "FilterConfig",
    "GenerateConfig", "MnistConfig", "SublearnError", "TrainConfig", "audit_dataset",
    "audit_experiment", "defend_data", "evaluate_model", "filter_data", "generate",
    "get_backend", "load_model", "run_experiment", "run_mnist", "train",
]


__getattr__, __dir__ = lazy_api(__name__, _API)

if TYPE_CHECKING:
    from sublearn.audit.audit import AuditConfig, audit_dataset
    from sublearn.audit.runs import audit_experiment
    from sublearn.backends import get_backend
    from sublearn.defences.defend import DefendConfig, defend_data
    from sublearn.domains import DOMAINS
    from sublearn.errors import SublearnError
    from sublearn.experiment.run import ExperimentConfig, run_experiment
    from sublearn.mnist.experiment import MnistConfig, run_mnist
    from sublearn.models.load import load_model
    from sublearn.pipeline.evaluate import EvalConfig, evaluate_model
    from sublearn.pipeline.filter import FilterConfig, filter_data
    from sublearn.pipeline.generate import GenerateConfig, generate
    from sublearn.pipeline.train import train
    from sublearn.pipeline.train_config import TrainConfig
