"""The convolutional encoder/decoder of Latent Diffusion's autoencoders (CompVis/latent-diffusion
``ldm/modules/diffusionmodules/model.py``), shared by VAR's VQ-VAE (``msvq``) and the KL autoencoder
(``kl-vae``: Stable Diffusion's VAE, MAR's KL-16).

Module names are the checkpoints' keys: ``conv_in``, ``down.{level}.block.{i}`` /
``down.{level}.attn.{i}`` / ``down.{level}.downsample``, ``mid.block_1`` / ``mid.attn_1`` /
``mid.block_2``, ``up.{level}...``, ``norm_out``, ``conv_out``. Level 0 is the full resolution;
level ``len(ch_mult) - 1`` the coarsest, in the encoder and the decoder alike.

The two families differ only in their attention block: LDM (and MAR, and the SD-VAE) use
separate ``q``/``k``/``v`` 1x1 convolutions (:class:`AttnBlock`), VAR fuses them into one ``qkv``
convolution (:class:`FusedQKVAttnBlock`). Each keeps its own so both checkpoints load strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 32  # every GroupNorm of the LDM encoder/decoder uses 32 groups


def check_widths(ch: int, ch_mult, hint: str = "") -> None:
    """ConfigError unless every level width ``ch * m`` is a positive multiple of GROUPS (GroupNorm)."""
    from zoo.config import ConfigError

    if not ch_mult:
        raise ConfigError("ch_mult must list at least one multiplier")
    bad = [ch * m for m in ch_mult if (ch * m) % GROUPS or ch * m <= 0]
    if bad:
        raise ConfigError(f"ch={ch} with ch_mult={tuple(ch_mult)} gives channel widths {bad} that "
                          f"GroupNorm({GROUPS}) cannot split; ch * each multiplier must be a positive "
                          f"multiple of {GROUPS}{hint}")


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=GROUPS, num_channels=channels, eps=1e-6, affine=True)


class Upsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Downsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x):
        # Pad right/bottom only: the LDM convention the released weights were trained with.
        return self.conv(F.pad(x, pad=(0, 1, 0, 1), mode="constant", value=0))


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        # No parameters (and so no checkpoint key) when the width does not change.
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels
                             else nn.Identity())

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class FusedQKVAttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, with a fused qkv 1x1 conv (VAR's names)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x_BChw):
        B, C, H, W = x_BChw.shape
        q, k, v = self.qkv(self.norm(x_BChw)).reshape(B, 3, C, H * W).unbind(1)  # each (B, C, hw)
        w_BLL = torch.softmax(torch.bmm(q.transpose(1, 2), k) * C ** -0.5, dim=2)  # (B, hw_q, hw_k)
        h_BCL = torch.bmm(v, w_BLL.transpose(1, 2))  # (B, C, hw_q)
        return x_BChw + self.proj_out(h_BCL.reshape(B, C, H, W))


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions with separate q, k, v 1x1 convs (LDM's,
    MAR's and, renamed, diffusers' ``Attention``). Runs on ``scaled_dot_product_attention``, so the
    (hw x hw) weights need not be materialised: the SD-VAE attends over 4096 positions at 512 px."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x_BChw):
        B, C, H, W = x_BChw.shape
        h = self.norm(x_BChw)
        q_B1LC, k_B1LC, v_B1LC = (conv(h).reshape(B, 1, C, H * W).transpose(2, 3) for conv in (self.q, self.k, self.v))
        h_B1LC = F.scaled_dot_product_attention(q_B1LC, k_B1LC, v_B1LC)  # scale C^-0.5, as the original
        return x_BChw + self.proj_out(h_B1LC.transpose(2, 3).reshape(B, C, H, W))


class Level(nn.Module):
    """One resolution level: ``num_blocks`` res blocks (the first from ``block_in`` to ``block_out``
    channels), each followed by an ``attn_block`` unless it is None. The encoder adds ``downsample``,
    the decoder ``upsample``; ``forward`` runs the blocks only."""

    def __init__(self, block_in: int, block_out: int, num_blocks: int, dropout: float,
                 attn_block: type[nn.Module] | None):
        super().__init__()
        self.block, self.attn = nn.ModuleList(), nn.ModuleList()
        for i in range(num_blocks):
            self.block.append(ResnetBlock(block_in if i == 0 else block_out, block_out, dropout))
            if attn_block is not None:
                self.attn.append(attn_block(block_out))

    def forward(self, h):
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        return h


class MidBlock(nn.Module):
    """The middle of the encoder and the decoder: res block, attention (``attn_block=None``: none), res block."""

    def __init__(self, channels: int, dropout: float, attn_block: type[nn.Module] | None):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = attn_block(channels) if attn_block is not None else None
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h):
        h = self.block_1(h)
        if self.attn_1 is not None:
            h = self.attn_1(h)
        return self.block_2(h)


def _levels(levels, num_levels: int) -> frozenset[int]:
    levels = frozenset(int(level) for level in levels)
    bad = sorted(level for level in levels if not 0 <= level < num_levels)
    if bad:
        raise ValueError(f"attention levels {bad} do not exist; levels run from 0 (full resolution) to "
                         f"{num_levels - 1}")
    return levels


class Encoder(nn.Module):
    """Images (B, in_channels, H, W) -> features (B, out_channels, H/2^(L-1), W/2^(L-1)), L = len(ch_mult).

    ``attn_levels``: the levels whose every res block is followed by ``attn_block`` (VAR: the
    coarsest; MAR's KL-16: the coarsest, 16 px of 256; SD-VAE: none). ``mid_attn=False`` leaves the
    middle attention out (some diffusers VAEs). A KL autoencoder's encoder has ``out_channels`` =
    2 * z_channels (mean and log-variance)."""

    def __init__(self, *, ch: int, ch_mult, num_res_blocks: int, in_channels: int, out_channels: int,
                 dropout: float, attn_levels, attn_block: type[nn.Module], mid_attn: bool = True):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        attn_levels = _levels(attn_levels, self.num_resolutions)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            down = Level(block_in, ch * ch_mult[i_level], num_res_blocks, dropout,
                         attn_block if i_level in attn_levels else None)
            block_in = ch * ch_mult[i_level]
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample2x(block_in)
            self.down.append(down)
        self.mid = MidBlock(block_in, dropout, attn_block if mid_attn else None)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        # Channels-last activations: oneDNN/cuDNN convolutions run 12-14 % faster on them (measured
        # on a 2-core CPU, VAR's ch=160 model at 256 px); same maths, fp32 rounding differences only.
        h = self.conv_in(x.contiguous(memory_format=torch.channels_last))
        for i_level, down in enumerate(self.down):
            h = down(h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h)))).contiguous()


class Decoder(nn.Module):
    """Features (B, z_channels, h, w) -> images (B, out_channels, h*2^(L-1), w*2^(L-1)), unclamped.
    ``up`` is indexed by resolution level (0 = finest), as in the checkpoints, though run coarse first;
    each level has ``num_res_blocks + 1`` res blocks. ``attn_levels``, ``attn_block``, ``mid_attn``:
    as in :class:`Encoder`."""

    def __init__(self, *, ch: int, ch_mult, num_res_blocks: int, z_channels: int, out_channels: int,
                 dropout: float, attn_levels, attn_block: type[nn.Module], mid_attn: bool = True):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        attn_levels = _levels(attn_levels, self.num_resolutions)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = MidBlock(block_in, dropout, attn_block if mid_attn else None)
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            up = Level(block_in, ch * ch_mult[i_level], num_res_blocks + 1, dropout,
                       attn_block if i_level in attn_levels else None)
            block_in = ch * ch_mult[i_level]
            if i_level != 0:
                up.upsample = Upsample2x(block_in)
            self.up.insert(0, up)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z.contiguous(memory_format=torch.channels_last)))  # see Encoder.forward
        for i_level in reversed(range(self.num_resolutions)):
            h = self.up[i_level](h)
            if i_level != 0:
                h = self.up[i_level].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h))).contiguous()
