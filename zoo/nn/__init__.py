"""Small layers shared by the generator families.

The standard ones are timm's (``timm.layers``), as in the official DiT and MAR code: ``Attention``
(fused qkv on ``scaled_dot_product_attention`` when ``use_fused_attn()``), ``Mlp``, ``PatchEmbed``,
``DropPath``, and the vision transformer's ``Block`` (MAR). zoo adds what timm lacks: DiT's timestep
and label embedders and adaLN ``modulate``, the MeanFlow seed's ``ScaledRMSNorm``, sin-cos position
tables, ``unpatchify``, and MAR's per-token diffusion head.
"""

from timm.layers import Attention, DropPath, Mlp, PatchEmbed, use_fused_attn

from zoo.nn.diffloss import DiffLoss, SimpleMLPAdaLN
from zoo.nn.embed import LabelEmbedder, TimestepEmbedder, modulate, timestep_embedding, unpatchify
from zoo.nn.norm import ScaledRMSNorm, make_norm
from zoo.nn.pos_embed import get_1d_sincos_pos_embed_from_grid, get_2d_sincos_pos_embed

__all__ = [
    "Attention",
    "DiffLoss",
    "DropPath",
    "LabelEmbedder",
    "Mlp",
    "PatchEmbed",
    "ScaledRMSNorm",
    "SimpleMLPAdaLN",
    "TimestepEmbedder",
    "get_1d_sincos_pos_embed_from_grid",
    "get_2d_sincos_pos_embed",
    "make_norm",
    "modulate",
    "timestep_embedding",
    "unpatchify",
    "use_fused_attn",
]
