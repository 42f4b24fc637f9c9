"""Small layers shared by the generator families."""

from zoo.nn.attention import Attention, Mlp
from zoo.nn.diffloss import DiffLoss, SimpleMLPAdaLN
from zoo.nn.embed import LabelEmbedder, PatchEmbed, TimestepEmbedder, modulate, timestep_embedding, unpatchify
from zoo.nn.norm import ScaledRMSNorm, make_norm
from zoo.nn.pos_embed import get_1d_sincos_pos_embed_from_grid, get_2d_sincos_pos_embed

__all__ = [
    "Attention",
    "DiffLoss",
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
]
