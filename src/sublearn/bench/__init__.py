"""`sublearn bench`: times the shipped code against baselines in one process, a module per
stage (generation, training, evaluation, numerics), the shared clocks and FLOP model in
`common`, the whole run in `run` and the table in `report`."""

from sublearn.bench.common import QUICK, STAGES, Sizes, default_stages
from sublearn.bench.report import markdown
from sublearn.bench.run import run_bench

__all__ = ["QUICK", "STAGES", "Sizes", "default_stages", "markdown", "run_bench"]
