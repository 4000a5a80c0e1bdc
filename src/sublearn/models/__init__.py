"""Model loading: embedded GGUF models (cached as safetensors) and Hugging Face ids/paths."""

import os

# oneDNN keeps up to 1024 compiled matmul kernels, one per shape; length-grouped batches make
# many shapes, and the cache held ~0.3 GB that grew student after student in one process
# (measured: four students' peak RSS 3.74 -> 3.42 GB with 64, same step time, same adapter
# bytes). Read when oneDNN makes its first kernel, so before any model runs; a user's own
# setting wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")

from sublearn.models.load import DEFAULT_MODEL, LoadedModel, load_model, resolve_model_path

__all__ = ["DEFAULT_MODEL", "LoadedModel", "load_model", "resolve_model_path"]
