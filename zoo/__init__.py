"""zoo: a configurable model zoo for image generators (DiT, MeanFlow-DiT, VAR, MAR)."""

from zoo.registry import (
    create_dataset,
    create_model,
    create_objective,
    create_tokenizer,
    list_models,
    register_dataset,
    register_generator,
    register_objective,
    register_tokenizer,
)
from zoo.version import __version__


def from_pretrained(path_or_repo_id, *, revision=None, weights="ema", device="cpu"):
    """A run/model directory or Hub repo id (``org/name``) as a ready Pipeline (a tokenizer for a
    tokenizer's directory); see :func:`zoo.hub.api.from_pretrained`."""
    from zoo.hub.api import from_pretrained as load

    return load(path_or_repo_id, revision=revision, weights=weights, device=device)


def save_pretrained(model, path, **options):
    """Write a Pipeline or a tokenizer as a model directory (config.json, safetensors, README.md);
    ``options`` as :func:`zoo.hub.api.save_pretrained` (``max_shard_size``, ``license``, ``tags`` …)."""
    from zoo.hub.api import save_pretrained as save

    return save(model, path, **options)


def push_to_hub(model, repo_id, **options):
    """Upload a Pipeline, a tokenizer or a model/run directory to the Hub repo ``repo_id``; returns the
    commit URL; ``options`` as :func:`zoo.hub.api.push_to_hub` (``private``, ``revision`` …)."""
    from zoo.hub.api import push_to_hub as push

    return push(model, repo_id, **options)


__all__ = [
    "__version__",
    "create_dataset",
    "create_model",
    "create_objective",
    "create_tokenizer",
    "from_pretrained",
    "list_models",
    "push_to_hub",
    "register_dataset",
    "register_generator",
    "register_objective",
    "register_tokenizer",
    "save_pretrained",
]
