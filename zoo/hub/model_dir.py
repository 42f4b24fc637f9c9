"""The model directory: ``config.json`` + ``model.safetensors`` (+ ``tokenizer.safetensors``).

A run directory is a model directory: the trainer rewrites these files atomically at every
checkpoint, ``model.safetensors`` holding the EMA weights and ``model_raw.safetensors`` the raw ones.
A tokenizer's run directory has no generator: its ``config.json`` has no ``generator`` section and
its weights are ``tokenizer.safetensors`` (EMA) and ``tokenizer_raw.safetensors``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from zoo import __version__
from zoo.config import ConfigError
from zoo.io import atomic_write_json, load_state_strict, save_safetensors  # noqa: F401 (re-exported)
from zoo.registry import get_entry

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
RAW_WEIGHTS_NAME = "model_raw.safetensors"
TOKENIZER_WEIGHTS_NAME = "tokenizer.safetensors"
TOKENIZER_RAW_WEIGHTS_NAME = "tokenizer_raw.safetensors"


def model_config_dict(recipe) -> dict[str, Any]:
    """The ``config.json`` content describing a recipe's model (everything needed to rebuild it)."""
    from zoo.recipe import data_info

    info = data_info(recipe)
    out: dict[str, Any] = {"zoo_version": __version__}
    if recipe.model is not None:
        out["generator"] = recipe.model.to_dict()
    tokenizer = recipe.tokenizer.to_dict()
    if tokenizer.get("pretrained"):
        tokenizer["pretrained"] = ""  # its weights are saved in the directory (tokenizer.safetensors)
    out["tokenizer"] = tokenizer
    if recipe.objective is not None:
        out["objective"] = recipe.objective.to_dict()
    out["data"] = {"name": recipe.data.name, **{k: v for k, v in info.items() if v is not None}}
    if recipe.model is not None:
        out["sample"] = recipe.to_dict()["sample"]
    return out


def save_model_dir(path: str | os.PathLike, config: dict[str, Any], generator_state: dict[str, torch.Tensor] | None,
                   *, raw_state: dict[str, torch.Tensor] | None = None,
                   tokenizer_state: dict[str, torch.Tensor] | None = None,
                   tokenizer_raw_state: dict[str, torch.Tensor] | None = None) -> None:
    """Write a model directory; each file is replaced atomically, weights before config.
    ``generator_state=None`` writes a tokenizer's directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "zoo_version": __version__}
    if generator_state is not None:
        save_safetensors(path / WEIGHTS_NAME, generator_state, metadata=meta)
    if raw_state is not None:
        save_safetensors(path / RAW_WEIGHTS_NAME, raw_state, metadata=meta)
    if tokenizer_state:
        save_safetensors(path / TOKENIZER_WEIGHTS_NAME, tokenizer_state, metadata=meta)
    if tokenizer_raw_state:
        save_safetensors(path / TOKENIZER_RAW_WEIGHTS_NAME, tokenizer_raw_state, metadata=meta)
    atomic_write_json(path / CONFIG_NAME, config)


def read_model_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: not a model directory (no {CONFIG_NAME}); pass a run directory "
                                f"written by zoo-train or a model directory")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{config_file}: not valid JSON: {err}") from None


def read_hub_config(repo_id: str, *, where: str = "") -> dict[str, Any]:
    """``config.json`` of a Hugging Face Hub repo (downloaded, or from the cache when offline)."""
    return read_model_config(resolve_model_dir(repo_id, where=where, allow_patterns=[CONFIG_NAME]))


def resolve_model_dir(ref: str | os.PathLike, *, where: str = "", allow_patterns=None) -> Path:
    """A local directory as is; ``org/name`` as a snapshot of that Hub repo (honours ``HF_TOKEN``,
    ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and the Hugging Face cache)."""
    local = Path(ref)
    if local.is_dir():
        return local
    text = str(ref)
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise FileNotFoundError(f"{where + ': ' if where else ''}{text}: no such directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, allow_patterns=allow_patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        raise FileNotFoundError(f"{where + ': ' if where else ''}{text}: not a local directory, and the Hub repo "
                                f"could not be fetched ({type(err).__name__}: {str(err).splitlines()[0]})") from None


def _build(kind: str, section: dict[str, Any], where: str, **extra):
    values = dict(section)
    name = values.pop("name")
    entry = get_entry(kind, name, where=where)
    return entry.build(entry.make_config(values, where=where), **extra)


def load_model_dir(path: str | os.PathLike, *, weights: str = "ema", device: str | torch.device = "cpu"):
    """Rebuild the generator and tokenizer of a model directory and wrap them in a :class:`~zoo.pipeline.Pipeline`.

    ``weights="ema"`` reads ``model.safetensors`` (EMA), ``"raw"`` the raw training weights.
    """
    from zoo.config import build_config
    from zoo.pipeline import Pipeline
    from zoo.recipe import SampleConfig

    path = Path(path)
    config = read_model_config(path)
    where = str(path / CONFIG_NAME)
    if "generator" not in config:
        raise ConfigError(f"{where}: a tokenizer's directory (no generator); use zoo-reconstruct, or "
                          f"zoo.hub.load_tokenizer_dir")
    objective = _build("objective", config["objective"], f"{where}: objective") if "objective" in config else None
    generator = _build("generator", config["generator"], f"{where}: generator", objective=objective)
    tokenizer = _build("tokenizer", config["tokenizer"], f"{where}: tokenizer")
    file_name = {"ema": WEIGHTS_NAME, "raw": RAW_WEIGHTS_NAME}.get(weights)
    if file_name is None:
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    weights_file = path / file_name
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file}: missing (the run has not written a checkpoint yet?)")
    load_state_strict(generator, load_file(str(weights_file)), str(weights_file))
    tokenizer_file = path / TOKENIZER_WEIGHTS_NAME
    if tokenizer_file.is_file():
        load_state_strict(tokenizer, load_file(str(tokenizer_file)), str(tokenizer_file))
    sample = build_config(SampleConfig, config.get("sample"), where=f"{where}: sample")
    data = config.get("data", {})
    return Pipeline(generator.to(device).eval(), tokenizer.to(device).eval(), sample,
                    num_classes=data.get("num_classes", getattr(generator, "num_classes", None)),
                    image_size=data.get("image_size"))


def load_tokenizer_dir(path: str | os.PathLike, *, weights: str = "ema", device: str | torch.device = "cpu"):
    """The tokenizer of a model or run directory (a tokenizer's own run, or a generator's), in eval mode.

    ``weights="raw"`` reads a tokenizer run's ``tokenizer_raw.safetensors``.
    """
    path = Path(path)
    config = read_model_config(path)
    where = str(path / CONFIG_NAME)
    if "tokenizer" not in config:
        raise ConfigError(f"{where}: has no tokenizer section")
    tokenizer = _build("tokenizer", config["tokenizer"], f"{where}: tokenizer")
    file_name = {"ema": TOKENIZER_WEIGHTS_NAME, "raw": TOKENIZER_RAW_WEIGHTS_NAME}.get(weights)
    if file_name is None:
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    weights_file = path / file_name
    if weights_file.is_file():
        load_state_strict(tokenizer, load_file(str(weights_file)), str(weights_file))
    elif any(True for _ in tokenizer.parameters()):
        raise FileNotFoundError(f"{weights_file}: missing (the run has not written a checkpoint yet?)")
    return tokenizer.to(device).eval()
