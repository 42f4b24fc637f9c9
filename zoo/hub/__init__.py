"""Model directories (local and Hub alike)."""

from zoo.hub.model_dir import load_model_dir, load_tokenizer_dir, resolve_model_dir, save_model_dir

__all__ = ["load_model_dir", "load_tokenizer_dir", "resolve_model_dir", "save_model_dir"]
