"""VAR: visual autoregressive modelling by next-scale prediction (Tian et al., 2024).

A class-conditional GPT over the multi-scale token pyramid of the ``msvq`` tokenizer: scale k
(pn_k x pn_k tokens) is predicted all at once from the class and every coarser scale, with a
block-causal attention mask in training and a KV cache at inference.

Parameter and buffer names, initialisation (``init_weights``), ``forward(label_B,
x_BLCv_wo_first_l)`` and ``autoregressive_infer_cfg`` follow FoundationVision/VAR
``models/var.py`` and ``models/basic_var.py``, so the released ``var_d16.pth`` … ``var_d30.pth``
load with ``strict=True``. Deliberate differences from the release:

- labels are dropped to the null class only in training mode (the release drops them in eval too);
- all sampling randomness comes from the ``generator`` argument (seeded and reproducible);
- progressive training is driven by :meth:`VAR.set_step`, a pure function of the step, instead of
  counters kept by the trainer, so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Mlp, use_fused_attn
from torch import nn

from zoo.config import ConfigError
from zoo.fit import Fit, check_classes, check_token_pyramid
from zoo.nn.checkpointing import call_block
from zoo.registry import register_generator


class VARSizes:
    """Derived sizes shared by VAR's and VAR-SR's configs: ``embed_dim`` 0 means 64·depth, ``num_heads``
    0 means depth, a negative ``drop_path_rate`` means the release's 0.1·depth/24."""

    @property
    def width(self) -> int:
        return self.embed_dim or 64 * self.depth

    @property
    def heads(self) -> int:
        return self.num_heads or self.depth

    @property
    def drop_path(self) -> float:
        return self.drop_path_rate if self.drop_path_rate >= 0 else 0.1 * self.depth / 24


@dataclasses.dataclass
class VARConfig(VARSizes):
    """Fields of the official ``VAR(...)`` constructor and ``build_vae_var`` initialisation, plus
    zoo's training options (label smoothing, loss weighting, progressive training)."""

    depth: int = 16
    embed_dim: int = 0  # 0: 64 * depth, as build_vae_var
    num_heads: int = 0  # 0: depth, as build_vae_var
    num_classes: int = 1000  # the null class (classifier-free guidance) is index num_classes
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    vocab_size: int = 4096  # V of the tokenizer's codebook
    Cvae: int = 32  # width of the tokenizer's codebook entries (its z_channels)
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = -1.0  # < 0: 0.1 * depth / 24, as build_vae_var
    norm_eps: float = 1e-6
    shared_aln: bool = False  # one adaLN projection shared by all blocks (plus a learned per-block offset)
    cond_drop_rate: float = 0.1  # training labels replaced by the null class
    attn_l2_norm: bool = True  # cosine attention with a learned per-head temperature
    # init_weights (the release trains from these):
    init_adaln: float = 0.5  # multiplier of the adaLN scale/shift weights
    init_adaln_gamma: float = 1e-5  # multiplier of the adaLN gate weights
    init_head: float = 0.02  # multiplier of the head weights
    init_std: float = -1.0  # < 0: sqrt(1 / (3 * embed_dim))
    # training
    label_smooth: float = 0.0
    # "uniform": every token weighs 1/L (the release); "per_scale": every scale weighs the same.
    loss_weighting: str = "uniform"
    # progressive training (train.py's pg, pg0, pgwp; lengths are fractions of max_steps):
    pg: float = 0.0  # > 0: grow the trained prefix of scales during the first pg of training
    pg0: int = 4  # index of the last scale trained at the start
    pgwp: float = 0.0  # warm-up of each newly added scale's loss weight; 0: 1/300 (the release's ep/300)
    wp: float = 0.0  # steps at the start that stay at pg0 (the release's LR warm-up); 0: 1/50

    CHOICES = {"loss_weighting": ("uniform", "per_scale")}

    def __post_init__(self):
        for name in ("depth", "num_classes", "Cvae"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.vocab_size < 2:
            raise ConfigError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.embed_dim < 0 or self.num_heads < 0:
            raise ConfigError(f"embed_dim and num_heads must be >= 0 (0: 64 * depth and depth), got "
                              f"{self.embed_dim} and {self.num_heads}")
        if self.width % self.heads:
            raise ConfigError(f"embed_dim {self.width} is not divisible by num_heads {self.heads}")
        pns = tuple(self.patch_nums)
        if len(pns) < 2 or pns[0] < 1 or any(a >= b for a, b in zip(pns, pns[1:])):
            raise ConfigError(f"patch_nums must list at least two strictly increasing positive sides, got {pns}")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        for name in ("drop_rate", "attn_drop_rate", "cond_drop_rate", "label_smooth"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.drop_path_rate >= 1.0:
            raise ConfigError(f"drop_path_rate must be < 1 (negative: 0.1 * depth / 24), got {self.drop_path_rate}")
        if self.norm_eps <= 0:
            raise ConfigError(f"norm_eps must be > 0, got {self.norm_eps}")
        if not 0.0 <= self.pg <= 1.0:
            raise ConfigError(f"pg must be in [0, 1] (a fraction of train.max_steps; 0 disables progressive "
                              f"training), got {self.pg}")
        if self.pg > 0 and not 0 <= self.pg0 < len(pns):
            raise ConfigError(f"pg0 must index one of the {len(pns)} scales of patch_nums (0..{len(pns) - 1}), "
                              f"got {self.pg0}")
        for name in ("pgwp", "wp"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1] (a fraction of train.max_steps), got "
                                  f"{getattr(self, name)}")


def progressive_stage(step: int, max_steps: int, num_scales: int, pg: float, pg0: int, wp: float) -> int:
    """Index of the last trained scale at ``step`` (train.py's schedule): pg0 during the first
    ``wp`` of training, then a linear climb to the last scale, reached at ``pg`` of training."""
    wp_it, end_it = wp * max_steps, max_steps * pg
    if step <= wp_it:
        return pg0
    if step >= end_it:
        return num_scales - 1
    progress = min(max((step - wp_it) / (end_it - wp_it), 0), 1)
    return pg0 + round(progress * (num_scales - 1 - pg0))


#################################################################################
#                              Sampling helpers                                 #
#################################################################################


def _on_generator_device(t: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return t if generator is None or generator.device == t.device else t.to(generator.device)


def token_loss_weights(patch_nums, weighting: str) -> torch.Tensor:
    """(1, L) per-token loss weights: ``uniform`` 1/L each (the release), or ``per_scale`` 1/(scales · pn²)
    so that every scale weighs the same."""
    L = sum(pn * pn for pn in patch_nums)
    if weighting == "uniform":
        return torch.full((1, L), 1.0 / L)
    return torch.cat([torch.full((pn * pn,), 1.0 / (len(patch_nums) * pn * pn)) for pn in patch_nums]).view(1, L)


def filter_top_k_top_p(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """``logits_BlV`` with the tokens outside the top-k and the nucleus set to -inf, in place (as the
    official helper): top-k keeps values >= the k-th largest; top-p drops the least likely tokens
    whose cumulative probability stays <= 1 - top_p (the most likely token always survives)."""
    V = logits_BlV.shape[-1]
    if top_k > 0:
        kth_Bl1 = logits_BlV.topk(min(top_k, V), largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth_Bl1, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False
        logits_BlV.masked_fill_(drop_sorted.scatter(sorted_idx.ndim - 1, sorted_idx, drop_sorted), -torch.inf)
    return logits_BlV


def sample_with_top_k_top_p_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                             generator: torch.Generator | None = None, num_samples: int = 1) -> torch.Tensor:
    """Token indices (B, l, num_samples) drawn from softmax(logits) after :func:`filter_top_k_top_p`
    (in place, as the official helper). ``num_samples < 0`` draws without replacement."""
    B, l, V = logits_BlV.shape
    filter_top_k_top_p(logits_BlV, top_k, top_p)
    probs_NV = _on_generator_device(logits_BlV.softmax(dim=-1).view(-1, V), generator)
    idx = torch.multinomial(probs_NV, num_samples=abs(num_samples), replacement=num_samples >= 0, generator=generator)
    return idx.to(logits_BlV.device).view(B, l, abs(num_samples))


def gumbel_softmax_with_rng(logits: torch.Tensor, tau: float = 1.0, hard: bool = False, eps: float = 1e-10,
                            dim: int = -1, generator: torch.Generator | None = None) -> torch.Tensor:
    """``F.gumbel_softmax`` with its Gumbel noise drawn from ``generator`` (global RNG when None)."""
    if generator is None:
        return F.gumbel_softmax(logits=logits, tau=tau, hard=hard, eps=eps, dim=dim)
    exp_noise = torch.empty(logits.shape, dtype=logits.dtype, device=generator.device).exponential_(generator=generator)
    y_soft = ((logits - exp_noise.to(logits.device).log()) / tau).softmax(dim)
    if not hard:
        return y_soft
    index = y_soft.max(dim, keepdim=True)[1]
    y_hard = torch.zeros_like(logits).scatter_(dim, index, 1.0)
    return y_hard - y_soft.detach() + y_soft


#################################################################################
#                                  Blocks                                       #
#################################################################################


def gated_residual(x_BLC: torch.Tensor, h_BLC: torch.Tensor, gamma_B1C: torch.Tensor, drop_prob: float,
                   training: bool) -> torch.Tensor:
    """x + drop_path(h · gamma) in one pass; stochastic depth zeroes a sample's branch with
    probability ``drop_prob`` (training only) and rescales the kept ones by 1/(1 − drop_prob)."""
    if drop_prob > 0.0 and training:
        keep = 1 - drop_prob
        gamma_B1C = gamma_B1C * x_BLC.new_empty(x_BLC.shape[0], 1, 1).bernoulli_(keep).div_(keep)
    return torch.addcmul(x_BLC, h_BLC, gamma_B1C)


def block_causal_chunks(patch_nums, last_scale: int, group_below: int) -> list[tuple[int, int, bool]]:
    """Query ranges ``(begin, end, masked)`` that together compute block-causal attention over the
    scales up to ``last_scale``: queries [begin, end) see keys [0, end). Scales are attended one by
    one, with no mask (their keys are exactly the earlier tokens and their own), which skips the
    masked upper triangle; the first scales, up to ``group_below`` tokens in all, form one masked
    chunk to save calls."""
    ends = []
    cur = 0
    for pn in patch_nums[:last_scale + 1]:
        cur += pn * pn
        ends.append(cur)
    first = 0
    while first + 1 < len(ends) and ends[first + 1] <= group_below:
        first += 1
    chunks = [(0, ends[first], first > 0)]
    chunks += [(ends[i - 1], ends[i], False) for i in range(first + 1, len(ends))]
    return chunks


def apply_rope(x_BHLc: torch.Tensor, rope_Lc: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (0, 1), (2, 3), … of queries or keys (B, H, L, c) by the complex phases
    ``rope_Lc`` (L, c/2), in float32 (VARSR's ``apply_rotary_emb``); returns x's dtype."""
    B, H, L, c = x_BHLc.shape
    x_complex = torch.view_as_complex(x_BHLc.float().reshape(B, H, L, c // 2, 2))
    return torch.view_as_real(x_complex * rope_Lc).flatten(3).to(x_BHLc.dtype)


class KVCache:
    """Keys and values of every earlier token of one attention layer, preallocated to the whole
    sequence: each scale writes its slice instead of concatenating (the release's way)."""

    def __init__(self, batch: int, num_heads: int, max_len: int, head_dim: int, like: torch.Tensor):
        self.k_BHLc = like.new_empty(batch, num_heads, max_len, head_dim)
        self.v_BHLc = like.new_empty(batch, num_heads, max_len, head_dim)
        self.length = 0

    def append(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k_BHlc.shape[2]
        self.k_BHLc[:, :, self.length:end] = k_BHlc
        self.v_BHLc[:, :, self.length:end] = v_BHlc
        self.length = end
        return self.k_BHLc[:, :, :end], self.v_BHLc[:, :, :end]


def init_attention_scale(attn: nn.Module, num_heads: int, attn_l2_norm: bool) -> None:
    """The release's attention scaling, shared by VAR's self-attention and VAR-SR's cross-attention:
    cosine attention (``attn_l2_norm``) with a learned per-head log-scale ``scale_mul_1H11`` (init
    log 4, used clamped at log 100) and softmax scale 1, or dot products scaled by 0.25/sqrt(head_dim)."""
    attn.attn_l2_norm = attn_l2_norm
    if attn_l2_norm:
        attn.scale = 1.0
        attn.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        attn.max_scale_mul = math.log(100)
    else:
        attn.scale = 0.25 / math.sqrt(attn.head_dim)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, scale: float,
           dropout_p: float, fused: bool) -> torch.Tensor:
    """softmax(q kᵀ · scale + mask) v over (B, H, L, c): PyTorch's fused kernels, or, when timm's
    ``use_fused_attn()`` is off (``TIMM_FUSED_ATTN=0``: export, debugging), the same maths written out."""
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, dropout_p=dropout_p)
    attn = (q * scale) @ k.transpose(-2, -1)
    if attn_mask is not None:
        attn = attn.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else attn + attn_mask
    attn = F.dropout(attn.softmax(dim=-1), p=dropout_p)
    return attn @ v


class SelfAttention(nn.Module):
    """Multi-head self-attention with the release's names: a bias-free ``mat_qkv`` plus ``q_bias``
    and ``v_bias`` (keys get none: ``zero_k_bias`` is a stored zero buffer) and, with
    ``attn_l2_norm``, cosine attention scaled by exp(``scale_mul_1H11``) clamped at 100.

    zoo's own rather than timm's ``Attention``: the names, the missing key bias, the cosine scaling,
    the KV cache and the block-causal chunks are the release's and not timm's. The kernel choice is
    timm's ``use_fused_attn`` switch.
    """

    def __init__(self, embed_dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 attn_l2_norm: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        init_attention_scale(self, num_heads, attn_l2_norm)
        self.mat_qkv = nn.Linear(embed_dim, embed_dim * 3, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(embed_dim)), nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop
        self.fused_attn = use_fused_attn()

    def forward(self, x_BLC: torch.Tensor, attn_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, chunks: list[tuple[int, int, bool]] | None = None,
                rope: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention of (B, L, C) tokens. Training: ``chunks`` (see :func:`block_causal_chunks`)
        with the block-causal ``attn_mask`` (additive, (1, 1, L, L)) for its masked chunk; or a mask
        alone. Inference: ``cache`` holds the keys/values of the earlier scales. ``rope`` (complex,
        (L, head_dim/2)): rotary phases of these tokens, applied to q and k after the cosine
        normalisation (VAR-SR; VAR has none)."""
        B, L, C = x_BLC.shape
        H = self.num_heads
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv_BL3Hc = rearrange(F.linear(x_BLC, self.mat_qkv.weight, bias), "b l (three h c) -> b l three h c",
                              three=3, h=H)
        if self.attn_l2_norm:
            # q/|q|·exp(scale_mul) and k/|k| in one pass over q and k together.
            scale_mul_H = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp().view(1, H)
            mult_2H1 = torch.cat((scale_mul_H, torch.ones_like(scale_mul_H))).unsqueeze(-1)
            qk_BL2Hc = qkv_BL3Hc[:, :, :2]
            norm_BL2H1 = torch.linalg.vector_norm(qk_BL2Hc, dim=-1, keepdim=True).clamp_min(1e-12)
            # (.to: under autocast the norm runs in float32; attention takes q, k, v of one dtype)
            q_BLHc, k_BLHc = (qk_BL2Hc * (mult_2H1 / norm_BL2H1)).to(qkv_BL3Hc.dtype).unbind(2)
        else:
            q_BLHc, k_BLHc = qkv_BL3Hc[:, :, 0], qkv_BL3Hc[:, :, 1]
        q, k, v = (rearrange(t, "b l h c -> b h l c") for t in (q_BLHc, k_BLHc, qkv_BL3Hc[:, :, 2]))
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is not None:
            k, v = cache.append(k, v)
        dropout_p = self.attn_drop if self.training else 0.0
        if chunks is None:
            out_BLHc = attend(q, k, v, attn_mask, self.scale, dropout_p, self.fused_attn).transpose(1, 2)
        else:
            # Queries are split (their gradients are concatenated back in one pass); keys and values
            # are prefixes of the sequence (the whole of it for the last chunk: no slice to undo).
            outs = []
            for q_chunk, (b, e, masked) in zip(q.split([e - b for b, e, _ in chunks], dim=2), chunks):
                k_e, v_e = (k, v) if e == L else (k[:, :, :e], v[:, :, :e])
                outs.append(attend(q_chunk, k_e, v_e, attn_mask[:, :, b:e, :e] if masked else None, self.scale,
                                   dropout_p, self.fused_attn).transpose(1, 2))
            out_BLHc = torch.cat(outs, dim=1)
        return self.proj_drop(self.proj(rearrange(out_BLHc, "b l h c -> b l (h c)")))


class AdaLNSelfAttn(nn.Module):
    """Pre-norm transformer block whose norms are scaled/shifted and whose branches are gated by
    the class condition: six (B, 1, C) tensors from ``ada_lin`` (or ``ada_gss`` + the shared ones)."""

    def __init__(self, embed_dim: int, cond_dim: int, num_heads: int, *, shared_aln: bool, norm_eps: float,
                 mlp_ratio: float = 4.0, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 attn_l2_norm: bool = False):
        super().__init__()
        self.C, self.D = embed_dim, cond_dim
        self.drop_path_prob = drop_path
        self.attn = SelfAttention(embed_dim, num_heads, attn_drop=attn_drop, proj_drop=drop,
                                  attn_l2_norm=attn_l2_norm)
        # The release's FFN is timm's Mlp (fc1, tanh-GELU, fc2) with dropout after fc2 only.
        self.ffn = Mlp(embed_dim, round(embed_dim * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"),
                       drop=(0.0, drop))
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * embed_dim))

    def modulation(self, cond_BD_or_gss: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(gamma1, gamma2, scale1, scale2, shift1, shift2), each (B, 1, C). Takes the class
        embedding (B, D), or with ``shared_aln`` the shared projection (B, 1, 6, C)."""
        if self.shared_aln:
            return (self.ada_gss + cond_BD_or_gss).unbind(2)
        return self.ada_lin(cond_BD_or_gss).view(-1, 1, 6, self.C).unbind(2)

    def forward(self, x_BLC: torch.Tensor, modulation: tuple[torch.Tensor, ...],
                attn_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                chunks: list[tuple[int, int, bool]] | None = None, rope: torch.Tensor | None = None) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = modulation
        h = self.attn(torch.addcmul(shift1, self.ln_wo_grad(x_BLC), scale1 + 1), attn_mask=attn_mask, cache=cache,
                      chunks=chunks, rope=rope)
        x_BLC = gated_residual(x_BLC, h, gamma1, self.drop_path_prob, self.training)
        h = self.ffn(torch.addcmul(shift2, self.ln_wo_grad(x_BLC), scale2 + 1))
        return gated_residual(x_BLC, h, gamma2, self.drop_path_prob, self.training)


class AdaLNBeforeHead(nn.Module):
    """The final norm, scaled and shifted by the class condition."""

    def __init__(self, C: int, D: int, norm_eps: float):
        super().__init__()
        self.C, self.D = C, D
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * C))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale.add(1)).add_(shift)


class SharedAdaLin(nn.Linear):
    """shared_aln: one projection of the condition for all blocks, (B, D) -> (B, 1, 6, C)."""

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return super().forward(cond_BD).view(-1, 1, 6, self.weight.shape[0] // 6)


class _Unowned:
    """Holds a module without making it a submodule (not in ``state_dict``, ``parameters`` or
    ``.to()``) and without copying it along with its owner (``copy.deepcopy`` for the EMA)."""

    def __init__(self, module: nn.Module | None):
        self.module = module

    def __deepcopy__(self, memo):
        return self


class SamplesThroughMSVQ:
    """The msvq tokenizer a VAR-like model samples through (VAR, VAR-SR): held by reference,
    outside the model's ``state_dict``, parameters and ``.to()`` (like the release's ``vae_proxy``),
    and shared, not copied, by ``copy.deepcopy``. Needs ``patch_nums``, ``V`` and ``Cvae``."""

    def attach_tokenizer(self, tokenizer: nn.Module | None):
        """Use ``tokenizer`` (an ``msvq`` tokenizer with this model's scales, vocabulary and code width)."""
        if tokenizer is not None:
            quantize = getattr(tokenizer, "quantize", None)
            if quantize is None or not hasattr(quantize, "get_next_autoregressive_input"):
                raise TypeError(f"{type(self).__name__} samples through a multi-scale VQ tokenizer (msvq); got "
                                f"{type(tokenizer).__name__}")
            got = (tuple(quantize.v_patch_nums), quantize.embedding.num_embeddings, quantize.embedding.embedding_dim)
            want = (self.patch_nums, self.V, self.Cvae)
            if got != want:
                raise ValueError(f"tokenizer does not fit this {type(self).__name__}: (v_patch_nums, vocab_size, "
                                 f"z_channels) = {got}, the model has (patch_nums, vocab_size, Cvae) = {want}")
        self._tokenizer = _Unowned(tokenizer)
        return self

    @property
    def tokenizer(self) -> nn.Module | None:
        return self._tokenizer.module

    def sampling_tokenizer(self, tokenizer: nn.Module | None) -> nn.Module:
        """``tokenizer`` (attached, once checked) or the attached one; a clear error when there is none."""
        if tokenizer is None:
            tokenizer = self.tokenizer
        elif tokenizer is not self.tokenizer:
            self.attach_tokenizer(tokenizer)
        if tokenizer is None:
            raise ValueError(f"{type(self).__name__} samples through its msvq tokenizer: pass tokenizer= or call "
                             f"attach_tokenizer(tokenizer)")
        return tokenizer


#################################################################################
#                                 Core VAR Model                                #
#################################################################################


class VAR(SamplesThroughMSVQ, nn.Module):
    """Next-scale prediction transformer, built from a :class:`VARConfig`.

    Works on the token pyramids of a multi-scale VQ tokenizer (``msvq``) with ``vocab_size`` codes
    of width ``Cvae`` and the same ``patch_nums``; :meth:`attach_tokenizer` gives it one for sampling.
    """

    OBJECTIVES = ()  # no diffusion objective: the loss is a cross-entropy over codebook indices
    TOKENIZER_KIND = "discrete"

    def __init__(self, config: VARConfig, objective=None):
        super().__init__()
        if objective is not None:
            raise ConfigError(f"VAR takes no objective (it is trained with a cross-entropy over token indices); "
                              f"got {type(objective).__name__}: remove the recipe's objective section")
        self.config = config
        self.checkpoint_activations = False  # train.checkpoint_activations: recompute blocks in backward
        self.Cvae, self.V = config.Cvae, config.vocab_size
        self.depth, self.C, self.D, self.num_heads = config.depth, config.width, config.width, config.heads
        self.num_classes = config.num_classes
        self.cond_drop_rate = config.cond_drop_rate
        self.patch_nums = tuple(config.patch_nums)
        self.L = sum(pn ** 2 for pn in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.begin_ends: list[tuple[int, int]] = []
        cur = 0
        for pn in self.patch_nums:
            self.begin_ends.append((cur, cur + pn ** 2))
            cur += pn ** 2
        self.num_stages_minus_1 = len(self.patch_nums) - 1
        self.prog_si = -1  # progressive training: index of the last scale trained (-1: all)
        self.prog_wp = 1.0  # progressive training: loss-weight multiplier of that newest scale
        self._tokenizer = _Unowned(None)

        C, init_std = self.C, math.sqrt(1 / self.C / 3)
        self.word_embed = nn.Linear(self.Cvae, C)
        self.class_emb = nn.Embedding(self.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, C))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        for table in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight):
            nn.init.trunc_normal_(table.data, mean=0, std=init_std)

        self.shared_ada_lin = (nn.Sequential(nn.SiLU(), SharedAdaLin(self.D, 6 * C)) if config.shared_aln
                               else nn.Identity())
        drop_path_rates = torch.linspace(0, config.drop_path, config.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            AdaLNSelfAttn(C, self.D, self.num_heads, shared_aln=config.shared_aln, norm_eps=config.norm_eps,
                          mlp_ratio=config.mlp_ratio, drop=config.drop_rate, attn_drop=config.attn_drop_rate,
                          drop_path=drop_path_rates[i], attn_l2_norm=config.attn_l2_norm)
            for i in range(config.depth)
        ])

        # Scale index of every position, and the block-causal mask (a token sees its own and all
        # coarser scales). Both are persistent: the released checkpoints store them.
        lvl_L = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(self.patch_nums)])
        self.register_buffer("lvl_1L", lvl_L.view(1, self.L))
        attn_bias = torch.where(lvl_L.view(-1, 1) >= lvl_L.view(1, -1), 0.0, -torch.inf)
        self.register_buffer("attn_bias_for_masking", attn_bias.view(1, 1, self.L, self.L))
        # Per-token loss weights (not in checkpoints): 1/L each, or 1/(scales · pn²) per scale.
        self.register_buffer("loss_weight_1L", token_loss_weights(self.patch_nums, config.loss_weighting),
                             persistent=False)

        self.head_nm = AdaLNBeforeHead(C, self.D, config.norm_eps)
        self.head = nn.Linear(C, self.V)
        self.init_weights(init_adaln=config.init_adaln, init_adaln_gamma=config.init_adaln_gamma,
                          init_head=config.init_head, init_std=config.init_std)

    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02,
                     init_std: float = 0.02) -> None:
        """The release's initialisation: truncated-normal linears and embeddings (std
        sqrt(1/(3C)) when ``init_std < 0``), zero biases, the head scaled by ``init_head``, residual
        projections by 1/sqrt(2·depth), and the adaLN weights by ``init_adaln`` (scales and shifts)
        and ``init_adaln_gamma`` (gates), so every block starts close to the identity."""
        if init_std < 0:
            init_std = (1 / self.C / 3) ** 0.5
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight.data, std=init_std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.data.zero_()
        if init_head >= 0:
            self.head.weight.data.mul_(init_head)
            self.head.bias.data.zero_()
        self.head_nm.ada_lin[-1].weight.data.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.data.zero_()
        for block in self.blocks:
            block.attn.proj.weight.data.div_(math.sqrt(2 * self.depth))
            block.ffn.fc2.weight.data.div_(math.sqrt(2 * self.depth))
            if block.shared_aln:
                block.ada_gss.data[:, :, 2:].mul_(init_adaln)
                block.ada_gss.data[:, :, :2].mul_(init_adaln_gamma)
            else:
                block.ada_lin[-1].weight.data[2 * self.C:].mul_(init_adaln)
                block.ada_lin[-1].weight.data[:2 * self.C].mul_(init_adaln_gamma)
                block.ada_lin[-1].bias.data.zero_()

    def no_weight_decay(self) -> set[str]:
        """Names of the matrices the release trains without weight decay (besides every 1-D tensor
        and bias): position and level tables, the shared-adaLN offsets and attention temperatures
        (timm's hook for optimiser grouping)."""
        keys = ("pos_1LC", "pos_start", "lvl_embed", "ada_gss", "scale_mul")
        return {name for name, _ in self.named_parameters() if any(key in name for key in keys)}

    # ----------------------------------------------------------------- teacher-forced forward

    def get_logits(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(h_BLC.float(), cond_BD)).float()

    def forward(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor) -> torch.Tensor:
        """Logits (B, ed, V) of every token of the pyramid given the coarser scales (teacher forcing).

        ``label_B`` (B,) class labels, replaced by the null class with probability
        ``cond_drop_rate`` in training mode only. ``x_BLCv_wo_first_l`` (B, L - pn0², Cvae): the
        tokenizer's ``idxBl_to_var_input`` of the target pyramid. ``ed`` is L, or under progressive
        training (``prog_si >= 0``) the end of scale ``prog_si`` (longer inputs are cut to it).
        """
        ed = self.begin_ends[self.prog_si][1] if self.prog_si >= 0 else self.L
        B = x_BLCv_wo_first_l.shape[0]
        with torch.autocast(x_BLCv_wo_first_l.device.type, enabled=False):
            if self.training and self.cond_drop_rate > 0:
                dropped = torch.rand(B, device=label_B.device) < self.cond_drop_rate
                label_B = torch.where(dropped, self.num_classes, label_B)
            cond_BD = self.class_emb(label_B)
            sos_BlC = cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
            if ed > self.first_l:
                tokens_BlC = self.word_embed(x_BLCv_wo_first_l[:, :ed - self.first_l].float())
                x_BLC = torch.cat((sos_BlC, tokens_BlC), dim=1)
            else:
                x_BLC = sos_BlC
            lvl_pos_1LC = self.lvl_embed(self.lvl_1L[:, :ed]) + self.pos_1LC[:, :ed]
            x_BLC = x_BLC + lvl_pos_1LC
        last_scale = self.prog_si if self.prog_si >= 0 else len(self.patch_nums) - 1
        chunks = block_causal_chunks(self.patch_nums, last_scale, group_below=self.L // 4)
        attn_mask = self.attn_bias_for_masking[:, :, :chunks[0][1], :chunks[0][1]]
        cond_BD_or_gss = self.shared_ada_lin(cond_BD)
        if torch.is_autocast_enabled(x_BLC.device.type):
            dtype = torch.get_autocast_dtype(x_BLC.device.type)
            x_BLC, cond_BD_or_gss, attn_mask = x_BLC.to(dtype), cond_BD_or_gss.to(dtype), attn_mask.to(dtype)
        for block in self.blocks:
            x_BLC = call_block(block, x_BLC, block.modulation(cond_BD_or_gss), attn_mask=attn_mask, chunks=chunks,
                               checkpointing=self.checkpoint_activations)
        logits_BLV = self.get_logits(x_BLC, cond_BD)
        if ed == self.first_l:
            # The word embedding sees no input at the first stage; touch it so DDP finds its gradient.
            logits_BLV = logits_BLV + (self.word_embed.weight[0, 0] + self.word_embed.bias[0]) * 0
        return logits_BLV

    # ----------------------------------------------------------------- training

    def set_step(self, step: int, max_steps: int) -> None:
        """Set progressive training for optimizer step ``step`` (0-based) of ``max_steps``.

        A pure function of the step: the stage ``prog_si`` follows train.py's schedule and
        ``prog_wp``, the loss weight of a stage's newest scale, ramps from 0.01 to 1 over the
        stage's first ``pgwp · max_steps`` steps (not at the first stage, nor once every scale is
        trained, which sets ``prog_si = -1``). Without progressive training (``pg = 0``) a no-op.
        """
        cfg = self.config
        if cfg.pg <= 0:
            self.prog_si, self.prog_wp = -1, 1.0
            return
        SN = len(self.patch_nums)
        wp = cfg.wp or 1 / 50

        def stage(s: int) -> int:
            return progressive_stage(s, max_steps, SN, cfg.pg, cfg.pg0, wp)

        si = stage(step)
        lo, hi = 0, step  # the first step of this stage (stages never decrease)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if stage(mid) < si else (lo, mid)
        steps_in_stage = step - lo + 1
        ramp_steps = (cfg.pgwp or 1 / 300) * max_steps
        if si == stage(0) or ramp_steps <= 0:
            self.prog_wp = 1.0
        else:
            self.prog_wp = max(min(steps_in_stage / ramp_steps, 1.0), 0.01)
        self.prog_si = -1 if si == SN - 1 else si

    def loss(self, tokens: tuple[torch.Tensor, torch.Tensor], cond: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy of the teacher-forced logits against the target pyramid.

        ``tokens`` = (``gt_BL`` (B, L) indices of all scales concatenated, ``x_BLCv_wo_first_l``
        (B, L - pn0², Cvae)); ``cond`` (B,) labels. ``loss`` sums the label-smoothed per-token
        cross-entropy weighted by ``loss_weighting`` (under progressive training the newest scale's
        weights are multiplied by ``prog_wp``) and averages over the batch. Logged, without label
        smoothing and gradient: ``ce_mean`` and ``acc_mean`` (% of tokens whose argmax is right)
        over the trained tokens, and ``ce_tail`` over the last trained scale.
        """
        gt_BL, x_BLCv_wo_first_l = tokens
        bg, ed = self.begin_ends[self.prog_si] if self.prog_si >= 0 else (self.begin_ends[-1][0], self.L)
        if gt_BL.ndim != 2 or gt_BL.shape[1] not in (ed, self.L):
            raise ValueError(f"VAR.loss: expected gt_BL of shape (B, {self.L}) (all scales of patch_nums "
                             f"{self.patch_nums} concatenated), got {tuple(gt_BL.shape)}")
        logits_BLV = self(cond, x_BLCv_wo_first_l)
        gt_BL = gt_BL[:, :ed]
        # One log-softmax gives both the smoothed loss and the plain cross-entropy (what
        # F.cross_entropy(label_smoothing=...) computes, without a second pass for logging).
        logp_BLV = logits_BLV.float().log_softmax(dim=-1)
        nll_BL = -logp_BLV.gather(2, gt_BL.unsqueeze(2)).squeeze(2)
        eps = self.config.label_smooth
        ce_BL = (1 - eps) * nll_BL - eps * logp_BLV.mean(dim=-1) if eps > 0 else nll_BL
        weight_1L = self.loss_weight_1L[:, :ed]
        if self.prog_si >= 0 and self.prog_wp != 1.0:
            weight_1L = weight_1L.clone()
            weight_1L[:, bg:ed] *= min(max(self.prog_wp, 0.0), 1.0)
        loss = ce_BL.mul(weight_1L).sum(dim=-1).mean()
        with torch.no_grad():
            nll_BL = nll_BL.detach()
            correct_BL = logits_BLV.detach().argmax(dim=-1) == gt_BL
            return {
                "loss": loss,
                "ce_mean": nll_BL.mean(),
                "ce_tail": nll_BL[:, bg:].mean(),
                "acc_mean": correct_BL.float().mean() * 100,
            }

    # ----------------------------------------------------------------- inference

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, *, tokenizer: nn.Module | None = None,
               generator: torch.Generator | None = None, cfg_scale: float = 1.5, top_k: int = 0,
               top_p: float = 0.0, more_smooth: bool = False) -> torch.Tensor:
        """Generate images for labels ``cond`` (B,) scale by scale with a KV cache; returns
        ``f_hat`` (B, Cvae, pn_last, pn_last), which ``tokenizer.decode`` turns into images.

        Classifier-free guidance ramps with the scale: at scale si of SN, t = cfg_scale·si/(SN−1)
        and logits = (1+t)·cond − t·uncond (``cfg_scale=0``: no guidance, and no unconditional
        pass). ``top_k``/``top_p`` filter the logits (0 disables); ``more_smooth`` feeds
        Gumbel-softmax mixtures of embeddings back instead of the sampled ones (the release's
        visualisation trick). All randomness comes from ``generator``. ``tokenizer`` defaults to
        the attached one.
        """
        return self.sample_tokens(cond, tokenizer=tokenizer, generator=generator, cfg_scale=cfg_scale, top_k=top_k,
                                  top_p=top_p, more_smooth=more_smooth)[0]

    @torch.no_grad()
    def sample_tokens(self, cond: torch.Tensor, *, tokenizer: nn.Module | None = None,
                      generator: torch.Generator | None = None, cfg_scale: float = 1.5, top_k: int = 0,
                      top_p: float = 0.0, more_smooth: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """:meth:`sample` that also returns the sampled index pyramid: one (B, pn²) LongTensor per scale."""
        quantize = self.sampling_tokenizer(tokenizer).quantize
        device = self.pos_1LC.device
        label_B = cond.to(device)
        B, SN, C = label_B.shape[0], len(self.patch_nums), self.C
        guided = cfg_scale != 0
        rows = 2 * B if guided else B  # without guidance the unconditional half is never used
        if guided:
            label_B = torch.cat((label_B, torch.full_like(label_B, self.num_classes)))
        cond_BD = self.class_emb(label_B)
        lvl_pos_1LC = self.lvl_embed(self.lvl_1L) + self.pos_1LC
        next_BlC = (cond_BD.unsqueeze(1).expand(rows, self.first_l, -1) + self.pos_start.expand(rows, self.first_l, -1)
                    + lvl_pos_1LC[:, :self.first_l])
        # The condition is the same at every scale: modulate once, not once per scale and block.
        cond_BD_or_gss = self.shared_ada_lin(cond_BD)
        modulations = [block.modulation(cond_BD_or_gss) for block in self.blocks]
        head_scale, head_shift = self.head_nm.ada_lin(cond_BD).view(-1, 1, 2, C).unbind(2)
        caches = [KVCache(rows, self.num_heads, self.L, C // self.num_heads, like=next_BlC) for _ in self.blocks]
        embedding_VC = quantize.embedding.weight
        f_hat = cond_BD.new_zeros(B, self.Cvae, self.patch_nums[-1], self.patch_nums[-1])
        idx_pyramid: list[torch.Tensor] = []
        cur_L = 0
        for si, pn in enumerate(self.patch_nums):
            ratio = si / self.num_stages_minus_1
            cur_L += pn * pn
            x_BlC = next_BlC
            for block, modulation, cache in zip(self.blocks, modulations, caches):
                x_BlC = block(x_BlC, modulation, cache=cache)
            h_BlC = self.head_nm.ln_wo_grad(x_BlC.float()).mul(head_scale.add(1)).add_(head_shift)
            logits_BlV = self.head(h_BlC).float()
            if guided:
                t = cfg_scale * ratio
                logits_BlV = (1 + t) * logits_BlV[:B] - t * logits_BlV[B:]
            idx_Bl = sample_with_top_k_top_p_(logits_BlV, top_k=top_k, top_p=top_p, generator=generator)[:, :, 0]
            idx_pyramid.append(idx_Bl)
            if not more_smooth:
                h_BlCv = F.embedding(idx_Bl, embedding_VC)
            else:
                tau = max(0.27 * (1 - ratio * 0.95), 0.005)  # as MaskGIT
                h_BlCv = gumbel_softmax_with_rng(logits_BlV.mul(1 + ratio), tau=tau, dim=-1,
                                                 generator=generator) @ embedding_VC.unsqueeze(0)
            h_BCvhw = rearrange(h_BlCv, "b (h w) c -> b c h w", h=pn).contiguous()
            f_hat, next_BCvhw = quantize.get_next_autoregressive_input(si, SN, f_hat, h_BCvhw)
            if si != self.num_stages_minus_1:
                next_BlC = self.word_embed(rearrange(next_BCvhw, "b c h w -> b (h w) c"))
                next_BlC = next_BlC + lvl_pos_1LC[:, cur_L:cur_L + self.patch_nums[si + 1] ** 2]
                if guided:
                    next_BlC = next_BlC.repeat(2, 1, 1)
        return f_hat, idx_pyramid

    @torch.no_grad()
    def autoregressive_infer_cfg(self, B: int, label_B: int | torch.Tensor | None, g_seed: int | None = None,
                                 cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0,
                                 more_smooth: bool = False) -> torch.Tensor:
        """The release's entry point: B images in [0, 1] through the attached tokenizer.

        ``label_B``: labels (B,), one int for all (negative: the null class), or None for uniformly
        random classes drawn from the seeded generator. ``g_seed`` None uses the global RNG.
        """
        if self.tokenizer is None:
            raise ValueError("autoregressive_infer_cfg decodes with the attached tokenizer: call attach_tokenizer(tok)")
        device = self.pos_1LC.device
        generator = None if g_seed is None else torch.Generator(device=device).manual_seed(g_seed)
        if label_B is None:
            uniform_1K = torch.full((1, self.num_classes), 1.0 / self.num_classes, device=device)
            label_B = torch.multinomial(uniform_1K, num_samples=B, replacement=True, generator=generator).view(B)
        elif isinstance(label_B, int):
            label_B = torch.full((B,), self.num_classes if label_B < 0 else label_B, device=device)
        f_hat = self.sample(label_B, generator=generator, cfg_scale=cfg, top_k=top_k, top_p=top_p,
                            more_smooth=more_smooth)
        tokenizer = self.tokenizer
        images = tokenizer.fhat_to_img(f_hat) if hasattr(tokenizer, "fhat_to_img") else tokenizer.decode(f_hat)
        return images.add_(1).mul_(0.5)

    # ----------------------------------------------------------------- recipes

    @classmethod
    def check_fit(cls, config: VARConfig, fit: Fit) -> None:
        """Refuse a tokenizer or dataset that disagrees with the model's pyramid or classes (:mod:`zoo.fit`)."""
        check_token_pyramid(config, fit)
        check_classes(config, fit)

#################################################################################
#                                   VAR Configs                                 #
#################################################################################

# depth -> the release's sizes (width 64·depth, depth heads, drop path 0.1·depth/24):
# var_d16 … var_d30 at 256 px. d2 … d8 are zoo's CPU-sized variants of the same rule.
for _depth in (16, 20, 24, 30):
    register_generator(
        f"var-d{_depth}", config=VARConfig, defaults=dict(depth=_depth),
        description=f"VAR-d{_depth} (release): width {64 * _depth}, {_depth} heads, 10 scales up to 16x16",
    )(VAR)
for _depth in (2, 4, 6, 8):
    register_generator(
        f"var-d{_depth}", config=VARConfig, defaults=dict(depth=_depth),
        description=f"VAR-d{_depth} (small, for CPUs): width {64 * _depth}, {_depth} heads",
    )(VAR)
