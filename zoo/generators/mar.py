"""MAR: masked autoregressive generation of continuous tokens with a diffusion loss (Li et al., 2024).

The tokens of a ``kl-vae`` latent are put in a random order and partly masked; an MAE-style
encoder sees the class tokens (``buffer_size`` copies of the class embedding) and the visible
tokens only, a decoder fills the masked positions with a learned mask token, and its output
conditions a per-token diffusion head (:class:`zoo.nn.diffloss.DiffLoss`) trained only on masked
tokens through the shared Gaussian objective. Sampling unmasks tokens over a cosine schedule.

Constructor fields, parameter names (``class_emb``, ``fake_latent``, ``z_proj``, ``encoder_blocks``
with timm ``Block`` names, …, ``diffloss.net.*``), ``patchify``/``unpatchify``,
``forward_mae_encoder``/``forward_mae_decoder``, ``forward_loss`` and ``sample_tokens`` follow
LTH14/mar ``models/mar.py``, so released checkpoints load with ``strict=True``. Differences:

- all sampling randomness (orders, starting and per-step noise) comes from a ``generator``, and
  training draws orders and the mask ratio from torch's RNG (the release uses numpy/scipy), so a
  seed reproduces a run; the mask ratio has the same truncated-normal law;
- the head's diffusion is the recipe's ``objective`` (default: cosine schedule, learned sigma).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from functools import partial
from pathlib import Path

import torch
from einops import rearrange
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from zoo.config import ConfigError
from zoo.fit import Fit, FitError, check_classes, check_image_channels
from zoo.nn.diffloss import DiffLoss, default_head_objective
from zoo.registry import register_generator

CFG_SCHEDULES = ("linear", "constant")


@dataclasses.dataclass
class MARConfig:
    """Fields of the official ``MAR(...)`` constructor (``norm_layer`` becomes its epsilon)."""

    img_size: int = 256  # image side in pixels
    vae_stride: int = 16  # downsampling of the tokenizer
    patch_size: int = 1  # latent pixels per token side (tokens are vae_embed_dim·patch_size² wide)
    encoder_embed_dim: int = 1024  # MAE encoder (the visible tokens and the class buffer)
    encoder_depth: int = 16
    encoder_num_heads: int = 16
    decoder_embed_dim: int = 1024  # MAE decoder (every position: visible, masked, buffer)
    decoder_depth: int = 16
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0  # both: MLP hidden width / token width
    norm_eps: float = 1e-5  # the blocks' LayerNorm eps: MAR() default 1e-5; mar_base/large/huge use 1e-6
    vae_embed_dim: int = 16  # latent channels of the tokenizer
    mask_ratio_min: float = 0.7  # the training mask ratio is a truncated normal on [mask_ratio_min, 1]
    label_drop_prob: float = 0.1  # training labels replaced by the learned fake latent (CFG)
    class_num: int = 1000
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    buffer_size: int = 64  # class-embedding tokens prepended to the sequence
    diffloss_d: int = 3  # residual blocks of the diffusion head
    diffloss_w: int = 1024  # width of the diffusion head
    num_sampling_steps: str = "100"  # respacing of the head's diffusion when sampling
    diffusion_batch_mul: int = 4  # the head sees every token this many times per step (fresh t, noise)
    grad_checkpointing: bool = False

    def __post_init__(self):
        for name in ("img_size", "vae_stride", "patch_size", "encoder_embed_dim", "encoder_depth",
                     "encoder_num_heads", "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "vae_embed_dim",
                     "class_num", "buffer_size", "diffloss_d", "diffloss_w", "diffusion_batch_mul"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.img_size % (self.vae_stride * self.patch_size):
            raise ConfigError(f"img_size {self.img_size} is not divisible by vae_stride·patch_size "
                              f"({self.vae_stride}·{self.patch_size})")
        for dim, heads in (("encoder_embed_dim", "encoder_num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
            if getattr(self, dim) % getattr(self, heads):
                raise ConfigError(f"{dim} {getattr(self, dim)} is not divisible by {heads} {getattr(self, heads)}")
        if not 0.0 <= self.mask_ratio_min < 1.0:
            raise ConfigError(f"mask_ratio_min must be in [0, 1), got {self.mask_ratio_min}")
        for name in ("label_drop_prob", "attn_dropout", "proj_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.mlp_ratio <= 0 or self.norm_eps <= 0:
            raise ConfigError(f"mlp_ratio and norm_eps must be > 0, got {self.mlp_ratio} and {self.norm_eps}")
        self.num_sampling_steps = str(self.num_sampling_steps)
        from zoo.diffusion import space_timesteps

        try:
            space_timesteps(1000, self.num_sampling_steps)
        except ValueError as err:
            raise ConfigError(f"num_sampling_steps: {err}") from None

    @property
    def seq_side(self) -> int:
        return self.img_size // self.vae_stride // self.patch_size



def _on_generator_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    return generator.device if generator is not None else device


def truncated_normal_mask_ratio(mask_ratio_min: float, generator: torch.Generator | None = None) -> float:
    """One draw of MAR's mask ratio: N(1, 0.25²) truncated to [mask_ratio_min, 1] (inverse CDF)."""
    u = torch.rand((), generator=generator, dtype=torch.float64,
                   device=_on_generator_device(generator, torch.device("cpu")))
    lo = torch.special.ndtr(torch.tensor((mask_ratio_min - 1.0) / 0.25, dtype=torch.float64, device=u.device))
    ratio = 1.0 + 0.25 * torch.special.ndtri(lo + u * (0.5 - lo))
    return float(ratio.clamp(mask_ratio_min, 1.0))


def mask_by_order(mask_len: int, orders: torch.Tensor) -> torch.Tensor:
    """Bool mask (B, L) that is True at the first ``mask_len`` positions of each row's order."""
    mask = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)
    return mask.scatter(1, orders[:, :mask_len], True)


def cfg_at_step(cfg: float, schedule: str, mask_len: int, seq_len: int) -> float:
    """Guidance scale of a sampling step: ``linear`` grows with the tokens known after the step
    (1 + (cfg − 1)·(L − mask_len_next)/L, so the last step never reaches cfg), ``constant`` is cfg."""
    if schedule == "linear":
        return 1 + (cfg - 1) * (seq_len - mask_len) / seq_len
    if schedule == "constant":
        return cfg
    raise ValueError(f"cfg_schedule {schedule!r} is unknown; choose one of {list(CFG_SCHEDULES)}")


def next_mask_len(step: int, num_iter: int, seq_len: int, masked_now: int) -> int:
    """Tokens still masked after ``step``: floor(L·cos(π/2·(step+1)/num_iter)), at least 1 and at
    most ``masked_now − 1`` (every step unmasks one token or more)."""
    mask_len = math.floor(seq_len * math.cos(math.pi / 2.0 * (step + 1) / num_iter))
    return int(max(1, min(masked_now - 1, mask_len)))


#################################################################################
#                                   MAR                                         #
#################################################################################


class MAR(nn.Module):
    """Masked autoregressive transformer with a per-token diffusion head, from a :class:`MARConfig`.

    ``objective``: the shared Gaussian objective of the head (default cosine schedule, learned sigma,
    1000 steps); it holds tables, no weights.
    """

    OBJECTIVES = ("gaussian",)
    #: What a recipe without an ``objective`` section gets: the release's head objective.
    DEFAULT_OBJECTIVE = {"name": "gaussian", "noise_schedule": "cosine", "learn_sigma": True}
    TOKENIZER_KIND = "continuous"

    def __init__(self, config: MARConfig, objective=None):
        super().__init__()
        self.config = config
        self.vae_embed_dim = config.vae_embed_dim
        self.img_size, self.vae_stride, self.patch_size = config.img_size, config.vae_stride, config.patch_size
        self.seq_h = self.seq_w = config.seq_side
        self.seq_len = self.seq_h * self.seq_w
        self.token_embed_dim = config.vae_embed_dim * config.patch_size ** 2
        self.grad_checkpointing = config.grad_checkpointing
        self.num_classes = config.class_num
        self.label_drop_prob = config.label_drop_prob
        self.mask_ratio_min = config.mask_ratio_min
        self.buffer_size = config.buffer_size
        self.diffusion_batch_mul = config.diffusion_batch_mul
        enc, dec = config.encoder_embed_dim, config.decoder_embed_dim

        def blocks(dim: int, depth: int, heads: int) -> nn.ModuleList:  # timm's ViT block, as the release
            norm = partial(nn.LayerNorm, eps=config.norm_eps)
            return nn.ModuleList([Block(dim, heads, config.mlp_ratio, qkv_bias=True, norm_layer=norm,
                                        proj_drop=config.proj_dropout, attn_drop=config.attn_dropout)
                                  for _ in range(depth)])

        self.class_emb = nn.Embedding(config.class_num, enc)
        self.fake_latent = nn.Parameter(torch.zeros(1, enc))  # the "no class" embedding of CFG
        # encoder
        self.z_proj = nn.Linear(self.token_embed_dim, enc, bias=True)
        self.z_proj_ln = nn.LayerNorm(enc, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + self.buffer_size, enc))
        self.encoder_blocks = blocks(enc, config.encoder_depth, config.encoder_num_heads)
        self.encoder_norm = nn.LayerNorm(enc, eps=config.norm_eps)
        # decoder
        self.decoder_embed = nn.Linear(enc, dec, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len + self.buffer_size, dec))
        self.decoder_blocks = blocks(dec, config.decoder_depth, config.decoder_num_heads)
        self.decoder_norm = nn.LayerNorm(dec, eps=config.norm_eps)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, dec))
        self.initialize_weights()
        # The head is built after the initialisation above, which therefore leaves it as its own
        # initialize_weights made it (the release's order).
        self.diffloss = DiffLoss(target_channels=self.token_embed_dim, z_channels=dec, depth=config.diffloss_d,
                                 width=config.diffloss_w, num_sampling_steps=config.num_sampling_steps,
                                 grad_checkpointing=config.grad_checkpointing,
                                 objective=objective if objective is not None else default_head_objective())

    @property
    def objective(self):
        return self.diffloss.objective

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the tokenizer latents it models."""
        return (self.vae_embed_dim, self.seq_h * self.patch_size, self.seq_w * self.patch_size)

    def initialize_weights(self) -> None:
        """The release's initialisation: N(0, 0.02) tables and tokens, xavier linears, unit LayerNorms."""
        for table in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                      self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(table, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.constant_(module.weight, 1.0)
                nn.init.constant_(module.bias, 0)

    def no_weight_decay(self) -> set[str]:
        """What the release trains without weight decay (util/misc.add_weight_decay): biases, 1-D
        tensors and the whole diffusion head; tables, tokens and ``fake_latent`` do decay."""
        return {name for name, p in self.named_parameters()
                if p.ndim == 1 or name.endswith(".bias") or "diffloss" in name}

    # ----------------------------------------------------------------- tokens

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, H, W) -> tokens (B, H/p·W/p, C·p·p), row-major over the token grid."""
        p = self.patch_size
        return rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=p, q=p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, L, C·p·p) -> latents (B, C, seq_h·p, seq_w·p)."""
        p = self.patch_size
        return rearrange(x, "b (h w) (c p q) -> b c (h p) (w q)", h=self.seq_h, p=p, q=p)

    def sample_orders(self, bsz: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random permutation of the L token positions per row: (bsz, L) long."""
        device = self.fake_latent.device
        scores = torch.rand(bsz, self.seq_len, generator=generator, device=_on_generator_device(generator, device))
        return scores.argsort(dim=1).to(device)

    def random_masking(self, x: torch.Tensor, orders: torch.Tensor, generator: torch.Generator | None = None,
                       mask_ratio: float | None = None) -> torch.Tensor:
        """Float mask (B, L), 1 = masked, on the first ceil(L·ratio) positions of each row's order;
        one ratio per batch from the truncated normal (or ``mask_ratio``)."""
        B, L = x.shape[:2]
        if mask_ratio is None:
            mask_ratio = truncated_normal_mask_ratio(self.mask_ratio_min, generator)
        num_masked = min(L, int(math.ceil(L * mask_ratio)))
        return mask_by_order(num_masked, orders.to(x.device)).to(x.dtype)

    # ----------------------------------------------------------------- MAE encoder / decoder

    @property
    def checkpoint_activations(self) -> bool:
        """``train.checkpoint_activations``: the release's ``grad_checkpointing`` (encoder, decoder and
        the diffusion head's residual blocks recomputed in the backward pass)."""
        return self.grad_checkpointing

    @checkpoint_activations.setter
    def checkpoint_activations(self, value: bool) -> None:
        self.grad_checkpointing = bool(value)
        self.diffloss.net.grad_checkpointing = bool(value)

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    @staticmethod
    def _kept(mask_with_buffer_BL: torch.Tensor) -> torch.Tensor:
        keep = mask_with_buffer_BL == 0
        counts = keep.sum(dim=1)
        if (counts != counts[0]).any():
            raise ValueError(f"every row must mask the same number of tokens; visible counts per row are "
                             f"{counts.tolist()}")
        return keep

    def forward_mae_encoder(self, x: torch.Tensor, mask: torch.Tensor, class_embedding: torch.Tensor) -> torch.Tensor:
        """Tokens x (B, L, token_dim), mask (B, L) 1 = masked, class_embedding (B, enc_dim)
        -> (B, buffer_size + visible, enc_dim): only the class buffer and the visible tokens are encoded.

        In training mode each row's class embedding is replaced by ``fake_latent`` with probability
        ``label_drop_prob`` (drawn from torch's CPU RNG, as the release).
        """
        x_BLD = self.z_proj(x)
        B, _, D = x_BLD.shape
        if self.training:
            drop_B1 = (torch.rand(B) < self.label_drop_prob).unsqueeze(-1).to(device=x_BLD.device, dtype=x_BLD.dtype)
            class_embedding = drop_B1 * self.fake_latent + (1 - drop_B1) * class_embedding
        buffer_BbD = class_embedding.to(x_BLD.dtype).unsqueeze(1).expand(B, self.buffer_size, D)
        x_BLD = self.z_proj_ln(torch.cat([buffer_BbD, x_BLD], dim=1) + self.encoder_pos_embed_learned)
        mask_with_buffer = torch.cat([mask.new_zeros(B, self.buffer_size), mask], dim=1)
        x_BlD = x_BLD[self._kept(mask_with_buffer)].reshape(B, -1, D)  # drop the masked tokens
        return self.encoder_norm(self._run_blocks(self.encoder_blocks, x_BlD))

    def forward_mae_decoder(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder output (B, buffer_size + visible, enc_dim) and mask (B, L) -> conditions (B, L, dec_dim)
        for the diffusion head; masked positions start from ``mask_token``."""
        x_BlD = self.decoder_embed(x)
        B, _, D = x_BlD.shape
        mask_with_buffer = torch.cat([mask.new_zeros(B, self.buffer_size), mask], dim=1)
        x_BLD = self.mask_token.to(x_BlD.dtype).expand(B, mask_with_buffer.shape[1], D).clone()
        x_BLD[self._kept(mask_with_buffer)] = x_BlD.reshape(-1, D)
        x_BLD = self.decoder_norm(self._run_blocks(self.decoder_blocks, x_BLD + self.decoder_pos_embed_learned))
        return x_BLD[:, self.buffer_size:] + self.diffusion_pos_embed_learned

    def forward_loss(self, z: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Head loss on the masked tokens, every token repeated ``diffusion_batch_mul`` times."""
        B, L, _ = target.shape
        mul = self.diffusion_batch_mul
        target = target.reshape(B * L, -1).repeat(mul, 1)
        z = z.reshape(B * L, -1).repeat(mul, 1)
        mask = mask.reshape(B * L).repeat(mul)
        return self.diffloss(z=z, target=target, mask=mask)

    def forward(self, imgs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The release's training step: latents (B, C, H, W) (tokenizer output, scaled), labels (B,) -> loss.

        Draws, in order: the orders and the mask ratio (torch's global RNG), the label dropout, then
        the head's timesteps and noise.
        """
        class_embedding = self.class_emb(labels)
        x = self.patchify(imgs)
        gt_latents = x.clone().detach()
        orders = self.sample_orders(x.shape[0])
        mask = self.random_masking(x, orders)
        z = self.forward_mae_decoder(self.forward_mae_encoder(x, mask, class_embedding), mask)
        return self.forward_loss(z=z, target=gt_latents, mask=mask)

    # ----------------------------------------------------------------- zoo generator interface

    def loss(self, latents: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training loss of a batch: latents (B, vae_embed_dim, H, W) as the tokenizer emits them, labels (B,)."""
        expected = (self.vae_embed_dim, self.seq_h * self.patch_size, self.seq_w * self.patch_size)
        if tuple(latents.shape[1:]) != expected:
            raise ValueError(f"MAR expects latents (B, {', '.join(map(str, expected))}) from a tokenizer with "
                             f"{self.vae_embed_dim} channels and stride {self.vae_stride}; got {tuple(latents.shape)}")
        return {"loss": self.forward(latents, labels)}

    @torch.no_grad()
    def sample_tokens(self, bsz: int, num_iter: int = 64, cfg: float = 1.0, cfg_schedule: str = "linear",
                      labels: torch.Tensor | None = None, temperature: float = 1.0, progress: bool = False, *,
                      generator: torch.Generator | None = None,
                      num_sampling_steps: str | int | None = None, clip_denoised: bool = False,
                      sampler: str = "ddpm") -> torch.Tensor:
        """The release's sampler: latents (bsz, C, H, W) after ``num_iter`` unmasking steps.

        Each step encodes/decodes the current tokens (with a null-class half when ``cfg != 1``),
        keeps floor(L·cos(π/2·(step+1)/num_iter)) tokens masked (at least 1, at least one fewer than
        before; all unmasked at the last step) and draws the newly unmasked ones with the head at
        the step's guidance (:func:`cfg_at_step`). ``labels`` None: unconditional (``fake_latent``).
        Randomness: the orders, then per step the head's starting and per-step noise, all from
        ``generator`` (the global RNG when None).
        """
        if cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule {cfg_schedule!r} is unknown; choose one of {list(CFG_SCHEDULES)}")
        if num_iter < 1:
            raise ValueError(f"num_iter must be >= 1, got {num_iter}")
        device = self.fake_latent.device
        guided = cfg != 1.0
        mask_BL = torch.ones(bsz, self.seq_len, device=device)
        tokens_BLC = torch.zeros(bsz, self.seq_len, self.token_embed_dim, device=device)
        orders = self.sample_orders(bsz, generator)
        fake_BD = self.fake_latent.expand(bsz, -1)
        class_embedding = self.class_emb(labels.to(device)) if labels is not None else fake_BD
        if guided:
            class_embedding = torch.cat([class_embedding, fake_BD], dim=0)
        steps = range(num_iter)
        if progress:
            from zoo.progress import progress_bar

            steps = progress_bar(steps, desc="unmasking", unit="iter", leave=False)
        for step in steps:
            mask_len = next_mask_len(step, num_iter, self.seq_len, int(mask_BL[0].sum()))
            mask_next = mask_by_order(mask_len, orders)
            to_pred_BL = mask_BL.bool() if step >= num_iter - 1 else mask_BL.bool() ^ mask_next
            if not to_pred_BL.any():
                # More iterations than tokens (64 on a 16-token digit): this one unmasks nothing. The
                # release would call its head on no tokens and fail; skipping it draws nothing either.
                mask_BL = mask_next.float()
                continue
            tokens_in, mask_in = tokens_BLC, mask_BL
            if guided:
                tokens_in, mask_in = torch.cat([tokens_BLC, tokens_BLC]), torch.cat([mask_BL, mask_BL])
            z_BLD = self.forward_mae_decoder(self.forward_mae_encoder(tokens_in, mask_in, class_embedding), mask_in)
            mask_BL = mask_next.float()
            to_pred = torch.cat([to_pred_BL, to_pred_BL]) if guided else to_pred_BL
            cfg_iter = cfg_at_step(cfg, cfg_schedule, mask_len, self.seq_len)
            sampled = self.diffloss.sample(z_BLD[to_pred], temperature, cfg_iter, generator=generator,
                                           num_sampling_steps=num_sampling_steps, clip_denoised=clip_denoised,
                                           sampler=sampler)
            if guided:
                sampled = sampled[: len(sampled) // 2]  # the null-class half repeats the guided tokens
            tokens_BLC = tokens_BLC.clone()
            tokens_BLC[to_pred_BL] = sampled.to(tokens_BLC.dtype)
        return self.unpatchify(tokens_BLC)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, *, generator: torch.Generator | None = None, num_iter: int = 64,
               cfg_scale: float = 1.0, cfg_schedule: str = "linear", temperature: float = 1.0,
               num_sampling_steps: str | int | None = None, clip_denoised: bool = False,
               sampler: str = "ddpm", progress: bool = False) -> torch.Tensor:
        """Latents (B, vae_embed_dim, H, W) for class labels ``cond`` (B,), ready for ``tokenizer.decode``.

        ``num_iter`` unmasking steps, classifier-free guidance ``cfg_scale`` with the ``linear`` or
        ``constant`` schedule, ``temperature`` on the head's per-step noise, ``num_sampling_steps``
        (default the config's) for the head's respaced diffusion, ``clip_denoised`` (off, as the
        release; on for pixel tokens), ``sampler`` the head's sampler (``ddpm``, the release's, or
        ``ddim``, ``dpm++2m``, ``unipc``; the last two take ``num_sampling_steps`` as their step count).
        Deterministic for a seeded generator.
        """
        return self.sample_tokens(len(cond), num_iter=num_iter, cfg=cfg_scale, cfg_schedule=cfg_schedule,
                                  labels=cond, temperature=temperature, progress=progress, generator=generator,
                                  num_sampling_steps=num_sampling_steps, clip_denoised=clip_denoised, sampler=sampler)

    # ----------------------------------------------------------------- official checkpoints

    def load_official(self, source, *, ema: bool = True) -> MAR:
        """Load LTH14/mar weights strictly: a ``checkpoint-last.pth`` (``model_ema`` by default, ``model``
        with ``ema=False``; read with ``torch.load(weights_only=True)``), a ``.safetensors`` file (the
        Hub's ``mar-{base,large,huge}.safetensors``) or a state dict. Returns ``self``."""
        state = read_official_state_dict(source, ema=ema)
        where = source if isinstance(source, (str, Path)) else "state dict"
        mine = self.state_dict()
        missing, unexpected = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
        if missing or unexpected:
            raise ValueError(f"{where}: not a checkpoint of this MAR: missing {missing[:5]}"
                             f"{'…' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                             f"{'…' if len(unexpected) > 5 else ''}")
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(mine[name].shape):
                raise ValueError(f"{where}: {name} has shape {tuple(tensor.shape)}, this MAR's is "
                                 f"{tuple(mine[name].shape)} (check the size and the config fields)")
        self.load_state_dict(state, strict=True)
        return self

    # ----------------------------------------------------------------- recipes

    @classmethod
    def check_fit(cls, config: MARConfig, fit: Fit) -> None:
        """Refuse a tokenizer, data or objective that does not fit this MAR's config (:mod:`zoo.fit`)."""
        tok, data = fit.tokenizer, fit.data
        if tok["latent_channels"] != config.vae_embed_dim:
            raise FitError("model.vae_embed_dim", f"{config.vae_embed_dim} does not match the {tok['latent_channels']} "
                                                  f"latent channels of tokenizer {fit.tokenizer_name!r}; set "
                                                  f"model.vae_embed_dim={tok['latent_channels']}")
        if tok["downsample"] != config.vae_stride:
            raise FitError("model.vae_stride", f"{config.vae_stride} does not match the stride {tok['downsample']} of "
                                               f"tokenizer {fit.tokenizer_name!r}; set model.vae_stride="
                                               f"{tok['downsample']}")
        check_image_channels(fit)
        if data.get("image_size") is not None and data["image_size"] != config.img_size:
            raise FitError("model.img_size", f"{config.img_size}, but data.image_size is {data['image_size']}; set "
                                             f"model.img_size={data['image_size']}")
        check_classes(config, fit, "class_num")
        if getattr(fit.objective_config, "noise_schedule", "cosine") != "cosine":
            raise FitError("objective.noise_schedule", f"{fit.objective_config.noise_schedule!r}; MAR's diffusion head "
                                                       f"is trained with the cosine schedule: set "
                                                       f"objective.noise_schedule: cosine (and objective.learn_sigma: "
                                                       f"true for the release's head)")

def read_official_state_dict(source, *, ema: bool = True) -> dict[str, torch.Tensor]:
    """MAR weights under the official names from a ``.pth``/``.safetensors`` path or a loaded dict.

    A dict with ``model``/``model_ema`` entries is a training checkpoint: ``model_ema`` (what the
    release evaluates) unless ``ema=False``. DDP's ``module.`` prefix is dropped.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such MAR checkpoint")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # Training saves also hold ``args`` (an argparse.Namespace): allow that one class only.
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
    else:
        state = source
    if not isinstance(state, dict):
        raise ValueError(f"expected a dict of weights, got {type(state).__name__}")
    key = "model_ema" if ema else "model"
    if "model" in state or "model_ema" in state:
        if not isinstance(state.get(key), dict):
            raise ValueError(f"the checkpoint has no {key!r} weights (it has {sorted(state)})")
        state = state[key]
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


#################################################################################
#                                  MAR Configs                                  #
#################################################################################

# The released models (README): encoder = decoder sizes of mar_base/large/huge, LayerNorm eps 1e-6,
# and the DiffLoss MLP their checkpoints were trained with.
MAR_SIZES = {
    "b": dict(embed=768, depth=12, heads=12, diffloss_d=6, diffloss_w=1024),
    "l": dict(embed=1024, depth=16, heads=16, diffloss_d=8, diffloss_w=1280),
    "h": dict(embed=1280, depth=20, heads=16, diffloss_d=12, diffloss_w=1536),
    # zoo's CPU-sized variants of the same shape
    "t": dict(embed=128, depth=2, heads=4, diffloss_d=2, diffloss_w=128),
    "s": dict(embed=256, depth=4, heads=4, diffloss_d=3, diffloss_w=256),
}

for _size, _s in MAR_SIZES.items():
    register_generator(
        f"mar-{_size}", config=MARConfig,
        defaults=dict(encoder_embed_dim=_s["embed"], encoder_depth=_s["depth"], encoder_num_heads=_s["heads"],
                      decoder_embed_dim=_s["embed"], decoder_depth=_s["depth"], decoder_num_heads=_s["heads"],
                      norm_eps=1e-6, diffloss_d=_s["diffloss_d"], diffloss_w=_s["diffloss_w"]),
        description=(f"MAR-{_size.upper()}: width {_s['embed']}, {_s['depth']}+{_s['depth']} blocks, "
                     f"DiffLoss {_s['diffloss_d']}x{_s['diffloss_w']}"),
    )(MAR)
