"""Sampling for evaluation: batched, seeded per batch, resumable, saved as ADM ``.npz`` arrays.

Batch ``k`` is drawn by :meth:`Pipeline.generate` from a generator seeded with
``batch_seed(seed, k)``, so each batch is a function of (model, sampling options, seed, batch size,
k) alone: a run that stops after some batches and starts again continues where it stopped and ends
with the same images as an uninterrupted run. Changing the batch size changes the images (a
generator's ``sample`` draws a batch's noise in one call; no family-independent way exists to draw
it per image).

A work directory holds ``manifest.json`` (what is being sampled; a resume with other settings is
refused) and one ``batch-KKKKKK.npz`` per finished batch, each written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from zoo.data.transforms import to_uint8
from zoo.io import atomic_write, atomic_write_json
from zoo.progress import progress_bar

__all__ = ["batch_seed", "sample_for_eval", "save_adm_npz", "load_adm_npz"]

MANIFEST = "manifest.json"


def batch_seed(seed: int, index: int) -> int:
    """The seed of batch ``index`` of a sampling run seeded ``seed``."""
    return (int(seed) * 1_000_003 + int(index) * 7_919 + 17) % (2**63 - 1)


def _write_npz(path: Path, **arrays) -> None:
    def write(tmp):
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    atomic_write(path, write)


def save_adm_npz(path: str | os.PathLike, images_NHWC: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """ADM's sample file: ``arr_0`` uint8 ``(N, H, W, C)`` and, for class-conditional samples, ``arr_1`` labels."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: sample files end in .npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"arr_0": np.asarray(images_NHWC, dtype=np.uint8)}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels, dtype=np.int64)
    _write_npz(path, **arrays)
    return path


def load_adm_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """``arr_0`` (uint8 NHWC) and ``arr_1`` (labels, or None) of an ADM ``.npz``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with np.load(path) as data:
        if "arr_0" not in data.files:
            raise ValueError(f"{path}: no arr_0 (uint8 images N×H×W×C) in this .npz; it has {', '.join(data.files)}")
        images = data["arr_0"]
        labels = data["arr_1"] if "arr_1" in data.files else None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{path}: arr_0 should be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    return images, labels


def _fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sample_for_eval(pipe, labels: torch.Tensor, *, seed: int = 0, batch_size: int = 64,
                    work_dir: str | os.PathLike | None = None, progress: bool = True, identity: dict | None = None,
                    **sampling) -> np.ndarray:
    """Images for ``labels`` (N,) as uint8 ``(N, H, W, C)``, ``batch_size`` at a time.

    With ``work_dir`` each finished batch is kept there and a later call with the same settings
    (``identity``, e.g. the model directory and its weights, plus labels, seed, batch size and
    sampling options) reuses it; other settings raise ValueError naming the directory.
    ``sampling`` are the generator's sampling overrides (as :meth:`Pipeline.generate` takes them).
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    settings = {"identity": identity or {}, "seed": int(seed), "batch_size": int(batch_size),
                "labels": _fingerprint({"labels": labels.tolist()}), "num": len(labels),
                "sampling": pipe.sampling_kwargs(**sampling)}
    settings = json.loads(json.dumps(settings, default=str))  # as it reads back from the manifest
    work = Path(work_dir) if work_dir is not None else None
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
        manifest = work / MANIFEST
        if manifest.is_file():
            saved = json.loads(manifest.read_text())
            changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
            if changed:
                raise ValueError(f"{work}: holds samples drawn with other settings ({', '.join(changed)} differ); "
                                 f"delete it or choose another work directory")
        else:
            atomic_write_json(manifest, settings)
    starts = range(0, len(labels), batch_size)
    chunks = []
    for index, start in enumerate(progress_bar(starts, desc="sampling", unit="batch", enabled=progress)):
        shard = work / f"batch-{index:06d}.npz" if work is not None else None
        if shard is not None and shard.is_file():
            with np.load(shard) as data:
                chunks.append(data["arr_0"])
            continue
        batch_labels = labels[start:start + batch_size]
        images = pipe.generate(batch_labels, seed=batch_seed(seed, index), batch_size=len(batch_labels), **sampling)
        array = to_uint8(images)
        if shard is not None:
            _write_npz(shard, arr_0=array, arr_1=batch_labels.numpy().astype(np.int64))
        chunks.append(array)
    return np.concatenate(chunks) if chunks else np.zeros((0, 0, 0, 0), np.uint8)
