"""Fixed 2-D sine-cosine position tables (MAE/DiT convention), computed in float64."""

from __future__ import annotations

import numpy as np


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """Positions (M,) -> (M, embed_dim) as ``[sin(pos·ω), cos(pos·ω)]``, ω_i = 10000^(-2i/D)."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size², embed_dim) table: the first half encodes the column, the second the row.

    Tokens are numbered row-major (the order of a flattened patch grid).  The official code builds
    ``meshgrid(w, h)`` and encodes ``grid[0]`` (the column index) first; so does this.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32),
                             indexing="ij")
    emb_first = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, cols)
    emb_second = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, rows)
    return np.concatenate([emb_first, emb_second], axis=1)
