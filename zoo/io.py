"""Atomic file writes: a crash leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as handle:
            handle.write(text)

    atomic_write(path, write)


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write a state dict as safetensors atomically (contiguous, shared storage broken)."""
    from safetensors.torch import save_file

    plain = {k: v.detach().contiguous().clone() if v.data_ptr() in _shared(tensors) else v.detach().contiguous()
             for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(plain, tmp, metadata=metadata))


def _shared(tensors: dict) -> set[int]:
    seen, shared = set(), set()
    for v in tensors.values():
        ptr = v.data_ptr()
        (shared if ptr in seen else seen).add(ptr)
    return shared


def load_state_strict(module, state: dict, source: str) -> None:
    """``load_state_dict(strict=True)`` with an error (``ConfigError``) that names ``source`` and the
    first missing, unexpected or mis-shaped tensor, checked before anything is copied."""
    from zoo.config import ConfigError

    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ConfigError(f"{source}: weights do not fit the config: missing {missing[:5]}"
                          f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                          f"{' ...' if len(unexpected) > 5 else ''}")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ConfigError(f"{source}: tensor {key!r} has shape {tuple(state[key].shape)}, "
                              f"the config needs {tuple(tensor.shape)}")
    module.load_state_dict(state, strict=True)
