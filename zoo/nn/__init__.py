"""Small layers shared by the generator families."""

from zoo.nn.attention import Attention, Mlp
from zoo.nn.embed import LabelEmbedder, PatchEmbed, TimestepEmbedder, modulate, timestep_embedding
from zoo.nn.pos_embed import get_1d_sincos_pos_embed_from_grid, get_2d_sincos_pos_embed

__all__ = [
    "Attention",
    "LabelEmbedder",
    "Mlp",
    "PatchEmbed",
    "TimestepEmbedder",
    "get_1d_sincos_pos_embed_from_grid",
    "get_2d_sincos_pos_embed",
    "modulate",
    "timestep_embedding",
]
