"""DiT: a diffusion transformer with adaLN-Zero conditioning (Peebles & Xie, 2023).

Parameter names, initialisation, ``forward(x, t, y)`` and ``forward_with_cfg`` follow
facebookresearch/DiT ``models.py``, so its released checkpoints load with ``strict=True``.
The zoo interface on top — ``loss`` and ``sample`` — routes all noise maths through the
objective (the shared Gaussian diffusion by default).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
from torch import nn

from zoo.config import ConfigError
from zoo.fit import Fit, FitError, check_latent_fit
from zoo.nn import (
    Attention,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
    make_norm,
    modulate,
    unpatchify,
)
from zoo.nn.checkpointing import call_block
from zoo.registry import create_objective, register_generator


@dataclasses.dataclass
class PatchTransformerConfig:
    """Fields shared by DiT-like generators (names as in the official ``DiT(...)``)."""

    input_size: int = 32  # latent (or pixel) side length
    patch_size: int = 2  # each token is a patch_size x patch_size patch: (input_size / patch_size)² tokens
    in_channels: int = 4  # the tokenizer's latent channels (SD-VAE: 4)
    hidden_size: int = 1152  # token width (DiT-XL)
    depth: int = 28  # transformer blocks
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # the null class is index num_classes

    CHOICES = {"patch_size": (1, 2, 4, 8, 16)}

    def __post_init__(self):
        if self.input_size % self.patch_size:
            raise ConfigError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ConfigError(f"hidden_size {self.hidden_size} must be divisible by 4 (2-D sin-cos table)")
        for name in ("input_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass
class DiTConfig(PatchTransformerConfig):
    """Constructor fields of DiT: the shared ones plus label dropout, learned sigma and CFG channels."""

    class_dropout_prob: float = 0.1  # CFG label dropout; > 0 adds the null class row
    learn_sigma: bool = True  # predict the variance interpolation too (2x output channels)
    # Which output channels classifier-free guidance mixes. "official" guides the first three, as
    # the released DiT code does for exact FID reproduction; "all" guides every predicted-noise
    # channel (the standard method, and the right one when in_channels != 4).
    cfg_channels: str = "official"

    CHOICES = {**PatchTransformerConfig.CHOICES, "cfg_channels": ("official", "all")}

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ConfigError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")


#################################################################################
#                                 Core DiT Model                                #
#################################################################################


class DiTBlock(nn.Module):
    """Transformer block whose norms are modulated by the condition (adaLN-Zero, gated residuals).

    ``norm="layernorm"`` is DiT's block; MeanFlow's uses ``norm="rmsnorm"`` and ``qk_norm=True``.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, *, norm: str = "layernorm",
                 qk_norm: bool = False):
        super().__init__()
        self.norm1 = make_norm(norm, hidden_size)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm,
                              norm_layer=partial(make_norm, norm) if qk_norm else None)
        self.norm2 = make_norm(norm, hidden_size)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x_NTD: torch.Tensor, c_ND: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c_ND).chunk(6, dim=1)
        x_NTD = x_NTD + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x_NTD), shift_msa, scale_msa))
        x_NTD = x_NTD + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x_NTD), shift_mlp, scale_mlp))
        return x_NTD


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear map from tokens to patch pixels.

    ``swap_shift_scale`` reproduces the MeanFlow seed, whose final layer computes
    ``x · (1 + shift) + scale``; its checkpoints need that order.
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, *, norm: str = "layernorm",
                 swap_shift_scale: bool = False):
        super().__init__()
        self.swap_shift_scale = swap_shift_scale
        self.norm_final = make_norm(norm, hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x_NTD: torch.Tensor, c_ND: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c_ND).chunk(2, dim=1)
        if self.swap_shift_scale:
            shift, scale = scale, shift
        return self.linear(modulate(self.norm_final(x_NTD), shift, scale))  # (N, T, p*p*C_out)


def init_adaln_zero(model: nn.Module, *, zero_patch_bias: bool = False) -> None:
    """DiT's initialisation of a model with DiT's attribute layout (shared by MFDiT).

    Xavier-uniform linears with zero biases, the patch projection initialised like a linear layer,
    the sin-cos position table, N(0, 0.02) label and timestep-MLP weights, and zeroed adaLN and
    output layers so every block starts as the identity. The patch bias keeps PyTorch's default
    unless ``zero_patch_bias`` (the MeanFlow seed zeroes it).
    """

    def _basic_init(module):
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0)

    model.apply(_basic_init)
    grid = int(model.x_embedder.num_patches ** 0.5)
    pos_embed = get_2d_sincos_pos_embed(model.pos_embed.shape[-1], grid)
    model.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
    w = model.x_embedder.proj.weight.data
    nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
    if zero_patch_bias:
        nn.init.constant_(model.x_embedder.proj.bias, 0)
    nn.init.normal_(model.y_embedder.table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for block in model.blocks:
        nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
    nn.init.constant_(model.final_layer.adaLN_modulation[-1].weight, 0)
    nn.init.constant_(model.final_layer.adaLN_modulation[-1].bias, 0)
    nn.init.constant_(model.final_layer.linear.weight, 0)
    nn.init.constant_(model.final_layer.linear.bias, 0)


def draw_noise(n: int, shape: tuple[int, ...], generator: torch.Generator | None, device) -> torch.Tensor:
    """Standard normal (n, *shape) drawn on the generator's device (CPU generators stay reproducible
    whatever device the model is on), then moved to ``device``."""
    where = generator.device if generator is not None else device
    return torch.randn((n, *shape), generator=generator, device=where).to(device)


class DiT(nn.Module):
    """Diffusion model with a transformer backbone, built from a :class:`DiTConfig`.

    ``objective`` is the noise process used by :meth:`loss` and :meth:`sample`; by default the
    Gaussian diffusion of the DiT paper (linear schedule, 1000 steps, learned sigma as configured).
    It is not a submodule: it holds tables, no weights.
    """

    OBJECTIVES = ("gaussian", "flow")

    def __init__(self, config: DiTConfig, objective=None):
        super().__init__()
        self.config = config
        self.checkpoint_activations = False  # train.checkpoint_activations: recompute blocks in backward
        self.learn_sigma = config.learn_sigma
        self.in_channels = config.in_channels
        self.out_channels = config.in_channels * 2 if config.learn_sigma else config.in_channels
        self.patch_size = config.patch_size
        self.num_heads = config.num_heads
        self.num_classes = config.num_classes

        self.x_embedder = PatchEmbed(config.input_size, config.patch_size, config.in_channels, config.hidden_size,
                                     bias=True)
        self.t_embedder = TimestepEmbedder(config.hidden_size)
        self.y_embedder = LabelEmbedder(config.num_classes, config.hidden_size, config.class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos table, stored as a frozen parameter like the official checkpoints do.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, config.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(config.hidden_size, config.num_heads, config.mlp_ratio) for _ in range(config.depth)]
        )
        self.final_layer = FinalLayer(config.hidden_size, config.patch_size, self.out_channels)
        self.initialize_weights()
        self.objective = objective if objective is not None else create_objective(
            "gaussian", learn_sigma=config.learn_sigma)

    def initialize_weights(self) -> None:
        """The official initialisation: xavier linears, zeroed adaLN and output layers (adaLN-Zero)."""
        init_adaln_zero(self)

    def unpatchify(self, x_NTP: torch.Tensor) -> torch.Tensor:
        """(N, T, p·p·C) -> (N, C, H, W)."""
        return unpatchify(x_NTP, self.out_channels, self.patch_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W) noisy input, t (N,) timesteps, y (N,) labels -> (N, out_channels, H, W).

        In training mode labels are dropped to the null class with ``class_dropout_prob``.
        """
        x_NTD = self.x_embedder(x) + self.pos_embed
        c_ND = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            x_NTD = call_block(block, x_NTD, c_ND, checkpointing=self.checkpoint_activations)
        return self.unpatchify(self.final_layer(x_NTD, c_ND))

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Guided prediction for a batch whose second half holds the null labels.

        The first half of ``x`` is run twice (with the labels of both halves) and the guided noise
        ``uncond + cfg_scale · (cond − uncond)`` is returned for both halves; the rest of the
        channels (the variance prediction) passes through unguided.
        """
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)
        guided = 3 if self.config.cfg_channels == "official" else self.in_channels
        eps, rest = model_out[:, :guided], model_out[:, guided:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)

    # ----------------------------------------------------------------- zoo generator interface

    @classmethod
    def check_fit(cls, config: DiTConfig, fit: Fit) -> None:
        """Refuse a tokenizer, data or objective that does not fit this DiT's config (:mod:`zoo.fit`)."""
        check_latent_fit(config, fit, channels_key="in_channels", size_key="input_size")
        if fit.objective_predicts_variance is False and config.learn_sigma:
            raise FitError("model.learn_sigma", f"the {fit.objective_name!r} objective predicts no variance; set "
                                                f"model.learn_sigma=false")
        objective_sigma = getattr(fit.objective_config, "learn_sigma", None)
        if objective_sigma is not None and objective_sigma != config.learn_sigma:
            raise FitError("objective.learn_sigma", f"{objective_sigma} disagrees with model.learn_sigma="
                                                    f"{config.learn_sigma}; set both the same")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.config.input_size, self.config.input_size)

    def loss(self, latents: torch.Tensor, cond: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training loss of a batch: latents (N, C, H, W) scaled as the tokenizer emits them, labels (N,)."""
        return self.objective.loss(self, latents, dict(y=cond))

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, *, sampler: str = "ddpm", steps: int | None = 250,
               cfg_scale: float = 1.0, eta: float = 0.0, clip_denoised: bool = False,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
               progress: bool = False) -> torch.Tensor:
        """Draw latents for labels ``cond`` (N,) with the objective's sampler; returns (N, C, H, W).

        ``cfg_scale > 1`` runs the official batched classifier-free guidance (conditional and
        null-label halves share the starting noise).
        """
        n = cond.shape[0]
        device = self.pos_embed.device
        noise = draw_noise(n, self.latent_shape, generator, device) if noise is None else noise.to(device)
        cond = cond.to(device)
        if cfg_scale != 1.0:
            if self.config.class_dropout_prob <= 0:
                raise ValueError("cfg_scale != 1 needs a model trained with class_dropout_prob > 0 (no null class)")
            noise = torch.cat([noise, noise], dim=0)
            y_null = torch.full_like(cond, self.num_classes)
            model_fn = self.forward_with_cfg
            model_kwargs = dict(y=torch.cat([cond, y_null]), cfg_scale=cfg_scale)
        else:
            model_fn = self.forward
            model_kwargs = dict(y=cond)
        out = self.objective.sample(model_fn, noise, sampler=sampler, steps=steps, model_kwargs=model_kwargs,
                                    clip_denoised=clip_denoised, eta=eta, progress=progress, generator=generator)
        return out[:n]


#################################################################################
#                                   DiT Configs                                 #
#################################################################################

# name: (depth, hidden_size, num_heads) — the paper's Table 1.
DIT_SIZES = {"s": (12, 384, 6), "b": (12, 768, 12), "l": (24, 1024, 16), "xl": (28, 1152, 16)}

for _size, (_depth, _width, _heads) in DIT_SIZES.items():
    for _patch in (2, 4, 8):
        register_generator(
            f"dit-{_size}/{_patch}",
            config=DiTConfig,
            defaults=dict(depth=_depth, hidden_size=_width, num_heads=_heads, patch_size=_patch),
            description=f"DiT-{_size.upper()}/{_patch}: depth {_depth}, width {_width}, {_heads} heads",
        )(DiT)
