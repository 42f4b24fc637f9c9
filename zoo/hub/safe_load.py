"""Reading weights without running code from them, and file names from a repo without leaving it.

- ``.safetensors`` files are read with safetensors (no code at all);
- pickles (``.pt``/``.pth``/``.ckpt``/``.bin``) only with ``torch.load(weights_only=True)``. Training
  checkpoints of the official repositories also hold their ``args`` (an ``argparse.Namespace``),
  which ``weights_only`` refuses: that one class, and nothing else, is allow-listed through
  ``torch.serialization.safe_globals``. A pickle that needs anything else (a class, a function such
  as ``os.system``) is refused with :class:`UnsafeCheckpointError` before any of it runs.
"""

from __future__ import annotations

import argparse
import os
import pickle
import warnings
from pathlib import Path, PurePosixPath

import torch

from zoo.config import ConfigError

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
# The only non-tensor class an official checkpoint needs: the training script's ``args``.
ALLOWED_GLOBALS = (argparse.Namespace,)


class UnsafeCheckpointError(ConfigError):
    """A pickle that would have to construct objects or call functions to be read."""


def load_checkpoint(path: str | os.PathLike) -> object:
    """The object stored in a weights file: a dict of tensors for ``.safetensors``; for a pickle,
    whatever ``torch.load(weights_only=True)`` returns (dicts, lists, tensors, numbers, strings,
    ``argparse.Namespace``). Raises :class:`UnsafeCheckpointError` for a pickle that needs other
    objects, ConfigError for a file that is not a checkpoint, FileNotFoundError if it is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == SAFETENSORS_SUFFIX:
        return read_safetensors(path)
    try:
        # torch warns on stderr about pickle protocols it reads with care; the outcome is what counts.
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "unsupported" in line.lower() or "global" in line.lower()),
                      lines[0] if lines else "")
        raise UnsafeCheckpointError(
            f"{path}: refused: reading this pickle would construct objects or call functions other than "
            f"tensors, plain containers and argparse.Namespace, which could run arbitrary code ({reason}). "
            f"Nothing from it was executed. If you trust the file, re-save its weights as a plain state dict "
            f"or as .safetensors with the code that wrote it") from None
    except Exception as err:  # not a torch.save file: torch fails with RuntimeError, KeyError, EOFError, ...
        first = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError(f"{path}: not a readable checkpoint (torch.load failed with {type(err).__name__}: "
                          f"{first}); expected a torch.save file or .safetensors") from None


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file; a truncated, empty or corrupt file is a ConfigError
    naming it (safetensors' own error says which part of the header is wrong)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError for a bad header or a short file
        raise ConfigError(f"{path}: not a readable safetensors file ({err}); it may be truncated or corrupt: "
                          f"write or download it again") from None


def safe_relative_path(name: str, *, where: str = "") -> PurePosixPath:
    """``name`` (a file name listed by a repo or an index file) as a relative POSIX path that stays
    inside its directory. Raises ConfigError for absolute paths, ``..`` parts, backslashes, drive
    letters and empty names."""
    prefix = f"{where}: " if where else ""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise ConfigError(f"{prefix}unsafe file name {name!r} (empty, or with a backslash or NUL)")
    path = PurePosixPath(name)
    if path.is_absolute() or any(part in ("..", "") for part in name.split("/")) or ":" in path.parts[0]:
        raise ConfigError(f"{prefix}unsafe file name {name!r}: it must be a relative path inside the repository "
                          f"(no leading '/', no '..', no drive letter)")
    return path


def resolve_inside(root: str | os.PathLike, name: str, *, where: str = "") -> Path:
    """``root / name`` after :func:`safe_relative_path`: lexically inside ``root``. Links are not
    followed (a Hugging Face cache snapshot links every file into the cache's ``blobs/``)."""
    return Path(root) / safe_relative_path(name, where=where)
