"""Checkpoints of a run: ``checkpoints/step-XXXXXXX/`` written whole or not at all, and a ``latest`` pointer.

A checkpoint folder holds

- ``model.safetensors``: the raw (trained) weights;
- ``ema.safetensors``: the EMA weights;
- ``optimizer.safetensors``: the optimizer's tensors, its parameter groups and scalars in the metadata;
- ``rng_state.safetensors``: every process's torch, numpy and Python RNG states;
- ``trainer_state.json``: the step, the data position and the counters, written last.

No pickle anywhere: a checkpoint is read with safetensors and JSON only.

The order of a save makes a kill at any instant harmless (:func:`write_checkpoint`): every file is
written and fsynced in ``step-XXXXXXX.tmp/``, the folder fsynced and renamed, the parent fsynced,
then ``latest`` replaced atomically, and only then are older checkpoints removed (renamed to
``*.trash`` first, so a half-deleted folder is never mistaken for a checkpoint). Leftover ``.tmp``
and ``.trash`` folders are removed on resume.

The read side of the layout (``latest_checkpoint``, ``read_state``, ...) lives in :mod:`zoo.rundir`, in
the foundation layer, so that the applications can read a run; it is re-exported here.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from zoo.errors import WriteError
from zoo.io import atomic_write_json, atomic_write_text, fsync_dir, save_safetensors, write_error
from zoo.rundir import (  # noqa: F401
    LATEST,
    PARTIAL_SUFFIXES,
    STATE_NAME,
    checkpoint_name,
    checkpoint_root,
    complete_checkpoints,
    latest_checkpoint,
    read_state,
    recorded_train_seconds,
)

MODEL_NAME = "model.safetensors"
EMA_NAME = "ema.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
RNG_NAME = "rng_state.safetensors"


def write_checkpoint(run_dir: str | os.PathLike, step: int, files: dict[str, Callable[[Path], None]],
                     state: dict, *, keep: int) -> Path:
    """Write checkpoint ``step`` durably and make it ``latest``; returns its folder.

    ``files`` maps a file name to a function writing it (each must write its file atomically, as the
    ``zoo.io`` writers do); ``state`` becomes ``trainer_state.json``, written last. After the new
    checkpoint is durable and named by ``latest``, all but the newest ``keep`` are removed.

    An ``OSError`` while writing (disk full, no permission) removes the partial folder and raises
    :class:`~zoo.errors.WriteError` saying that the previous checkpoint is still the latest.
    """
    root = checkpoint_root(run_dir)
    final = root / checkpoint_name(step)
    tmp = root / (final.name + ".tmp")
    previous = latest_checkpoint(run_dir)
    if previous == final:
        raise ValueError(f"{final} is already the latest checkpoint; a step is saved once")
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for name, write in files.items():
            write(tmp / name)
        atomic_write_json(tmp / STATE_NAME, state)
        fsync_dir(tmp)
        if final.exists():  # written by a run killed before it moved ``latest``: this save replaces it
            _discard(final)
        os.replace(tmp, final)
        fsync_dir(root)
        atomic_write_text(root / LATEST, final.name + "\n")
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"{previous.name} is still the latest checkpoint" if previous else "there is no earlier checkpoint"
        cause = err if isinstance(err, WriteError) else write_error(getattr(err, "filename", None) or tmp, err)
        raise WriteError(cause.errno, f"checkpoint {final.name} was not saved ({cause.strerror or cause}); "
                                      f"{kept}") from None
    for old in complete_checkpoints(run_dir)[:-keep]:
        _discard(old)
    return final


def _discard(folder: Path) -> None:
    """Remove a checkpoint folder so that no crash leaves a half-deleted one under a final name."""
    trash = folder.with_name(folder.name + ".trash")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    fsync_dir(folder.parent)
    shutil.rmtree(trash, ignore_errors=True)


def clean_partial(run_dir: str | os.PathLike) -> None:
    """Remove what a killed save or prune left behind (``*.tmp``, ``*.trash``)."""
    root = checkpoint_root(run_dir)
    for suffix in PARTIAL_SUFFIXES:
        for leftover in root.glob(f"step-*{suffix}"):
            shutil.rmtree(leftover, ignore_errors=True)
    for stray in root.glob(f".{LATEST}.*.tmp"):  # a pointer write killed before its rename
        stray.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- optimizer state


def save_optimizer(path: Path, state_dict: dict) -> None:
    """An optimizer's ``state_dict()`` as safetensors: tensors as ``state.<param>.<name>``, the rest
    (parameter groups, non-tensor per-parameter values) as JSON in the metadata."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for param_id, values in state_dict["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{param_id}.{name}"] = value
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    metadata = {"param_groups": json.dumps(state_dict["param_groups"]), "scalars": json.dumps(scalars),
                "param_ids": json.dumps(sorted(int(k) for k in state_dict["state"]))}
    save_safetensors(path, tensors, metadata=metadata)


def load_optimizer(path: Path) -> dict:
    """The ``state_dict`` :func:`save_optimizer` wrote, ready for ``optimizer.load_state_dict``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    state: dict[int, dict] = {int(k): {} for k in json.loads(metadata["param_ids"])}
    for key, value in tensors.items():
        _, param_id, name = key.split(".", 2)
        state[int(param_id)][name] = value
    for param_id, values in json.loads(metadata["scalars"]).items():
        state[int(param_id)].update(values)
    return {"state": state, "param_groups": json.loads(metadata["param_groups"])}


# ---------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    """This process's torch (CPU and CUDA), numpy and Python RNG states as tensors and JSON numbers."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    out = {"torch": torch.get_rng_state(),
           "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
           "python": torch.tensor(internal, dtype=torch.int64),
           "meta": {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [version, py_gauss]}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    kind, pos, has_gauss, gauss = state["meta"]["numpy"]
    np.random.set_state((kind, state["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_gauss = state["meta"]["python"]
    random.setstate((version, tuple(int(v) for v in state["python"].tolist()), py_gauss))


def save_rng_states(path: Path, states: list[dict]) -> None:
    """The RNG states of every process (``states[rank]``) in one safetensors file."""
    tensors = {f"rank{rank}.{key}": value for rank, state in enumerate(states) for key, value in state.items()
               if key != "meta"}
    metadata = {"meta": json.dumps([state["meta"] for state in states])}
    save_safetensors(path, tensors, metadata=metadata)


def load_rng_states(path: Path) -> list[dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metas = json.loads(handle.metadata()["meta"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    states = [{"meta": meta} for meta in metas]
    for key, value in tensors.items():
        rank, name = key.split(".", 1)
        states[int(rank[len("rank"):])][name] = value
    return states
