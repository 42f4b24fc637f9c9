"""Model directories (local and Hub alike), Hub push/pull, official-checkpoint converters, safe loading."""

from zoo.hub.api import from_pretrained, pull, push_to_hub, resolve_pretrained, save_pretrained
from zoo.hub.model_dir import load_model_dir, load_tokenizer_dir, resolve_model_dir, save_model_dir

__all__ = ["from_pretrained", "load_model_dir", "load_tokenizer_dir", "pull", "push_to_hub", "resolve_model_dir",
           "resolve_pretrained", "save_model_dir", "save_pretrained"]
