"""Multi-head self-attention on ``scaled_dot_product_attention`` and the transformer MLP.

Parameter names (``qkv``, ``proj``, ``fc1``, ``fc2``) equal timm's ``Attention``/``Mlp`` so that
checkpoints written against timm load unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Self-attention over (B, L, C) tokens with a fused qkv projection.

    ``attn_mask`` (broadcastable to (B, heads, L, L); bool = keep, float = added bias) is passed
    to ``scaled_dot_product_attention``, which picks the fastest kernel the device offers.
    ``attn_drop`` (on the attention weights, in training) and ``proj_drop`` (after the output
    projection) are timm's dropouts (MAR uses them).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, proj_bias: bool = True,
                 qk_norm: Callable[[int], nn.Module] | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        # Per-head query/key normalisation (timm's ``qk_norm``; names ``q_norm``/``k_norm``).
        self.q_norm = qk_norm(self.head_dim) if qk_norm is not None else nn.Identity()
        self.k_norm = qk_norm(self.head_dim) if qk_norm is not None else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def forward(self, x_BLC: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, C = x_BLC.shape
        qkv = self.qkv(x_BLC).view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q_BHLc, k_BHLc, v_BHLc = qkv.unbind(0)
        q_BHLc, k_BHLc = self.q_norm(q_BHLc), self.k_norm(k_BHLc)
        out_BHLc = F.scaled_dot_product_attention(q_BHLc, k_BHLc, v_BHLc, attn_mask=attn_mask,
                                                  dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out_BHLc.transpose(1, 2).reshape(B, L, C)))


class Mlp(nn.Module):
    """Two linear layers with an activation between them (GELU-tanh in DiT)."""

    def __init__(self, in_features: int, hidden_features: int, act_layer=nn.GELU, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
