"""MFDiT: the DiT of MeanFlow (Geng et al., 2025), predicting the average velocity u(z, t, r | y).

Built from DiT's own blocks and embedders, configured the way the seed implementation
(haidog-yaqub/MeanFlow ``models/dit.py``, the version whose forward is ``(x, t, r, y) -> u``) builds
them, so that its checkpoints load with ``strict=True`` and give the same outputs:

- RMS norms with one learned gain (``ScaledRMSNorm``) in the blocks, on queries/keys and before
  the output;
- two time embedders (t and r, each scaling its input in [0, 1] by 1000), summed with the label
  embedding into the condition;
- a trainable position table initialised to the sin-cos table;
- a label table named ``embedding`` that always holds the null class (CFG is folded into training
  by the objective, not by label dropout inside the network);
- a final layer that computes ``x · (1 + shift) + scale`` (the seed's argument order).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from zoo.fit import Fit, check_latent_fit
from zoo.generators.dit import (
    DIT_SIZES,
    DiTBlock,
    FinalLayer,
    PatchTransformerConfig,
    draw_noise,
    init_adaln_zero,
)
from zoo.nn import LabelEmbedder, PatchEmbed, TimestepEmbedder, unpatchify
from zoo.nn.checkpointing import call_block
from zoo.registry import create_objective, register_generator


@dataclasses.dataclass
class MFDiTConfig(PatchTransformerConfig):
    """Constructor fields of MFDiT (the seed's ``dim`` is ``hidden_size`` here, as in DiT)."""


class MFDiT(nn.Module):
    """Average-velocity transformer ``forward(x, t, r, y) -> u`` (t, r in [0, 1]) from an :class:`MFDiTConfig`."""

    OBJECTIVES = ("meanflow",)

    def __init__(self, config: MFDiTConfig, objective=None):
        super().__init__()
        self.config = config
        self.checkpoint_activations = False  # train.checkpoint_activations: recompute blocks in backward
        self.in_channels = self.out_channels = config.in_channels
        self.patch_size = config.patch_size
        self.num_heads = config.num_heads
        self.num_classes = config.num_classes
        dim = config.hidden_size

        self.x_embedder = PatchEmbed(config.input_size, config.patch_size, config.in_channels, dim)
        self.t_embedder = TimestepEmbedder(dim, time_scale=1000.0)
        self.r_embedder = TimestepEmbedder(dim, time_scale=1000.0)
        self.y_embedder = LabelEmbedder(config.num_classes, dim, dropout_prob=0.0, null_class=True,
                                        table_name="embedding")
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, dim), requires_grad=True)
        self.blocks = nn.ModuleList([
            DiTBlock(dim, config.num_heads, config.mlp_ratio, norm="rmsnorm", qk_norm=True)
            for _ in range(config.depth)
        ])
        self.final_layer = FinalLayer(dim, config.patch_size, self.out_channels, norm="rmsnorm",
                                      swap_shift_scale=True)
        self.initialize_weights()
        self.objective = objective if objective is not None else create_objective("meanflow")

    def initialize_weights(self) -> None:
        """The seed's initialisation: DiT's, plus a zeroed patch bias (the r embedder keeps xavier)."""
        init_adaln_zero(self, zero_patch_bias=True)

    def forward(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W), t and r (N,) in [0, 1] with r <= t, y (N,) labels (num_classes = null) -> u."""
        x_NTD = self.x_embedder(x) + self.pos_embed
        c_ND = self.t_embedder(t) + self.r_embedder(r) + self.y_embedder(y, train=False)
        for block in self.blocks:
            x_NTD = call_block(block, x_NTD, c_ND, checkpointing=self.checkpoint_activations)
        return unpatchify(self.final_layer(x_NTD, c_ND), self.out_channels, self.patch_size)

    # ----------------------------------------------------------------- zoo generator interface

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.config.input_size, self.config.input_size)

    @classmethod
    def check_fit(cls, config: MFDiTConfig, fit: Fit) -> None:
        check_latent_fit(config, fit, channels_key="in_channels", size_key="input_size")

    def null_labels(self, cond: torch.Tensor) -> torch.Tensor:
        return torch.full_like(cond, self.num_classes)

    def loss(self, latents: torch.Tensor, cond: torch.Tensor) -> dict[str, torch.Tensor]:
        """MeanFlow loss of a batch; the objective drops labels and folds guidance in."""
        return self.objective.loss(self, latents, dict(y=cond), uncond_kwargs=dict(y=self.null_labels(cond)))

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, *, steps: int | None = 1, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None, progress: bool = False) -> torch.Tensor:
        """Latents for labels ``cond`` in ``steps`` network evaluations (1: x = ε − u(ε, t=1, r=0))."""
        device = self.pos_embed.device
        noise = draw_noise(cond.shape[0], self.latent_shape, generator, device) if noise is None else noise.to(device)
        return self.objective.sample(self, noise, steps=steps, model_kwargs=dict(y=cond.to(device)),
                                     progress=progress, generator=generator)


for _size, (_depth, _width, _heads) in DIT_SIZES.items():
    register_generator(
        f"mfdit-{_size}/2",
        config=MFDiTConfig,
        defaults=dict(depth=_depth, hidden_size=_width, num_heads=_heads, patch_size=2),
        description=f"MeanFlow DiT-{_size.upper()}/2: depth {_depth}, width {_width}, {_heads} heads",
    )(MFDiT)
