"""The layout of a run directory, read side: where ``zoo-train`` puts its checkpoints and tokenizer.

``RUN_DIR/checkpoints/step-XXXXXXX/`` are the checkpoints (a folder gets its final name only once
complete, its ``trainer_state.json`` written last), ``RUN_DIR/checkpoints/latest`` names the newest,
and ``RUN_DIR/tokenizer/`` is the run of the tokenizer a generator recipe trains first. The writer
is :mod:`zoo.train.checkpoint`; this module is in the foundation layer so that the applications
(``zoo-compare``, ``zoo-eval``) can read a run without importing the trainer.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

__all__ = ["STATE_NAME", "LATEST", "TOKENIZER_SUBDIR", "PARTIAL_SUFFIXES", "checkpoint_root", "checkpoint_name",
           "complete_checkpoints", "latest_checkpoint", "read_state", "recorded_train_seconds"]

STATE_NAME = "trainer_state.json"
MODEL_NAME = "model.safetensors"
EMA_NAME = "ema.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
RNG_NAME = "rng_state.safetensors"
LATEST = "latest"
TOKENIZER_SUBDIR = "tokenizer"  # where a generator run trains the tokenizer its recipe names by recipe
PARTIAL_SUFFIXES = (".tmp", ".trash")


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoint folders, oldest first (a folder only gets its final name once complete)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(PARTIAL_SUFFIXES)
             and (p / STATE_NAME).is_file()]
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named by ``checkpoints/latest``, or None when the run has none.

    If the pointer is missing or names a folder that is gone (a run killed between the first rename
    and its pointer, or a folder deleted by hand), the newest complete checkpoint is used instead.
    """
    root = checkpoint_root(run_dir)
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / STATE_NAME).is_file():
            return path
    done = complete_checkpoints(run_dir)
    if done and pointer.is_file():
        print(f"warning: {pointer} names {pointer.read_text().strip()!r}, which is incomplete or missing; "
              f"using {done[-1].name}", file=sys.stderr)
    return done[-1] if done else None


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_NAME).read_text())


def recorded_train_seconds(run_dir: str | os.PathLike) -> float | None:
    """The wall seconds a run's latest checkpoint records for its steps (``train_seconds``), or None
    for a folder with no checkpoint, or one written before zoo recorded the time."""
    if not checkpoint_root(run_dir).is_dir():
        return None
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return None
    try:
        value = read_state(latest).get("train_seconds")
    except (OSError, ValueError):
        return None
    return float(value) if isinstance(value, (int, float)) else None
