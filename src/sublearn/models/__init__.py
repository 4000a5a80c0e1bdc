"""Model loading: embedded GGUF models (cached as safetensors) and Hugging Face ids/paths."""

from sublearn.models.load import DEFAULT_MODEL, LoadedModel, load_model, resolve_model_path

__all__ = ["DEFAULT_MODEL", "LoadedModel", "load_model", "resolve_model_path"]
