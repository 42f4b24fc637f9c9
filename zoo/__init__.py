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

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "create_dataset",
    "create_model",
    "create_objective",
    "create_tokenizer",
    "list_models",
    "register_dataset",
    "register_generator",
    "register_objective",
    "register_tokenizer",
]
