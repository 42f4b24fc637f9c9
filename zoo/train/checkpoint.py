"""Checkpoints of a run: ``checkpoints/step-XXXXXXX/`` written whole or not at all, and a ``latest`` pointer.

A checkpoint is first written to ``step-XXXXXXX.tmp`` and renamed when complete; the ``latest``
file is replaced atomically afterwards. A crash at any moment leaves the previous checkpoint and
pointer intact, and leftover ``.tmp`` folders are ignored (and cleaned) on resume.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from zoo.io import atomic_write_text

STATE_NAME = "trainer_state.json"
EMA_NAME = "ema.safetensors"


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named by ``checkpoints/latest``, or None when the run has none."""
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / STATE_NAME).is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is incomplete or missing")
    return path


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_NAME).read_text())


def finalize(tmp_dir: Path, final_dir: Path, keep: int) -> None:
    """Rename a fully written checkpoint into place, point ``latest`` at it, prune old ones."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    atomic_write_text(final_dir.parent / "latest", final_dir.name + "\n")
    done = sorted(p for p in final_dir.parent.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def clean_partial(run_dir: str | os.PathLike) -> None:
    for tmp in checkpoint_root(run_dir).glob("step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
