"""The model directory: ``config.json`` + ``model.safetensors`` (+ ``tokenizer.safetensors``).

A run directory is a model directory: the trainer rewrites these files atomically at every
checkpoint, ``model.safetensors`` holding the EMA weights and ``model_raw.safetensors`` the raw ones.
A tokenizer's run directory has no generator: its ``config.json`` has no ``generator`` section and
its weights are ``tokenizer.safetensors`` (EMA) and ``tokenizer_raw.safetensors``.

Weights above ``max_shard_size`` are written diffusers-style: ``model-00001-of-00003.safetensors`` …
plus ``model.safetensors.index.json`` (``{"metadata": {"total_size": …}, "weight_map": {key: file}}``);
every loader here reads either form. ``README.md`` (the model card, :mod:`zoo.hub.card`) and
``recipe.yaml`` (runs) sit beside them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from zoo.config import ConfigError
from zoo.io import (  # noqa: F401 (re-exported)
    CONFIG_NAME,
    atomic_write_json,
    load_state_strict,
    read_model_config,
    save_safetensors,
)
from zoo.registry import get_entry
from zoo.version import __version__

WEIGHTS_NAME = "model.safetensors"
RAW_WEIGHTS_NAME = "model_raw.safetensors"
TOKENIZER_WEIGHTS_NAME = "tokenizer.safetensors"
TOKENIZER_RAW_WEIGHTS_NAME = "tokenizer_raw.safetensors"
CARD_NAME = "README.md"
RECIPE_NAME = "recipe.yaml"
INDEX_SUFFIX = ".index.json"
# Above this many bytes a weights file is split into shards: 5 GB (transformers' default; diffusers'
# is 10 GB), which keeps every file well under the Hub's per-file limit.
DEFAULT_MAX_SHARD_SIZE = 5 * 10 ** 9
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20,
               "GIB": 2 ** 30}


def parse_size(value: int | str) -> int:
    """Bytes from ``1000``, ``"500MB"``, ``"5GB"``, ``"2GiB"``; ValueError otherwise."""
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"max shard size must be >= 1 byte, got {value}")
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(value), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max shard size {value!r}: expected a number of bytes or e.g. '500MB', '5GB'")
    return parse_size(int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").upper()]))


def _shard_pattern(file_name: str) -> re.Pattern:
    stem = re.escape(file_name[: -len(".safetensors")])
    return re.compile(rf"^{stem}-\d{{5}}-of-\d{{5}}\.safetensors$")


def save_weights(path: str | os.PathLike, file_name: str, state: dict[str, torch.Tensor], *,
                 metadata: dict[str, str] | None = None,
                 max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> list[str]:
    """Write ``state`` as ``path/file_name``, or, when it holds more than ``max_shard_size`` bytes, as
    shards ``STEM-0000i-of-0000n.safetensors`` (tensors in key order, a new shard whenever the next
    tensor would overflow one) plus ``file_name + ".index.json"``. Each file is replaced atomically,
    the index last; files of the other form left from an earlier save are removed afterwards.
    Returns the file names written."""
    path = Path(path)
    limit = parse_size(max_shard_size)
    index_file = path / (file_name + INDEX_SUFFIX)
    sizes = {k: v.numel() * v.element_size() for k, v in state.items()}
    if sum(sizes.values()) <= limit:
        save_safetensors(path / file_name, state, metadata=metadata)
        written = [file_name]
    else:
        shards: list[list[str]] = [[]]
        used = 0
        for key in state:
            if shards[-1] and used + sizes[key] > limit:
                shards.append([])
                used = 0
            shards[-1].append(key)
            used += sizes[key]
        stem = file_name[: -len(".safetensors")]
        written = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, keys in zip(written, shards):
            save_safetensors(path / name, {k: state[k] for k in keys}, metadata=metadata)
        weight_map = {k: name for name, keys in zip(written, shards) for k in keys}
        atomic_write_json(index_file, {"metadata": {"total_size": sum(sizes.values()), **(metadata or {})},
                                       "weight_map": weight_map})
        written.append(index_file.name)
    pattern = _shard_pattern(file_name)
    for stale in path.iterdir():
        if stale.name not in written and (pattern.match(stale.name) or stale.name in (file_name, index_file.name)):
            stale.unlink()
    return written


def weights_exist(path: str | os.PathLike, file_name: str) -> bool:
    path = Path(path)
    return (path / file_name).is_file() or (path / (file_name + INDEX_SUFFIX)).is_file()


def load_weights(path: str | os.PathLike, file_name: str) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict saved as ``path/file_name`` (single file or shards with an index) and a
    description of its source for messages. Shard names in the index must stay inside ``path``;
    every shard must hold exactly the keys the index assigns it."""
    from zoo.hub.safe_load import read_safetensors, resolve_inside

    path = Path(path)
    index_file = path / (file_name + INDEX_SUFFIX)
    if not index_file.is_file():
        single = path / file_name
        if not single.is_file():
            raise FileNotFoundError(f"{single}: missing (and no {index_file.name})")
        return read_safetensors(single), str(single)
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConfigError(f"{index_file}: not a shard index ({type(err).__name__}: {err}); expected "
                          f"{{'weight_map': {{tensor: file}}}}") from None
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_file = resolve_inside(path, shard, where=str(index_file))
        if not shard_file.is_file():
            raise FileNotFoundError(f"{index_file}: names shard {shard}, which is missing")
        tensors = read_safetensors(shard_file)
        expected = {k for k, v in weight_map.items() if v == shard}
        if set(tensors) != expected:
            odd = sorted(set(tensors) ^ expected)
            raise ConfigError(f"{shard_file}: holds other tensors than {index_file.name} says (first: {odd[0]!r})")
        state.update(tensors)
    return state, str(index_file)


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
                   tokenizer_raw_state: dict[str, torch.Tensor] | None = None,
                   max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> None:
    """Write a model directory; each file is replaced atomically, weights before config, and weights
    above ``max_shard_size`` bytes are sharded (:func:`save_weights`).
    ``generator_state=None`` writes a tokenizer's directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "zoo_version": __version__}
    for file_name, state in ((WEIGHTS_NAME, generator_state), (RAW_WEIGHTS_NAME, raw_state),
                             (TOKENIZER_WEIGHTS_NAME, tokenizer_state or None),
                             (TOKENIZER_RAW_WEIGHTS_NAME, tokenizer_raw_state or None)):
        if state is not None:
            save_weights(path, file_name, state, metadata=meta, max_shard_size=max_shard_size)
    config = dict(config)
    config.setdefault("zoo_version", __version__)
    atomic_write_json(path / CONFIG_NAME, config)


def read_hub_config(repo_id: str, *, where: str = "") -> dict[str, Any]:
    """``config.json`` of a Hugging Face Hub repo (downloaded, or from the cache when offline)."""
    return read_model_config(resolve_model_dir(repo_id, where=where, allow_patterns=[CONFIG_NAME]))


def looks_like_repo_id(ref: str | os.PathLike) -> bool:
    """Whether ``ref`` is spelled as a Hub repo id ``org/name`` (one slash; letters, digits, ``-_.``),
    checked before asking the Hub so that a mistyped path is named as such instead of as a failed
    download. Whether the repo exists is the Hub's to say."""
    text = str(ref)
    if text.count("/") != 1 or text.startswith((".", "/")):
        return False
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def resolve_model_dir(ref: str | os.PathLike, *, where: str = "", allow_patterns=None,
                      revision: str | None = None) -> Path:
    """A local directory as is; ``org/name`` as a snapshot of that Hub repo at ``revision`` (branch,
    tag or commit; default main), honouring ``HF_TOKEN``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` and the
    Hugging Face cache. Every file name the repo lists must be a safe relative path."""
    local = Path(ref)
    if local.is_dir():
        return local
    text = str(ref)
    if not looks_like_repo_id(text):
        raise FileNotFoundError(f"{where + ': ' if where else ''}{text}: no such directory, and not a Hub repo id "
                                f"(ORG/NAME)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from zoo.hub.safe_load import safe_relative_path

    try:  # the names the repo lists must stay inside the snapshot (checked before anything is written)
        from huggingface_hub import HfApi

        listed = HfApi().list_repo_files(text, revision=revision)
    except Exception:  # offline, or not found: snapshot_download below decides (the cache, or a clear error)
        listed = []
    for name in listed:
        safe_relative_path(name, where=f"Hub repo {text}")
    try:
        return Path(snapshot_download(text, allow_patterns=allow_patterns, revision=revision))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        at = f" at revision {revision!r}" if revision else ""
        raise FileNotFoundError(f"{where + ': ' if where else ''}{text}: not a local directory, and the Hub repo"
                                f"{at} could not be fetched ({type(err).__name__}: "
                                f"{(str(err).splitlines() or [''])[0]})") from None


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
    if not weights_exist(path, file_name):
        raise FileNotFoundError(f"{path / file_name}: missing (the run has not written a checkpoint yet?)")
    state, source = load_weights(path, file_name)
    load_state_strict(generator, state, source)
    if weights_exist(path, TOKENIZER_WEIGHTS_NAME):
        state, source = load_weights(path, TOKENIZER_WEIGHTS_NAME)
        load_state_strict(tokenizer, state, source)
    elif any(True for _ in tokenizer.parameters()) and not config["tokenizer"].get("pretrained"):
        raise FileNotFoundError(f"{path / TOKENIZER_WEIGHTS_NAME}: missing, and the {config['tokenizer']['name']!r} "
                                f"tokenizer has weights; without them its images would be noise (convert with "
                                f"zoo-convert --tokenizer, or copy the tokenizer's weights into the directory)")
    sample = build_config(SampleConfig, config.get("sample"), where=f"{where}: sample")
    data = config.get("data", {})
    return Pipeline(generator.to(device).eval(), tokenizer.to(device).eval(), sample,
                    num_classes=data.get("num_classes", getattr(generator, "num_classes", None)),
                    image_size=data.get("image_size"), config=config)


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
    if weights_exist(path, file_name):
        state, source = load_weights(path, file_name)
        load_state_strict(tokenizer, state, source)
    elif any(True for _ in tokenizer.parameters()) and not config["tokenizer"].get("pretrained"):
        raise FileNotFoundError(f"{path / file_name}: missing (the run has not written a checkpoint yet?)")
    return tokenizer.to(device).eval()
