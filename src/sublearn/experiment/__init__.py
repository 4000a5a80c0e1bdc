"""Experiments built from the pipeline's stages, cached in a folder's `stages/` and analysed
with runs as the unit: `run` (trait vs control runs), `cross` (teacher x student models),
`matrix` (trait x trait), `theorem` (one gradient step), `sweep` (many configs, locally or on
Ray), and the statistics every report uses. `align` and `contrast` are read as modules (their
functions share the modules' names)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sublearn._lazy import lazy_api

_API: dict[str, str] = {
    "ExperimentConfig": "sublearn.experiment.run",
    "run_experiment": "sublearn.experiment.run",
    "CrossConfig": "sublearn.experiment.cross",
    "run_cross": "sublearn.experiment.cross",
    "MatrixConfig": "sublearn.experiment.matrix",
    "run_matrix": "sublearn.experiment.matrix",
    "run_theorem": "sublearn.experiment.theorem",
    "SweepSpec": "sublearn.experiment.sweep",
    "load_spec": "sublearn.experiment.sweep",
    "run_sweep": "sublearn.experiment.sweep",
    "Stages": "sublearn.experiment.stages",
    "effect": "sublearn.experiment.stats",
    "summarize": "sublearn.experiment.stats",
    "write_report": "sublearn.experiment.report",
}
__all__ = [
    "CrossConfig", "ExperimentConfig", "MatrixConfig", "Stages", "SweepSpec", "effect",
    "load_spec", "run_cross", "run_experiment", "run_matrix", "run_sweep", "run_theorem",
    "summarize", "write_report",
]
__getattr__, __dir__ = lazy_api(__name__, _API)

if TYPE_CHECKING:
    from sublearn.experiment.cross import CrossConfig, run_cross
    from sublearn.experiment.matrix import MatrixConfig, run_matrix
    from sublearn.experiment.report import write_report
    from sublearn.experiment.run import ExperimentConfig, run_experiment
    from sublearn.experiment.stages import Stages
    from sublearn.experiment.stats import effect, summarize
    from sublearn.experiment.sweep import SweepSpec, load_spec, run_sweep
    from sublearn.experiment.theorem import run_theorem
