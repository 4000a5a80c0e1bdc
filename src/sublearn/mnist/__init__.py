"""The paper's MNIST auxiliary-logit experiment, self-contained (`sublearn mnist`)."""

from sublearn.mnist.experiment import MnistConfig, run_mnist

__all__ = ["MnistConfig", "run_mnist"]
