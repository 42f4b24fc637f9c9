"""``from_pretrained`` / ``save_pretrained`` / ``push_to_hub`` / ``pull``: model directories on disk and
on the Hugging Face Hub, the same format in both places.

Everything that talks to the Hub goes through ``huggingface_hub`` (``snapshot_download``,
``create_repo``, ``create_branch``, ``upload_folder``), so ``HF_TOKEN``, ``HF_ENDPOINT``,
``HF_HUB_OFFLINE``, ``HF_HOME`` and the Hugging Face cache behave as for any Hub library.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from zoo.config import ConfigError, config_to_dict
from zoo.hub.card import known_metrics, model_card, training_summary
from zoo.hub.model_dir import (
    CARD_NAME,
    CONFIG_NAME,
    DEFAULT_MAX_SHARD_SIZE,
    INDEX_SUFFIX,
    RECIPE_NAME,
    TOKENIZER_WEIGHTS_NAME,
    WEIGHTS_NAME,
    load_model_dir,
    load_tokenizer_dir,
    load_weights,
    looks_like_repo_id,
    parse_size,
    read_model_config,
    resolve_model_dir,
    save_model_dir,
    save_weights,
    weights_exist,
)
from zoo.io import atomic_write_text
from zoo.version import __version__

# Files of a run or model directory that belong on the Hub (checkpoints/, logs and grids stay local).
PUSHED_WEIGHTS = (WEIGHTS_NAME, TOKENIZER_WEIGHTS_NAME)
PUSHED_EXTRAS = (RECIPE_NAME, "reconstructions.json", "eval.json")


def is_repo_id(ref: str | os.PathLike) -> bool:
    """Whether ``ref`` names a Hub repo: spelled ``org/name`` and not an existing local path."""
    return not Path(ref).exists() and looks_like_repo_id(ref)


def resolve_pretrained(path_or_repo_id: str | os.PathLike, *, revision: str | None = None) -> Path:
    """The local directory holding the model ``path_or_repo_id``: an existing path as is (it always
    wins over a Hub repo id spelled the same), else a snapshot of the Hub repo ``org/name`` at
    ``revision`` in the Hugging Face cache (``HF_TOKEN``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE`` apply).
    What ``from_pretrained`` and the ``zoo-*`` commands share, so both find models the same way.

    Raises ValueError for a revision of a local path, FileNotFoundError for a string that is neither
    an existing path nor a fetchable repo (naming it)."""
    if Path(path_or_repo_id).exists():
        if revision is not None:
            raise ValueError(f"{path_or_repo_id}: revision={revision!r} applies to Hub repos only, this is a local "
                             f"path")
        return Path(path_or_repo_id)
    return resolve_model_dir(path_or_repo_id, revision=revision)


def from_pretrained(path_or_repo_id: str | os.PathLike, *, revision: str | None = None, weights: str = "ema",
                    device: str | torch.device = "cpu"):
    """A run directory, model directory or Hub repo id (``org/name``, at ``revision``) as a ready
    :class:`~zoo.pipeline.Pipeline` in eval mode — or, for a tokenizer's directory, the tokenizer.

    Hub repos come through the Hugging Face cache (``HF_HUB_OFFLINE=1`` serves them from it).
    Raises FileNotFoundError for an unknown path or repo, ConfigError for a directory that does not
    describe a zoo model or whose weights do not fit its config (naming the first mismatched tensor).
    """
    path = resolve_pretrained(path_or_repo_id, revision=revision)
    config = read_model_config(path)
    if "generator" in config:
        return load_model_dir(path, weights=weights, device=device)
    return load_tokenizer_dir(path, weights=weights, device=device)


# ------------------------------------------------------------------------------------------------
# Describing objects built in code
# ------------------------------------------------------------------------------------------------

def registry_name(kind: str, obj) -> str:
    """The registry name of an object built from the registry: the first entry whose builder made
    ``type(obj)`` from ``type(obj.config)``. Every name of a builder gives the same object once all
    config fields are stored, so the first one is as good as any."""
    from zoo.registry import _REGISTRY, _load_builtins

    _load_builtins()
    config = getattr(obj, "config", None)
    candidates = [(name, entry) for name, entry in sorted(_REGISTRY[kind].items())
                  if entry.builder is type(obj) and entry.config_cls is type(config)]
    if not candidates:
        raise ConfigError(f"{type(obj).__name__} is not a registered {kind} (or has no .config); register it to "
                          f"save it")
    # the name whose defaults the config keeps most of (dit-xl/2 for an XL/2), for readers of config.json
    return max(candidates, key=lambda c: sum(getattr(config, k, None) == v for k, v in c[1].defaults.items()))[0]


def _section(kind: str, obj) -> dict[str, Any]:
    section = {"name": registry_name(kind, obj), **config_to_dict(obj.config)}
    if kind == "tokenizer" and section.get("pretrained"):
        section["pretrained"] = ""  # the weights are saved in the directory
    return section


def pipeline_config(pipe) -> dict[str, Any]:
    """``config.json`` content of a pipeline: the one it was loaded from, or one described from the registry."""
    if pipe.config is not None:
        config = copy.deepcopy(pipe.config)
    else:
        config = {"generator": _section("generator", pipe.generator),
                  "tokenizer": _section("tokenizer", pipe.tokenizer)}
        objective = getattr(pipe.generator, "objective", None)
        if objective is not None and getattr(objective, "config", None) is not None:
            config["objective"] = _section("objective", objective)
        data = {"image_size": pipe.image_size, "num_classes": pipe.num_classes}
        config["data"] = {"name": "unknown", **{k: v for k, v in data.items() if v is not None}}
        config["sample"] = config_to_dict(pipe.sample_config)
    config["zoo_version"] = __version__
    return config


def tokenizer_config(tokenizer) -> dict[str, Any]:
    return {"zoo_version": __version__, "tokenizer": _section("tokenizer", tokenizer)}


# ------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------

def save_pretrained(model, path: str | os.PathLike, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                    license: str | None = None, tags=(), metrics: dict[str, float] | None = None,
                    source: dict[str, Any] | None = None, recipe_text: str | None = None,
                    repo_id: str | None = None) -> Path:
    """Write ``model`` (a :class:`~zoo.pipeline.Pipeline` or a tokenizer) as a model directory:
    ``config.json``, ``model.safetensors`` (generator) and ``tokenizer.safetensors`` (sharded above
    ``max_shard_size``), and ``README.md``. Returns the directory."""
    from zoo.pipeline import Pipeline

    path = Path(path)
    if isinstance(model, Pipeline):
        config = pipeline_config(model)
        save_model_dir(path, config, model.generator.state_dict(), tokenizer_state=model.tokenizer.state_dict(),
                       max_shard_size=max_shard_size)
    elif isinstance(model, torch.nn.Module) and hasattr(model, "encode") and hasattr(model, "decode"):
        config = tokenizer_config(model)
        save_model_dir(path, config, None, tokenizer_state=model.state_dict(), max_shard_size=max_shard_size)
    else:
        raise TypeError(f"save_pretrained takes a zoo Pipeline or tokenizer, got {type(model).__name__}")
    atomic_write_text(path / CARD_NAME, model_card(config, repo_id=repo_id, recipe_text=recipe_text, license=license,
                                                   tags=tags, metrics=metrics, source=source))
    return path


def stage_model_dir(src: str | os.PathLike, dest: str | os.PathLike, *, repo_id: str | None = None,
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, license: str | None = None,
                    tags=()) -> Path:
    """Copy what belongs on the Hub from a run or model directory ``src`` into the empty ``dest``:
    config.json, EMA weights (resharded if needed), recipe.yaml and metric files, and a README.md
    (``src``'s own card if it has one, else a generated one). Checkpoints, logs and grids stay out."""
    src, dest = Path(src), Path(dest)
    config = read_model_config(src)
    if "generator" not in config and "tokenizer" not in config:
        raise ConfigError(f"{src / CONFIG_NAME}: describes neither a generator nor a tokenizer")
    limit = parse_size(max_shard_size)
    dest.mkdir(parents=True, exist_ok=True)
    needed = (WEIGHTS_NAME, TOKENIZER_WEIGHTS_NAME) if "generator" in config else (TOKENIZER_WEIGHTS_NAME,)
    for file_name in needed:
        if not weights_exist(src, file_name):
            if file_name == WEIGHTS_NAME:
                raise FileNotFoundError(f"{src / file_name}: missing (the run has not written a checkpoint yet?)")
            continue
        single = src / file_name
        if single.is_file() and single.stat().st_size <= limit:
            _link_or_copy(single, dest / file_name)
        else:  # sharded, or too big for one file: rewrite with this limit
            state, _ = load_weights(src, file_name)
            save_weights(dest, file_name, state, metadata={"format": "pt", "zoo_version": __version__},
                         max_shard_size=limit)
    for name in PUSHED_EXTRAS:
        if (src / name).is_file():
            _link_or_copy(src / name, dest / name)
    (dest / CONFIG_NAME).write_text((src / CONFIG_NAME).read_text())
    if (src / CARD_NAME).is_file():
        _link_or_copy(src / CARD_NAME, dest / CARD_NAME)
    else:
        recipe = src / RECIPE_NAME
        card = model_card(config, repo_id=repo_id, recipe_text=recipe.read_text() if recipe.is_file() else None,
                          license=license, tags=tags, metrics=known_metrics(src), training=training_summary(src))
        (dest / CARD_NAME).write_text(card)
    return dest


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


# ------------------------------------------------------------------------------------------------
# The Hub
# ------------------------------------------------------------------------------------------------

def _hub_error(action: str, repo_id: str, err: Exception) -> Exception:
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        return ConnectionError(f"cannot {action} {repo_id}: HF_HUB_OFFLINE is set; unset it to reach the Hub")
    first = (str(err).splitlines() or [""])[0]
    return ConnectionError(f"cannot {action} {repo_id} ({type(err).__name__}: {first})")


def push_to_hub(model, repo_id: str, *, private: bool | None = None, revision: str | None = None,
                commit_message: str | None = None, token: str | None = None,
                max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, license: str | None = None, tags=()) -> str:
    """Upload ``model`` — a Pipeline, a tokenizer, or the path of a run/model directory — to the Hub
    repo ``repo_id`` (created if missing; ``private`` applies on creation) on branch ``revision``
    (created from main if missing). Weight files of earlier commits that this upload does not
    rewrite are deleted, so shards never mix. Returns the commit URL.

    Uses ``token`` or ``HF_TOKEN``/the saved login, and ``HF_ENDPOINT``."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    parts = str(repo_id).split("/")
    if len(parts) != 2 or not all(part.strip() for part in parts):
        raise ValueError(f"{repo_id!r}: expected a Hub repo id ORG/NAME")
    with tempfile.TemporaryDirectory(prefix="zoo-push-") as tmp:
        stage = Path(tmp) / "model"
        if isinstance(model, (str, os.PathLike)):
            stage_model_dir(model, stage, repo_id=repo_id, max_shard_size=max_shard_size, license=license, tags=tags)
            kind = "run" if (Path(model) / RECIPE_NAME).is_file() else "model"
        else:
            save_pretrained(model, stage, max_shard_size=max_shard_size, license=license, tags=tags, repo_id=repo_id)
            kind = "model"
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id, folder_path=str(stage), revision=revision,
                commit_message=commit_message or f"Upload {kind} directory with zoo {__version__}",
                delete_patterns=["*.safetensors", f"*{INDEX_SUFFIX}"])
        except (HfHubHTTPError, OfflineModeIsEnabled, OSError) as err:
            raise _hub_error("push to", repo_id, err) from None
    return str(info.commit_url)


def pull(repo_id: str, *, revision: str | None = None, to: str | os.PathLike | None = None) -> Path:
    """Download the model directory ``repo_id`` at ``revision`` into the Hugging Face cache and, with
    ``to``, copy it (links resolved) into that new or empty directory. Returns where it is."""
    snapshot = resolve_model_dir(repo_id, revision=revision)
    read_model_config(snapshot)  # a zoo model directory, or a clear error
    if to is None:
        return snapshot
    to = Path(to)
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise FileExistsError(f"{to}: exists and is not an empty directory; choose another --to")
    tmp = to.with_name(f".{to.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(snapshot, tmp, symlinks=False)
    if to.exists():
        to.rmdir()
    os.replace(tmp, to)
    return to
