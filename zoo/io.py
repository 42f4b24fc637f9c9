"""Atomic file writes: a crash leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zoo.errors import WriteError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file (mkstemp's 0600 would hide runs from others)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new entry in directory ``path`` durable (POSIX; a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename is then as durable as they allow
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, rename it over ``path``
    and fsync the directory: after a crash at any instant ``path`` is the old file or the whole new one.

    An ``OSError`` (disk full, no permission) removes the temporary file and is raised as
    :class:`~zoo.errors.WriteError` naming ``path``; the old file is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise write_error(path, err) from None
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise write_error(path, err) from None
        raise


def write_error(path: str | os.PathLike, err: OSError) -> WriteError:
    """A :class:`WriteError` for ``path`` that keeps ``err``'s errno and says what it means."""
    reason = os.strerror(err.errno) if err.errno else str(err)
    hint = {28: "free some space or point --run-dir elsewhere", 13: "check the folder's permissions",
            30: "the file system is read-only"}.get(err.errno or 0, "")
    out = WriteError(err.errno, f"could not write {path}: {reason}{'; ' + hint if hint else ''}")
    out.filename = str(path)
    return out


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

    shared = _shared(tensors)
    plain = {k: v.detach().contiguous().clone() if v.data_ptr() in shared else v.detach().contiguous()
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


CONFIG_NAME = "config.json"  # a model directory's description (zoo.hub.model_dir has the whole format)


def read_model_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of the model (or run) directory ``path``; a missing or broken file is a
    ConfigError/FileNotFoundError naming it."""
    from zoo.config import ConfigError

    path = Path(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: not a model directory (no {CONFIG_NAME}); pass a run directory "
                                f"written by zoo-train or a model directory")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{config_file}: not valid JSON: {err}") from None
