"""Keeping a CPU process's resident memory close to what it really holds.

glibc raises its mmap threshold each time a large block is freed, so the activations of one training
step come back, in the next, from a heap that only grows: a MeanFlow step at the seed's MNIST size
peaked at 4.6 GB resident with activation checkpointing although it saves 0.3 GB of activations.
With the threshold fixed (``train.return_freed_memory``), every large block is a fresh mapping
returned to the system when freed: the whole step peaks at 2.3 GB instead of 4.6 GB, but each block
is faulted in again, and that step took 1.5x as long (docs/benchmarks.md). GPUs are unaffected:
PyTorch's caching allocator reuses freed blocks there.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def fix_mmap_threshold(threshold: int = 64 * 1024) -> bool:
    """Allocate blocks of ``threshold`` bytes and more as their own mappings (glibc ``mallopt``);
    False where the C library is not glibc (macOS, musl), and nothing changes."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
