"""Normalisation layers beyond torch's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ScaledRMSNorm(nn.Module):
    """``x / ‖x‖ · √dim · g`` with one learned scalar ``g`` (the MeanFlow seed's ``RMSNorm``).

    Unlike ``torch.nn.RMSNorm`` it has no epsilon inside the root (``F.normalize`` clamps the norm
    at 1e-12) and a single gain for all channels; checkpoints of that code store ``g`` of shape (1,).
    """

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.scale = dim ** 0.5
        self.g = nn.Parameter(torch.ones(1, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) * self.scale * self.g


def make_norm(kind: str, dim: int, **factory) -> nn.Module:
    """The token norm of a transformer block: ``layernorm`` (DiT: no affine, eps 1e-6) or ``rmsnorm``.
    ``factory``: ``device``/``dtype``, which timm's layers pass to their ``norm_layer``."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6, **factory)
    if kind == "rmsnorm":
        return ScaledRMSNorm(dim, **factory)
    raise ValueError(f"unknown norm {kind!r}; choose 'layernorm' or 'rmsnorm'")
