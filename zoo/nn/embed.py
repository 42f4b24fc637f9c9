"""Embedders for diffusion timesteps and class labels, adaLN modulation, and unpatchify.

Parameter names (``mlp.0``, ``mlp.2``, ``embedding_table``) follow facebookresearch/DiT so that
official checkpoints load with ``strict=True``; patches are embedded by timm's ``PatchEmbed``, as
there.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn


def modulate(x_NTD: torch.Tensor, shift_ND: torch.Tensor, scale_ND: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x * (1 + scale) + shift`` with per-sample shift/scale broadcast over tokens."""
    # addcmul writes the result in one pass instead of materialising x * (1 + scale) first.
    return torch.addcmul(shift_ND.unsqueeze(1), x_NTD, 1 + scale_ND.unsqueeze(1))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t·f), sin(t·f)]`` of (possibly fractional) timesteps ``t`` (N,) -> (N, dim).

    Frequencies are ``exp(-log(max_period) · i / half)`` for ``i < half`` (GLIDE/DiT convention;
    diffusers divides by ``half - 1`` instead, which changes outputs).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> (N, hidden_size) through a sinusoidal table and a two-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, time_scale: float = 1.0):
        super().__init__()
        self.time_scale = time_scale  # MeanFlow feeds t in [0, 1] and scales it by 1000 here
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t * self.time_scale if self.time_scale != 1.0 else t,
                                    self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> (N, hidden_size), with label dropout for classifier-free guidance.

    With ``dropout_prob > 0`` (or ``null_class=True``) the table has one extra row, the null class at
    index ``num_classes``; in training each label is replaced by it with probability ``dropout_prob``.
    ``table_name`` names the table parameter: ``embedding_table`` in DiT, ``embedding`` in MeanFlow.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float, *,
                 null_class: bool | None = None, table_name: str = "embedding_table"):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0 if null_class is None else null_class)
        self.table_name = table_name
        setattr(self, table_name, nn.Embedding(num_classes + use_cfg_embedding, hidden_size))
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    @property
    def table(self) -> nn.Embedding:
        return getattr(self, self.table_name)

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.table(labels)


def unpatchify(x_NTP: torch.Tensor, channels: int, patch_size: int) -> torch.Tensor:
    """(N, T, p·p·C) tokens of a square grid -> (N, C, H, W) images, inverse of timm's ``PatchEmbed``
    token order (row-major patches, each patch's pixels row-major with channels last)."""
    tokens = x_NTP.shape[1]
    side = int(round(tokens ** 0.5))
    if side * side != tokens:
        raise ValueError(f"unpatchify needs a square token grid, got {tokens} tokens")
    return rearrange(x_NTP, "n (h w) (p q c) -> n c (h p) (w q)", h=side, p=patch_size, q=patch_size, c=channels)
