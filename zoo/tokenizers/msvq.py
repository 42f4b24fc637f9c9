"""VAR's multi-scale residual VQ tokenizer (FoundationVision/VAR ``models/vqvae.py``, ``quant.py``,
``basic_vae.py``), rewritten with the official parameter and buffer names so the released
``vae_ch160v4096z32.pth`` loads with ``strict=True``.

An image becomes a feature map ``f`` (B, Cvae, h, w) through the LDM encoder and ``quant_conv``.
The quantiser then takes K scales from small to large: at scale k it area-downsamples the
remaining residual to (pn_k, pn_k), picks the nearest codebook entry per cell, bicubic-upsamples
the picked embeddings back to (h, w), passes them through a Φ conv and subtracts them from the
residual. ``f_hat`` is the sum of the K upsampled, Φ-refined maps; the decoder draws it.

The generator-facing latent (:meth:`MSVQTokenizer.encode`) is that ``f_hat`` with scale 1; VAR
itself works on the index pyramids (:meth:`img_to_idxBl`, :meth:`idxBl_to_img`,
``quantize.idxBl_to_var_input``) and gets them from :meth:`MSVQTokenizer.training_inputs`.

Training (:meth:`MSVQTokenizer.loss`; the official repository ships none) is the official
quantiser's training forward -- straight-through ``f_hat``, codebook + ``beta`` * commitment loss
averaged over scales -- plus a pixel reconstruction loss, with two optional codebook aids: EMA
codebook updates and dead-code restarts. The perceptual (LPIPS) and GAN terms of the paper are not
built. The default config keeps exactly the official state_dict keys.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from zoo.config import ConfigError
from zoo.registry import register_tokenizer
from zoo.tokenizers.base import Tokenizer
from zoo.tokenizers.ldm import Decoder, Encoder, FusedQKVAttnBlock, check_widths

EMA_EPS = 1e-5  # Laplace smoothing of the EMA codebook's cluster sizes


@dataclasses.dataclass
class MSVQConfig:
    """Fields of the official ``VQVAE`` constructor, plus ``ch_mult`` and ``image_channels`` that
    the official code hard-codes ((1, 1, 2, 2, 4) and 3). The released model uses ch=160."""

    vocab_size: int = 4096
    z_channels: int = 32  # Cvae, the width of codebook entries and of f_hat
    ch: int = 128
    dropout: float = 0.0
    beta: float = 0.25  # commitment loss weight (training only)
    using_znorm: bool = False  # nearest neighbour by cosine instead of Euclidean distance
    quant_conv_ks: int = 3
    quant_resi: float = 0.5  # Φ(h) = (1 - r) h + r conv(h); |r| < 1e-6 makes Φ the identity
    share_quant_resi: int = 4  # 0: one Φ per scale, 1: one Φ for all, n: n Φs shared by nearby scales
    default_qresi_counts: int = 0  # with share_quant_resi=0: number of Φs (0: one per scale)
    v_patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    test_mode: bool = True  # eval() and freeze every parameter, as the official inference code does
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    image_channels: int = 3
    # Training (not in the official constructor). The paper's loss (its eq. 5) is an L2 image term
    # plus the VQ term; LPIPS and GAN terms are not built.
    recon_loss: str = "l2"
    recon_weight: float = 1.0
    codebook_weight: float = 1.0  # weight of the quantiser's codebook + beta * commitment loss
    ema_codebook: bool = False  # codebook moved by EMA of its assigned features instead of by gradient
    ema_decay: float = 0.99  # decay of the EMA codebook statistics and of the code usage counts
    restart_dead_codes: bool = False
    dead_code_threshold: float = 1.0  # a code is dead when its EMA hit count per step falls below this

    CHOICES = {"image_channels": (1, 3, 4), "quant_conv_ks": (1, 3, 5, 7), "recon_loss": ("l1", "l2")}

    def __post_init__(self):
        check_widths(self.ch, self.ch_mult, hint=" (the release uses ch=160)")
        if self.vocab_size < 1 or self.z_channels < 1:
            raise ConfigError(f"vocab_size and z_channels must be positive, got {self.vocab_size} and "
                              f"{self.z_channels}")
        pns = tuple(self.v_patch_nums)
        if len(pns) < 2 or pns[0] < 1 or any(a >= b for a, b in zip(pns, pns[1:])):
            raise ConfigError(f"v_patch_nums must list at least two strictly increasing positive sides, "
                              f"got {pns}")
        if self.share_quant_resi < 0 or self.default_qresi_counts < 0:
            raise ConfigError("share_quant_resi and default_qresi_counts must be >= 0")
        if self.recon_loss not in self.CHOICES["recon_loss"]:
            raise ConfigError(f"recon_loss: {self.recon_loss!r} is not allowed; choose one of "
                              f"{list(self.CHOICES['recon_loss'])}")
        for name in ("beta", "recon_weight", "codebook_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay: must lie strictly between 0 and 1 (e.g. 0.99), got {self.ema_decay}")
        if self.restart_dead_codes and not self.dead_code_threshold > 0:
            raise ConfigError(f"dead_code_threshold: must be > 0 with restart_dead_codes (codes hit fewer times "
                              f"per step, on average, are restarted), got {self.dead_code_threshold}")


# ------------------------------------------------------------------------------------------------
# Φ: the residual refiners applied to each scale's upsampled embeddings
# ------------------------------------------------------------------------------------------------

def phi_ticks(count: int) -> np.ndarray:
    """Positions in [0, 1] of ``count`` shared Φs. The official code places 4 Φs at
    linspace(1/(3K), 1 - 1/(3K), K) and any other count at linspace(1/(2K), 1 - 1/(2K), K);
    scale si of SN picks the Φ whose tick is nearest to si / (SN - 1)."""
    if count == 4:
        return np.linspace(1 / 3 / count, 1 - 1 / 3 / count, count)
    return np.linspace(1 / 2 / count, 1 - 1 / 2 / count, count)


def phi_index(ticks: np.ndarray, at_from_0_to_1: float) -> int:
    # Float64 numpy arithmetic on purpose: with 4 ticks and 10 scales, scale 2 is an exact tie on
    # paper (2/9 is equidistant from 1/12 and 13/36) and rounding picks Φ 1, as the release does.
    return int(np.argmin(np.abs(ticks - at_from_0_to_1)))


class Phi(nn.Conv2d):
    """Φ(h) = (1 - r) h + r conv3x3(h)."""

    def __init__(self, channels: int, quant_resi: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h_BChw):
        return h_BChw * (1 - self.resi_ratio) + super().forward(h_BChw) * self.resi_ratio


class PhiShared(nn.Module):
    """share_quant_resi=1: one Φ (key ``quant_resi.qresi``) for every scale."""

    def __init__(self, qresi: nn.Module):
        super().__init__()
        self.qresi = qresi

    def __getitem__(self, _at_from_0_to_1: float) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    """share_quant_resi=n>1: n Φs (keys ``quant_resi.qresi_ls.{k}``), each serving nearby scales."""

    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls
        self.ticks = phi_ticks(len(qresi_ls))

    def __getitem__(self, at_from_0_to_1: float) -> nn.Module:
        return self.qresi_ls[phi_index(self.ticks, at_from_0_to_1)]


class PhiNonShared(nn.ModuleList):
    """share_quant_resi=0: one Φ per scale (keys ``quant_resi.{k}``)."""

    def __init__(self, qresi: list):
        super().__init__(qresi)
        self.ticks = phi_ticks(len(qresi))

    def __getitem__(self, at_from_0_to_1: float) -> nn.Module:
        return super().__getitem__(phi_index(self.ticks, at_from_0_to_1))


# ------------------------------------------------------------------------------------------------
# The multi-scale residual quantiser
# ------------------------------------------------------------------------------------------------

def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _sum_over_processes(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        torch.distributed.all_reduce(t)
    return t


class MultiScaleQuantizer(nn.Module):
    """The official ``VectorQuantizer2``: features <-> index pyramids ``idx_Bl`` (one LongTensor
    (B, pn*pn) per scale, small to large; the largest side must equal the feature map's side), and
    its training forward (:meth:`forward`, :meth:`quantize_for_training`).

    Optional codebook aids (off in the release; their buffers exist only when on, so the default
    state_dict keeps the official keys):

    - ``ema_codebook``: the codebook gets no gradient; in training mode each forward moves every code
      to the Laplace-smoothed EMA mean of the quantiser inputs (area-downsampled residuals, of every
      scale) assigned to it. Buffers ``ema_cluster_size`` (V,) and ``ema_embed_sum`` (V, Cvae).
    - ``restart_dead_codes``: codes whose EMA hit count per forward (``ema_cluster_size``) is below
      ``dead_code_threshold`` are replaced by quantiser inputs of the current batch drawn with the
      global torch RNG (rank 0's draw is broadcast, so every process keeps the same codebook).

    Statistics are summed over processes when torch.distributed is initialised.
    """

    def __init__(self, vocab_size: int, Cvae: int, using_znorm: bool, beta: float, default_qresi_counts: int,
                 v_patch_nums, quant_resi: float, share_quant_resi: int, ema_codebook: bool = False,
                 ema_decay: float = 0.99, restart_dead_codes: bool = False, dead_code_threshold: float = 1.0):
        super().__init__()
        self.vocab_size, self.Cvae = vocab_size, Cvae
        self.using_znorm, self.beta = using_znorm, beta
        self.v_patch_nums = tuple(v_patch_nums)
        self.ema_codebook, self.ema_decay = ema_codebook, ema_decay
        self.restart_dead_codes, self.dead_code_threshold = restart_dead_codes, dead_code_threshold
        # Number of per-scale updates of ema_vocab_hit_SV so far. Not saved, as in the official code:
        # after a resume the first update copies instead of averaging (a logging statistic only).
        self.record_hit = 0

        def make_phi():
            return Phi(Cvae, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()

        if share_quant_resi == 0:
            self.quant_resi = PhiNonShared([make_phi() for _ in range(default_qresi_counts or len(v_patch_nums))])
        elif share_quant_resi == 1:
            self.quant_resi = PhiShared(make_phi())
        else:
            self.quant_resi = PhiPartiallyShared(nn.ModuleList([make_phi() for _ in range(share_quant_resi)]))
        # Codebook-usage statistics of VAE training; persistent because the release stores it.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.v_patch_nums), vocab_size))
        self.embedding = nn.Embedding(vocab_size, Cvae)
        if ema_codebook or restart_dead_codes:
            # Unit counts and sums equal to the codebook: the EMA starts at the initial codebook.
            self.register_buffer("ema_cluster_size", torch.ones(vocab_size))
        if ema_codebook:
            self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone())

    def phi_for_scale(self, si: int, num_scales: int) -> nn.Module:
        return self.quant_resi[si / (num_scales - 1)]

    def _nearest(self, z_NC: torch.Tensor) -> torch.Tensor:
        codebook_VC = self.embedding.weight.data
        if self.using_znorm:
            return torch.argmax(F.normalize(z_NC, dim=-1) @ F.normalize(codebook_VC.T, dim=0), dim=1)
        dist_NV = z_NC.square().sum(1, keepdim=True) + codebook_VC.square().sum(1)
        dist_NV.addmm_(z_NC, codebook_VC.T, alpha=-2, beta=1)
        return torch.argmin(dist_NV, dim=1)

    # -------------------------------------------------------------------------------- training

    def forward(self, f_BChw: torch.Tensor, ret_usages: bool = False):
        """The official training forward: (f_hat (B, Cvae, H, W) float32 carrying a straight-through
        gradient to ``f_BChw``, per-scale usages in percent (see :meth:`scale_usages`) or None,
        the vq loss)."""
        f_hat, vq_loss, _ = self.quantize_for_training(f_BChw)
        usages = self.scale_usages(f_BChw.numel() // f_BChw.shape[1]) if ret_usages else None
        return f_hat, usages, vq_loss

    def quantize_for_training(self, f_BChw: torch.Tensor):
        """Residual quantisation with losses: returns (f_hat_BChw, vq_loss, hit_V).

        ``f_hat_BChw`` equals the quantised features in value and passes the gradient straight
        through to ``f_BChw``. ``vq_loss`` is, averaged over scales, ``mse(f_hat_k, sg f)``
        (trains the codebook and Φ) + ``beta * mse(sg f_hat_k, f)`` (commits the encoder), with
        f_hat_k the running sum after scale k. ``hit_V`` (V,) counts how often each code was picked,
        over all scales (and processes, in training). In training mode this also updates
        ``ema_vocab_hit_SV`` and, if enabled, the EMA codebook and dead-code restarts.
        The quantiser always runs in float32, outside autocast.
        """
        B, C, H, W = f_BChw.shape
        SN = len(self.v_patch_nums)
        if (H, W) != (self.v_patch_nums[-1],) * 2:
            raise ValueError(f"the largest scale {self.v_patch_nums[-1]} must equal the feature map's side "
                             f"({H}, {W}); image side / downsample must be v_patch_nums[-1]")
        with torch.autocast(device_type=f_BChw.device.type, enabled=False):
            f_BChw = f_BChw.float()
            f_no_grad = f_BChw.detach()
            f_rest = f_no_grad.clone()
            f_hat = torch.zeros_like(f_rest)
            # With the EMA codebook only Φ learns from the codebook loss.
            codebook_VC = self.embedding.weight.detach() if self.ema_codebook else self.embedding.weight
            vq_loss = f_BChw.new_zeros(())
            hit_V = f_BChw.new_zeros(self.vocab_size)
            inputs_NC, idx_Ns = [], []  # what each scale quantised and the codes it picked
            for si, pn in enumerate(self.v_patch_nums):
                last = si == SN - 1
                rest_BChw = f_rest if last else F.interpolate(f_rest, size=(pn, pn), mode="area")
                rest_NC = rearrange(rest_BChw, "b c h w -> (b h w) c")
                idx_N = self._nearest(rest_NC)
                hits_V = idx_N.bincount(minlength=self.vocab_size).float()
                if self.training:
                    self._record_hits(si, _sum_over_processes(hits_V))
                hit_V += hits_V
                h_BChw = rearrange(F.embedding(idx_N.view(B, pn, pn), codebook_VC), "b h w c -> b c h w")
                if not last:
                    h_BChw = F.interpolate(h_BChw, size=(H, W), mode="bicubic")
                h_BChw = self.phi_for_scale(si, SN)(h_BChw.contiguous())
                f_hat = f_hat + h_BChw
                f_rest.sub_(h_BChw.detach())
                vq_loss = vq_loss + F.mse_loss(f_hat.detach(), f_BChw) * self.beta + F.mse_loss(f_hat, f_no_grad)
                inputs_NC.append(rest_NC)
                idx_Ns.append(idx_N)
            vq_loss = vq_loss * (1.0 / SN)
            f_hat = (f_hat.detach() - f_no_grad) + f_BChw
        if self.training and (self.ema_codebook or self.restart_dead_codes):
            self._update_codebook(torch.cat(inputs_NC), torch.cat(idx_Ns), hit_V)
        return f_hat, vq_loss, hit_V

    def _record_hits(self, si: int, hits_V: torch.Tensor) -> None:
        # The official schedule: copy on the very first call, then momentum 0.9 and, after 100
        # per-scale updates, 0.99. The counter advances once per scale.
        row = self.ema_vocab_hit_SV[si]
        if self.record_hit == 0:
            row.copy_(hits_V)
        elif self.record_hit < 100:
            row.mul_(0.9).add_(hits_V * 0.1)
        else:
            row.mul_(0.99).add_(hits_V * 0.01)
        self.record_hit += 1

    def scale_usages(self, positions_per_process: int) -> list[float]:
        """The official per-scale usage (percent): codes whose ``ema_vocab_hit_SV`` count is at least
        8% of an even share of the largest scale's tokens over all processes
        (``positions_per_process`` = B*H*W of one process's batch)."""
        world = torch.distributed.get_world_size() if _distributed() else 1
        margin = world * positions_per_process / self.vocab_size * 0.08
        return [(row >= margin).float().mean().item() * 100 for row in self.ema_vocab_hit_SV]

    @torch.no_grad()
    def _update_codebook(self, inputs_NC: torch.Tensor, idx_N: torch.Tensor, hit_V: torch.Tensor) -> None:
        """One step of the optional codebook aids from this batch's quantiser inputs (N, Cvae) and
        their codes (N,); ``hit_V`` is already summed over processes."""
        decay = self.ema_decay
        self.ema_cluster_size.mul_(decay).add_(hit_V.to(self.ema_cluster_size.dtype), alpha=1 - decay)
        if self.ema_codebook:
            embed_sum_VC = torch.zeros_like(self.ema_embed_sum).index_add_(
                0, idx_N, inputs_NC.to(self.ema_embed_sum.dtype))
            self.ema_embed_sum.mul_(decay).add_(_sum_over_processes(embed_sum_VC), alpha=1 - decay)
            # Laplace smoothing keeps codes with (almost) no hits from dividing by zero.
            total = self.ema_cluster_size.sum()
            smoothed_V = (self.ema_cluster_size + EMA_EPS) / (total + self.vocab_size * EMA_EPS) * total
            self.embedding.weight.copy_(self.ema_embed_sum / smoothed_V.unsqueeze(1))
        if self.restart_dead_codes:
            dead_V = self.ema_cluster_size < self.dead_code_threshold
            num_dead = int(dead_V.sum())
            if num_dead:
                picks = torch.randint(inputs_NC.shape[0], (num_dead,), device=inputs_NC.device)
                new_codes_DC = inputs_NC[picks].float()
                if _distributed():
                    torch.distributed.broadcast(new_codes_DC, src=0)
                self.embedding.weight[dead_V] = new_codes_DC.to(self.embedding.weight.dtype)
                # A restarted code starts at the threshold: it must be picked to survive.
                self.ema_cluster_size[dead_V] = self.dead_code_threshold
                if self.ema_codebook:
                    self.ema_embed_sum[dead_V] = (new_codes_DC * self.dead_code_threshold).to(self.ema_embed_sum.dtype)

    @torch.no_grad()
    def f_to_idxBl_or_fhat(self, f_BChw: torch.Tensor, to_fhat: bool, v_patch_nums=None) -> list[torch.Tensor]:
        """Residual quantisation of features (B, Cvae, H, W): per scale, the indices (B, pn*pn)
        or, with ``to_fhat``, the running f_hat (B, Cvae, H, W) after that scale."""
        B, C, H, W = f_BChw.shape
        patch_hws = [(pn, pn) if isinstance(pn, int) else (pn[0], pn[1]) for pn in (v_patch_nums or self.v_patch_nums)]
        if patch_hws[-1] != (H, W):
            raise ValueError(f"the largest scale {patch_hws[-1]} must equal the feature map's side ({H}, {W}); "
                             f"image side / downsample must be v_patch_nums[-1]")
        f_rest = f_BChw.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        out: list[torch.Tensor] = []
        SN = len(patch_hws)
        for si, (ph, pw) in enumerate(patch_hws):
            last = si == SN - 1
            rest_BChw = f_rest if last else F.interpolate(f_rest, size=(ph, pw), mode="area")
            idx_N = self._nearest(rearrange(rest_BChw, "b c h w -> (b h w) c"))
            h_BChw = rearrange(self.embedding(idx_N.view(B, ph, pw)), "b h w c -> b c h w")
            if not last:
                h_BChw = F.interpolate(h_BChw, size=(H, W), mode="bicubic")
            h_BChw = self.phi_for_scale(si, SN)(h_BChw.contiguous())
            f_hat.add_(h_BChw)
            f_rest.sub_(h_BChw)
            out.append(f_hat.clone() if to_fhat else idx_N.reshape(B, ph * pw))
        return out

    def embed_to_fhat(self, ms_h_BChw: list[torch.Tensor], all_to_max_scale: bool = True, last_one: bool = False):
        """Per-scale embeddings (B, Cvae, pn, pn) -> f_hat after each scale (or only the last).
        ``all_to_max_scale=False`` grows f_hat scale by scale instead (experimental in the original;
        not what training or VAR inference does)."""
        B, SN, side = ms_h_BChw[0].shape[0], len(self.v_patch_nums), self.v_patch_nums[-1]
        f_hats: list[torch.Tensor] = []
        if all_to_max_scale:
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, side, side, dtype=torch.float32)
            for si, h_BChw in enumerate(ms_h_BChw):
                if si < SN - 1:
                    h_BChw = F.interpolate(h_BChw, size=(side, side), mode="bicubic")
                f_hat = f_hat + self.phi_for_scale(si, SN)(h_BChw)
                f_hats.append(f_hat)
        else:
            pn0 = self.v_patch_nums[0]
            f_hat = ms_h_BChw[0].new_zeros(B, self.Cvae, pn0, pn0, dtype=torch.float32)
            for si, pn in enumerate(self.v_patch_nums):
                f_hat = F.interpolate(f_hat, size=(pn, pn), mode="bicubic") + self.phi_for_scale(si, SN)(ms_h_BChw[si])
                f_hats.append(f_hat)
        return f_hats[-1] if last_one else f_hats

    def idxBl_to_var_input(self, gt_ms_idx_Bl: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input of VAR: for scales 1..K-1, the f_hat accumulated from the earlier
        scales, area-downsampled to that scale's side. Returns (B, sum(pn^2) - pn_0^2, Cvae), float32."""
        B, C, SN = gt_ms_idx_Bl[0].shape[0], self.Cvae, len(self.v_patch_nums)
        side = self.v_patch_nums[-1]
        f_hat = gt_ms_idx_Bl[0].new_zeros(B, C, side, side, dtype=torch.float32)
        next_scales = []
        for si in range(SN - 1):
            pn = self.v_patch_nums[si]
            h_BChw = rearrange(self.embedding(gt_ms_idx_Bl[si]), "b (h w) c -> b c h w", h=pn).contiguous()
            f_hat.add_(self.phi_for_scale(si, SN)(F.interpolate(h_BChw, size=(side, side), mode="bicubic")))
            pn_next = self.v_patch_nums[si + 1]
            next_BlC = rearrange(F.interpolate(f_hat, size=(pn_next, pn_next), mode="area"), "b c h w -> b (h w) c")
            next_scales.append(next_BlC)
        return torch.cat(next_scales, dim=1)

    def get_next_autoregressive_input(self, si: int, SN: int, f_hat: torch.Tensor, h_BChw: torch.Tensor):
        """VAR sampling step: add scale ``si``'s embeddings (B, Cvae, pn, pn) to f_hat (in place) and
        return (f_hat, the next scale's input: f_hat area-downsampled, or f_hat itself at the end)."""
        side = self.v_patch_nums[-1]
        if si != SN - 1:
            f_hat.add_(self.phi_for_scale(si, SN)(F.interpolate(h_BChw, size=(side, side), mode="bicubic")))
            pn_next = self.v_patch_nums[si + 1]
            return f_hat, F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")
        f_hat.add_(self.phi_for_scale(si, SN)(h_BChw))
        return f_hat, f_hat


# ------------------------------------------------------------------------------------------------
# The tokenizer
# ------------------------------------------------------------------------------------------------

@register_tokenizer("msvq", config=MSVQConfig,
                    description="VAR multi-scale residual VQ-VAE (vae_ch160v4096z32 with ch=160)")
class MSVQTokenizer(Tokenizer):
    """Images in [-1, 1] <-> f_hat (B, z_channels, H/d, W/d) <-> index pyramids, d = 2^(len(ch_mult)-1).
    Image sides must be ``v_patch_nums[-1] * d`` (256 for the release)."""

    kind = "discrete"
    trainable = True

    def __init__(self, config: MSVQConfig):
        super().__init__(latent_channels=config.z_channels, downsample=2 ** (len(config.ch_mult) - 1))
        self.config = config
        self.V, self.Cvae = config.vocab_size, config.z_channels
        self.vocab_size = config.vocab_size
        self.test_mode = config.test_mode
        # The LDM encoder/decoder with VAR's fused-qkv attention after every res block of the coarsest level.
        arch = dict(ch=config.ch, ch_mult=tuple(config.ch_mult), num_res_blocks=2, dropout=config.dropout,
                    attn_levels=(len(config.ch_mult) - 1,), attn_block=FusedQKVAttnBlock)
        self.encoder = Encoder(in_channels=config.image_channels, out_channels=config.z_channels, **arch)
        self.decoder = Decoder(z_channels=config.z_channels, out_channels=config.image_channels, **arch)
        self.quantize = MultiScaleQuantizer(
            vocab_size=config.vocab_size, Cvae=config.z_channels, using_znorm=config.using_znorm, beta=config.beta,
            default_qresi_counts=config.default_qresi_counts, v_patch_nums=config.v_patch_nums,
            quant_resi=config.quant_resi, share_quant_resi=config.share_quant_resi,
            ema_codebook=config.ema_codebook, ema_decay=config.ema_decay,
            restart_dead_codes=config.restart_dead_codes, dead_code_threshold=config.dead_code_threshold)
        ks = config.quant_conv_ks
        self.quant_conv = nn.Conv2d(self.Cvae, self.Cvae, ks, stride=1, padding=ks // 2)
        self.post_quant_conv = nn.Conv2d(self.Cvae, self.Cvae, ks, stride=1, padding=ks // 2)
        if self.test_mode:
            self.eval()
        self.requires_grad_(not self.test_mode)

    def requires_grad_(self, requires_grad: bool = True):
        # An EMA codebook is never a gradient parameter: optimisers and DDP must not wait for its gradient.
        super().requires_grad_(requires_grad)
        if self.config.ema_codebook:
            self.quantize.embedding.weight.requires_grad_(False)
        return self

    @classmethod
    def describe(cls, config: MSVQConfig) -> dict:
        """The base facts plus ``vocab_size`` and ``patch_nums`` (tuple of sides, small to large),
        which a next-scale generator must share."""
        return {"latent_channels": config.z_channels, "downsample": 2 ** (len(config.ch_mult) - 1),
                "image_channels": config.image_channels, "vocab_size": config.vocab_size,
                "patch_nums": tuple(config.v_patch_nums)}

    def _check_images(self, images: torch.Tensor) -> None:
        side = self.config.v_patch_nums[-1] * self.downsample
        if images.ndim != 4 or images.shape[1] != self.config.image_channels or images.shape[-2:] != (side, side):
            raise ValueError(f"msvq tokenizer: expected images (N, {self.config.image_channels}, {side}, {side}) "
                             f"(side = v_patch_nums[-1] * downsample), got shape {tuple(images.shape)}")

    def img_to_idxBl(self, images: torch.Tensor, v_patch_nums=None) -> list[torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1] -> index pyramid: one LongTensor (B, pn*pn) per scale."""
        self._check_images(images)
        f_BChw = self.quant_conv(self.encoder(images))
        return self.quantize.f_to_idxBl_or_fhat(f_BChw, to_fhat=False, v_patch_nums=v_patch_nums)

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat (B, Cvae, h, w) -> images clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def idxBl_to_img(self, ms_idx_Bl: list[torch.Tensor], same_shape: bool = True, last_one: bool = True):
        """Index pyramid -> images in [-1, 1]: of the full pyramid (``last_one``) or one per prefix."""
        ms_h_BChw = []
        for idx_Bl in ms_idx_Bl:
            pn = round(idx_Bl.shape[1] ** 0.5)
            ms_h_BChw.append(rearrange(self.quantize.embedding(idx_Bl), "b (h w) c -> b c h w", h=pn).contiguous())
        f_hats = self.quantize.embed_to_fhat(ms_h_BChw, all_to_max_scale=same_shape, last_one=last_one)
        return self.fhat_to_img(f_hats) if last_one else [self.fhat_to_img(f) for f in f_hats]

    def img_to_reconstructed_img(self, images: torch.Tensor, v_patch_nums=None, last_one: bool = False):
        """Images -> their reconstruction after each scale (or only after all of them)."""
        self._check_images(images)
        f_hats = self.quantize.f_to_idxBl_or_fhat(self.quant_conv(self.encoder(images)), to_fhat=True,
                                                  v_patch_nums=v_patch_nums)
        return self.fhat_to_img(f_hats[-1]) if last_one else [self.fhat_to_img(f) for f in f_hats]

    def set_step(self, step: int, max_steps: int) -> None:
        """Called by the trainer before each optimizer step. The official per-scale hit statistics
        (``ema_vocab_hit_SV``) pick their momentum from a call counter that is not saved; after a
        resume it restarts from the count one forward per step implies (exact with one micro-batch
        per step), instead of from 0, which would overwrite the restored statistics."""
        self.quantize.record_hit = max(self.quantize.record_hit, step * len(self.quantize.v_patch_nums))

    @torch.no_grad()
    def training_inputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What VAR's trainer feeds its generator: ``(gt_BL, x_BLCv_wo_first_l)`` = the index
        pyramid concatenated over scales (B, sum pn^2) and the teacher-forcing input
        ``quantize.idxBl_to_var_input`` (B, sum pn^2 - pn_0^2, Cvae), float32."""
        idx_Bl = self.img_to_idxBl(images)
        return torch.cat(idx_Bl, dim=1), self.quantize.idxBl_to_var_input(idx_Bl)

    cacheable = True  # the index pyramid is a deterministic function of the image (eval mode)

    @torch.no_grad()
    def cache_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """The concatenated index pyramid (B, sum pn^2), int16 when the codebook allows."""
        gt_BL = torch.cat(self.img_to_idxBl(images), dim=1)
        return gt_BL.to(torch.int16 if self.vocab_size <= 2**15 else torch.int32)

    @torch.no_grad()
    def inputs_from_cache(self, gt_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``training_inputs`` rebuilt from :meth:`cache_inputs`: the teacher-forcing input is
        recomputed from the indices (cheap), exactly as from an encoded image."""
        gt_BL = gt_BL.long()
        idx_Bl = list(gt_BL.split([pn * pn for pn in self.quantize.v_patch_nums], dim=1))
        return gt_BL, self.quantize.idxBl_to_var_input(idx_Bl)

    # -------------------------------------------------------------------------------- training

    def forward(self, images: torch.Tensor, ret_usages: bool = False):
        """The official training forward: (unclamped reconstruction, per-scale usages or None, vq loss)."""
        self._check_images(images)
        f_hat, usages, vq_loss = self.quantize(self.quant_conv(self.encoder(images)), ret_usages=ret_usages)
        return self.decoder(self.post_quant_conv(f_hat)), usages, vq_loss

    def loss(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training losses of a batch of images (N, C, H, W) in [-1, 1], all 0-dim tensors:

        - ``loss`` = ``recon_weight`` * ``recon`` + ``codebook_weight`` * ``vq`` (the one to backpropagate);
        - ``recon``: L1 or L2 (``recon_loss``) between the images and the unclamped reconstruction
          of the straight-through f_hat;
        - ``vq``: the quantiser's codebook + ``beta`` * commitment loss, averaged over scales;
        - ``usage`` (fraction of the codebook picked at least once in this batch, over all scales)
          and ``perplexity`` (exp of the entropy of the batch's code histogram; at most
          ``vocab_size``), detached, for logging.

        Call it in training mode (``tokenizer.train().requires_grad_(True)``; ``test_mode`` freezes
        the model at construction): only then are the usage statistics, the EMA codebook and
        dead-code restarts updated.
        """
        self._check_images(images)
        f_hat, vq_loss, hit_V = self.quantize.quantize_for_training(self.quant_conv(self.encoder(images)))
        reconstruction = self.decoder(self.post_quant_conv(f_hat)).float()
        if self.config.recon_loss == "l1":
            recon = F.l1_loss(reconstruction, images.float())
        else:
            recon = F.mse_loss(reconstruction, images.float())
        probs_V = hit_V / hit_V.sum()
        entropy = -torch.special.xlogy(probs_V, probs_V).sum()
        return {
            "loss": self.config.recon_weight * recon + self.config.codebook_weight * vq_loss,
            "recon": recon,
            "vq": vq_loss,
            "usage": (hit_V > 0).float().mean(),
            "perplexity": entropy.exp(),
        }

    def encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> f_hat (B, Cvae, h, w), the quantised features after every scale."""
        self._check_images(images)
        return self.quantize.f_to_idxBl_or_fhat(self.quant_conv(self.encoder(images)), to_fhat=True)[-1]

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return self.fhat_to_img(z)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that also

        - casts floating tensors to this model's dtype (the release is fp32, fp16 copies circulate),
          even with ``assign=True``;
        - as the official loader, replaces usage statistics saved for another number of scales by
          this model's own (they only matter for VAE training);
        - starts absent EMA-codebook / restart statistics from the loaded codebook (unit counts), so
          the official checkpoint loads strictly into a model with those options on.
        """
        own = self.state_dict(keep_vars=True)
        metadata = getattr(state_dict, "_metadata", None)
        state_dict = {k: v.to(own[k].dtype) if k in own and v.is_floating_point() and own[k].is_floating_point()
                      else v for k, v in state_dict.items()}
        key = "quantize.ema_vocab_hit_SV"
        if key in state_dict and state_dict[key].shape != self.quantize.ema_vocab_hit_SV.shape:
            state_dict[key] = self.quantize.ema_vocab_hit_SV.detach().clone()
        codebook = state_dict.get("quantize.embedding.weight")
        if codebook is not None:
            if "quantize.ema_cluster_size" in own and "quantize.ema_cluster_size" not in state_dict:
                state_dict["quantize.ema_cluster_size"] = torch.ones_like(own["quantize.ema_cluster_size"])
            if "quantize.ema_embed_sum" in own and "quantize.ema_embed_sum" not in state_dict:
                state_dict["quantize.ema_embed_sum"] = codebook.detach().clone()
        if metadata is not None:
            state_dict = collections.OrderedDict(state_dict)
            state_dict._metadata = metadata
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
