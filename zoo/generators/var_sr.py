"""VAR-SR: next-scale prediction conditioned on a low-resolution image (VARSR, Qu et al., 2025).

The same blocks, sampler and KV cache as :mod:`zoo.generators.var` (one implementation), conditioned
differently:

- ``cond_mode: prefix`` (VARSR's design): the bicubic upsample of the LR image goes through a
  convolutional stem (``con_embedding``, stride 2^(len(stem_channels)−1)) to pn_last² **prefix
  tokens** placed before the start token; the block-causal mask gives the prefix and the start
  token level 0, so every scale sees the whole prefix and the prefix sees only itself.
- ``cond_mode: cross`` (the seed notes' design): the stem features are a memory that every block
  reads by **cross-attention** (``cross_blocks``); the start token is the class embedding plus the
  **pooled** LR features, and the pooled features are added to the shared adaLN condition.
- **Scale-aligned 2-D RoPE** instead of absolute positions: token (i, j) of a pn×pn map sits at
  (i/pn, j/pn)·``rope_grid`` (the release's grid 32), so tokens covering the same image region at
  different scales share phases; the prefix uses the last scale's grid.
- **Image-based CFG**: class 0 is "high quality", class ``num_classes − 1`` "low quality" (trained
  on low-quality targets, see the ``photos`` dataset's ``negative_rate``); sampling mixes the two,
  (1 + t)·positive − t·negative with t = cfg_scale·si/(SN − 1), as VAR.
- Optional **diffusion refiner** (``refiner: true``): MAR's per-token head (:mod:`zoo.nn.diffloss`,
  on the shared Gaussian backend) models the last scale's quantisation residual, conditioned on
  ``decoder_norm(h + word_embed(e(idx)))`` (h the last block's output, idx the argmax token);
  trained jointly, ``loss = ce + refiner_weight · diffusion`` (the release's 2.0).
- ``residual_gain > 0``: the tokens encode ``(HR − bicubic(LR))·gain`` (dataset ``target:
  residual``); :meth:`VARSR.finish_images` adds the bicubic upsample back.

Parameter names follow qyp2000/VARSR ``VAR_RoPE`` (``con_embedding.*``, ``class_emb`` without an
extra null row, ``pos_start`` over prefix + start token, ``lvl_embed``, ``blocks.*``,
``head_nm``, ``head``, ``decoder_norm``, ``diffloss.net.*``, buffers ``lvl_1L`` and
``attn_bias_for_masking``); :func:`varsr_state_dict` unwraps the trainer format
``['trainer']['var_wo_ddp']``. Differences from the release are listed in docs/var-sr.md.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import use_fused_attn
from torch import nn

from zoo.config import ConfigError
from zoo.data.photos import bicubic_upsample, compose_residual
from zoo.fit import Fit, FitError, check_token_pyramid
from zoo.generators.var import (
    AdaLNBeforeHead,
    AdaLNSelfAttn,
    KVCache,
    SamplesThroughMSVQ,
    SharedAdaLin,
    VARSizes,
    _Unowned,
    apply_rope,
    attend,
    filter_top_k_top_p,
    gumbel_softmax_with_rng,
    init_attention_scale,
    sample_with_top_k_top_p_,
    token_loss_weights,
)
from zoo.nn.diffloss import DiffLoss
from zoo.registry import register_generator


@dataclasses.dataclass
class VARSRConfig(VARSizes):
    """Fields of VARSR's ``VAR_RoPE`` constructor (sizes as VAR's ``build_vae_var``) plus zoo's
    conditioning, refiner and training options."""

    depth: int = 16
    embed_dim: int = 0  # 0: 64 * depth
    num_heads: int = 0  # 0: depth
    num_classes: int = 2  # class 0: high quality; class num_classes - 1: the low-quality CFG negative
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    vocab_size: int = 4096
    Cvae: int = 32
    image_channels: int = 3
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = -1.0  # < 0: 0.1 * depth / 24
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = True
    cond_mode: str = "prefix"  # prefix (VARSR) | cross (cross-attention to the LR features, pooled start token)
    stem_channels: tuple[int, ...] = (32, 128, 256, 512, 1536)  # con_embedding widths; stride 2^(len - 1)
    rope_grid: float = 32.0
    rope_theta: float = 10000.0
    refiner: bool = True
    refiner_depth: int = 6
    refiner_width: int = 1024
    refiner_weight: float = 2.0
    refiner_batch_mul: int = 4  # each residual token is noised this many times per step (diffusion_batch_mul)
    refiner_steps: str = "10"  # respacing of the refiner's sampler
    refiner_scale: float = 0.6  # the release's vae_scale: the head models residual / refiner_scale
    phi_last_scale: bool = True  # False: VARSR's VQVAE, whose last scale skips Φ
    residual_gain: float = 0.0  # > 0: the tokens encode (HR - bicubic(LR)) * gain (data.target: residual)
    mean_token_weight: float = 0.0  # > 0: also regress each token's expected code vector on the true code's
    label_smooth: float = 0.0
    loss_weighting: str = "uniform"
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5
    init_head: float = 0.02
    init_std: float = -1.0
    stem_init: str = "release"  # release: every stem conv ~ N(0, 0.02); kaiming: variance-preserving (see init_weights)

    CHOICES = {"cond_mode": ("prefix", "cross"), "loss_weighting": ("uniform", "per_scale"),
               "stem_init": ("release", "kaiming"), "image_channels": (1, 3)}

    def __post_init__(self):
        for name in ("depth", "Cvae", "refiner_depth", "refiner_width", "refiner_batch_mul"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2 (class 0 high quality, the last one the low-quality "
                              f"negative of image-based CFG), got {self.num_classes}")
        if self.width % self.heads or (self.width // self.heads) % 4:
            raise ConfigError(f"embed_dim {self.width} / num_heads {self.heads} must be a whole head width "
                              f"divisible by 4 (2-D rotary encoding)")
        pns = tuple(self.patch_nums)
        if len(pns) < 2 or pns[0] != 1 or any(a >= b for a, b in zip(pns, pns[1:])):
            raise ConfigError(f"patch_nums must start at 1 (the start token) and increase strictly, got {pns}")
        if len(self.stem_channels) < 2 or min(self.stem_channels) < 1:
            raise ConfigError(f"stem_channels must list at least two positive widths, got {self.stem_channels}")
        for name in ("drop_rate", "attn_drop_rate", "label_smooth"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.residual_gain < 0 or self.refiner_weight < 0 or self.refiner_scale <= 0 or self.mean_token_weight < 0:
            raise ConfigError(f"residual_gain, refiner_weight and mean_token_weight must be >= 0 and "
                              f"refiner_scale > 0; got {self.residual_gain}, {self.refiner_weight}, "
                              f"{self.mean_token_weight} and {self.refiner_scale}")

    @property
    def stem_stride(self) -> int:
        return 2 ** (len(self.stem_channels) - 1)


#################################################################################
#                         Conditioning and positions                            #
#################################################################################


def scale_aligned_rope(head_dim: int, patch_nums, grid: float = 32.0, theta: float = 10000.0) -> torch.Tensor:
    """VARSR's ``precompute_freqs_cis``: for each pn×pn map in turn, token (i, j) gets phases
    (i/pn·grid)·f and (j/pn·grid)·f for the head_dim/4 frequencies f = theta^(−4k/head_dim).
    Returns (cos, sin) stacked as float32 (sum pn², head_dim/2, 2); the first head_dim/4 channel
    pairs rotate with the row, the others with the column."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim))
    rows, cols = [], []
    for pn in patch_nums:
        i, j = torch.meshgrid(torch.arange(pn), torch.arange(pn), indexing="ij")
        rows.append(i.flatten() / pn * grid)
        cols.append(j.flatten() / pn * grid)
    angles = torch.cat((torch.outer(torch.cat(rows), freqs), torch.outer(torch.cat(cols), freqs)), dim=1)
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


def as_complex(rope_Lc2: torch.Tensor) -> torch.Tensor:
    return torch.view_as_complex(rope_Lc2.float().contiguous())


class ConditioningEmbedding(nn.Module):
    """The release's ``ControlNetConditioningEmbedding``: conv3x3, then per width a conv3x3 and a
    stride-2 conv3x3, SiLU after each, and a conv3x3 to the model width. (B, C, H, W) -> (B, D, H/s, W/s)."""

    def __init__(self, out_channels: int, in_channels: int, block_out_channels):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(block_out_channels, block_out_channels[1:]):
            self.blocks.append(nn.Conv2d(c_in, c_in, kernel_size=3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(block_out_channels[-1], out_channels, kernel_size=3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(images))
        for block in self.blocks:
            h = F.silu(block(h))
        return self.conv_out(h)


class CrossAttention(nn.Module):
    """Cross-attention with the release's ``CrossAttention_RoPE`` names (``mat_q``, ``mat_kv``,
    ``q_bias``, ``v_bias``, ``zero_k_bias``, ``proj``, cosine attention with ``scale_mul_1H11``);
    queries and memory keys carry their own rotary phases."""

    def __init__(self, embed_dim: int, num_heads: int, attn_l2_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        init_attention_scale(self, num_heads, attn_l2_norm)
        self.mat_q = nn.Linear(embed_dim, embed_dim, bias=False)
        self.mat_kv = nn.Linear(embed_dim, embed_dim * 2, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(embed_dim)), nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.ln_wo_grad = nn.LayerNorm(embed_dim, elementwise_affine=False)
        self.fused_attn = use_fused_attn()

    def memory(self, mem_BMC: torch.Tensor, rope_Mc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, M, c) of the memory, computed once per forward or per sampling run."""
        B, M, C = mem_BMC.shape
        kv = F.linear(mem_BMC, self.mat_kv.weight, torch.cat((self.zero_k_bias, self.v_bias)))
        k, v = rearrange(kv, "b m (two h c) -> two b h m c", two=2, h=self.num_heads).unbind(0)
        if self.attn_l2_norm:
            k = F.normalize(k, dim=-1)
        return apply_rope(k, rope_Mc), v

    def forward(self, x_BLC: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                rope_Lc: torch.Tensor) -> torch.Tensor:
        B, L, C = x_BLC.shape
        q = rearrange(F.linear(self.ln_wo_grad(x_BLC), self.mat_q.weight, self.q_bias), "b l (h c) -> b h l c",
                      h=self.num_heads)
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
        k, v = kv
        q = apply_rope(q, rope_Lc)
        out = attend(q, k.to(q.dtype), v.to(q.dtype), None, self.scale, 0.0, self.fused_attn)
        return x_BLC + self.proj(rearrange(out, "b h l c -> b l (h c)"))


#################################################################################
#                                  VAR-SR                                       #
#################################################################################


class VARSR(SamplesThroughMSVQ, nn.Module):
    """Next-scale prediction of an HR token pyramid given an LR image; see the module docstring.

    ``cond`` everywhere is the LR image (B, C, h, w) in [-1, 1] or a dict ``{"lr": …, "label": …}``
    (labels default to 0, "high quality"). The model's HR side is ``patch_nums[-1]`` times the
    stem's stride (= the tokenizer's); LR inputs of any side are bicubic-upsampled to it.
    """

    OBJECTIVES = ()
    TOKENIZER_KIND = "discrete"

    def __init__(self, config: VARSRConfig, objective=None):
        super().__init__()
        if objective is not None:
            raise ConfigError("var-sr takes no objective section (its refiner carries its own diffusion head)")
        self.config = config
        self.Cvae, self.V = config.Cvae, config.vocab_size
        self.depth, self.C, self.D, self.num_heads = config.depth, config.width, config.width, config.heads
        self.num_classes = config.num_classes
        self.patch_nums = tuple(config.patch_nums)
        self.prefix = config.cond_mode == "prefix"
        self.L = sum(pn ** 2 for pn in self.patch_nums)
        self.last_l = self.patch_nums[-1] ** 2
        self.num_prefix = self.last_l if self.prefix else 0
        self.first_l = self.num_prefix + 1  # prefix tokens + the start token (scale 0)
        self.T = self.num_prefix + self.L  # sequence length
        self.image_size = self.patch_nums[-1] * config.stem_stride
        self.num_stages_minus_1 = len(self.patch_nums) - 1
        self._tokenizer = _Unowned(None)

        C = self.C
        init_std = math.sqrt(1 / C / 3)
        self.con_embedding = ConditioningEmbedding(C, config.image_channels, tuple(config.stem_channels))
        self.word_embed = nn.Linear(self.Cvae, C)
        self.class_emb = nn.Embedding(self.num_classes, C)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        for table in (self.class_emb.weight, self.pos_start, self.lvl_embed.weight):
            nn.init.trunc_normal_(table.data, mean=0, std=init_std)
        self.shared_ada_lin = (nn.Sequential(nn.SiLU(), SharedAdaLin(self.D, 6 * C)) if config.shared_aln
                               else nn.Identity())
        rates = torch.linspace(0, config.drop_path, config.depth).tolist()
        self.blocks = nn.ModuleList([
            AdaLNSelfAttn(C, self.D, self.num_heads, shared_aln=config.shared_aln, norm_eps=config.norm_eps,
                          mlp_ratio=config.mlp_ratio, drop=config.drop_rate, attn_drop=config.attn_drop_rate,
                          drop_path=rates[i], attn_l2_norm=config.attn_l2_norm)
            for i in range(config.depth)])
        if not self.prefix:
            self.cross_blocks = nn.ModuleList([CrossAttention(C, self.num_heads, config.attn_l2_norm)
                                               for _ in range(config.depth)])

        # Level of every position (the prefix and the start token are level 0) and the block-causal
        # mask over levels; persistent, as in the release's checkpoints.
        lvl_T = torch.cat([torch.zeros(self.first_l, dtype=torch.long)]
                          + [torch.full((pn * pn,), si) for si, pn in enumerate(self.patch_nums) if si > 0])
        self.register_buffer("lvl_1L", lvl_T.view(1, self.T))
        mask = torch.where(lvl_T.view(-1, 1) >= lvl_T.view(1, -1), 0.0, -torch.inf)
        self.register_buffer("attn_bias_for_masking", mask.view(1, 1, self.T, self.T))
        rope_pns = ((self.patch_nums[-1],) if self.prefix else ()) + self.patch_nums
        self.register_buffer("rope_T2", scale_aligned_rope(C // self.num_heads, rope_pns, config.rope_grid,
                                                           config.rope_theta), persistent=False)
        if not self.prefix:
            self.register_buffer("rope_mem", scale_aligned_rope(C // self.num_heads, (self.patch_nums[-1],),
                                                                config.rope_grid, config.rope_theta), persistent=False)
        self.register_buffer("loss_weight_1L", token_loss_weights(self.patch_nums, config.loss_weighting),
                             persistent=False)

        self.head_nm = AdaLNBeforeHead(C, self.D, config.norm_eps)
        self.head = nn.Linear(C, self.V)
        if config.refiner:
            self.decoder_norm = nn.LayerNorm(C, eps=config.norm_eps)
            self.diffloss = DiffLoss(target_channels=self.Cvae, z_channels=C, depth=config.refiner_depth,
                                     width=config.refiner_width, num_sampling_steps=config.refiner_steps)
        self.init_weights()

    def init_weights(self) -> None:
        """The release's ``init_weights`` (truncated-normal linears, embeddings and convs, adaLN and
        head scaled down, residual projections by 1/sqrt(2·depth)); the refiner keeps MAR's init."""
        cfg = self.config
        init_std = cfg.init_std if cfg.init_std >= 0 else (1 / self.C / 3) ** 0.5
        for name, m in self.named_modules():
            if name.startswith("diffloss"):
                continue
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight.data, std=init_std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.data.zero_()
            elif isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight.data, std=0.02)
                m.bias.data.zero_()
        if cfg.stem_init == "kaiming":
            # The release's std 0.02 shrinks the signal ~3x per stem conv: at init the LR features are
            # ~1e-5 against a position table of ~0.07, and the transformer sees next to nothing of the
            # LR image until the stem has grown, which a short CPU run never gives it (docs/var-sr.md).
            convs = [c for c in self.con_embedding.modules() if isinstance(c, nn.Conv2d)]
            for conv in convs:
                last = conv is convs[-1]  # SiLU follows every conv but the last
                nn.init.kaiming_normal_(conv.weight.data, nonlinearity="linear" if last else "relu")
                conv.bias.data.zero_()
        if cfg.init_head >= 0:
            self.head.weight.data.mul_(cfg.init_head)
            self.head.bias.data.zero_()
        self.head_nm.ada_lin[-1].weight.data.mul_(cfg.init_adaln)
        self.head_nm.ada_lin[-1].bias.data.zero_()
        crosses = self.cross_blocks if not self.prefix else [None] * self.depth
        for block, cross in zip(self.blocks, crosses):
            block.attn.proj.weight.data.div_(math.sqrt(2 * self.depth))
            block.ffn.fc2.weight.data.div_(math.sqrt(2 * self.depth))
            if cross is not None:
                cross.proj.weight.data.div_(math.sqrt(2 * self.depth))
            if block.shared_aln:
                block.ada_gss.data[:, :, 2:].mul_(cfg.init_adaln)
                block.ada_gss.data[:, :, :2].mul_(cfg.init_adaln_gamma)
            else:
                block.ada_lin[-1].weight.data[2 * self.C:].mul_(cfg.init_adaln)
                block.ada_lin[-1].weight.data[:2 * self.C].mul_(cfg.init_adaln_gamma)
                block.ada_lin[-1].bias.data.zero_()

    def no_weight_decay(self) -> set[str]:
        keys = ("pos_start", "lvl_embed", "ada_gss", "scale_mul")
        return {name for name, _ in self.named_parameters() if any(key in name for key in keys)}

    # ----------------------------------------------------------------- conditioning

    def split_cond(self, cond) -> tuple[torch.Tensor, torch.Tensor]:
        """(lr (B, C, h, w), label (B,)) from an LR tensor or a ``{"lr", "label"}`` dict."""
        if isinstance(cond, dict):
            if "lr" not in cond:
                raise ValueError(f"var-sr: the condition dict needs key 'lr' (the low-resolution images); "
                                 f"got keys {sorted(cond)}")
            lr, label = cond["lr"], cond.get("label")
        else:
            lr, label = cond, None
        if not torch.is_tensor(lr) or lr.ndim != 4 or lr.shape[1] != self.config.image_channels:
            shape = tuple(lr.shape) if torch.is_tensor(lr) else type(lr).__name__
            raise ValueError(f"var-sr: expected low-resolution images (B, {self.config.image_channels}, h, w) in "
                             f"[-1, 1], got {shape} (to upscale image files use zoo-upscale)")
        device = self.pos_start.device
        if label is None:
            label = torch.zeros(lr.shape[0], dtype=torch.long, device=device)
        return lr.to(device), label.to(device).long()

    def lr_features(self, lr: torch.Tensor) -> torch.Tensor:
        """LR images -> stem features (B, pn_last², C) of their bicubic upsample to the model's HR side."""
        up = bicubic_upsample(lr, (self.image_size, self.image_size))
        return self.con_embedding(up).flatten(2).transpose(1, 2)

    def _start(self, lr_BlC: torch.Tensor, label_B: torch.Tensor):
        """The first tokens (B, first_l, C), the adaLN condition (B, D) and, in cross mode, the memory."""
        B = lr_BlC.shape[0]
        cond_BD = self.class_emb(label_B)
        if self.prefix:
            sos = torch.cat((lr_BlC, cond_BD.unsqueeze(1)), dim=1)
        else:
            cond_BD = cond_BD + lr_BlC.mean(dim=1)  # the pooled start token also conditions adaLN
            sos = cond_BD.unsqueeze(1)
        first = sos + self.pos_start.expand(B, -1, -1) + self.lvl_embed(self.lvl_1L[:, :self.first_l])
        return first, cond_BD

    def _memories(self, lr_BlC: torch.Tensor) -> list:
        if self.prefix:
            return [None] * self.depth
        rope = as_complex(self.rope_mem)
        return [cross.memory(lr_BlC, rope) for cross in self.cross_blocks]

    def _run_blocks(self, x_BLC, cond_BD, memories, rope, *, attn_mask=None, caches=None, modulations=None,
                    q_rope=None):
        crosses = self.cross_blocks if not self.prefix else [None] * self.depth
        caches = caches or [None] * self.depth
        cond_or_gss = self.shared_ada_lin(cond_BD) if modulations is None else None
        for i, (block, cross) in enumerate(zip(self.blocks, crosses)):
            modulation = modulations[i] if modulations is not None else block.modulation(cond_or_gss)
            x_BLC = block(x_BLC, modulation, attn_mask=attn_mask, cache=caches[i], rope=rope)
            if cross is not None:
                x_BLC = cross(x_BLC, memories[i], q_rope if q_rope is not None else rope)
        return x_BLC

    # ----------------------------------------------------------------- teacher-forced forward

    def forward_hidden(self, x_BLCv_wo_first_l: torch.Tensor, label_B: torch.Tensor, lr: torch.Tensor):
        """(logits (B, L, V) of every scale, hidden states (B, pn_last², C) of the last scale, adaLN cond)."""
        lr_BlC = self.lr_features(lr.float())
        first, cond_BD = self._start(lr_BlC, label_B)
        tokens = self.word_embed(x_BLCv_wo_first_l.float()) + self.lvl_embed(self.lvl_1L[:, self.first_l:])
        x_BLC = torch.cat((first, tokens), dim=1)
        rope = as_complex(self.rope_T2)
        mask = self.attn_bias_for_masking
        if torch.is_autocast_enabled(x_BLC.device.type):
            dtype = torch.get_autocast_dtype(x_BLC.device.type)
            x_BLC, mask = x_BLC.to(dtype), mask.to(dtype)
        x_BLC = self._run_blocks(x_BLC, cond_BD, self._memories(lr_BlC), rope, attn_mask=mask)
        h_BLC = x_BLC[:, self.num_prefix:]
        logits_BLV = self.head(self.head_nm(h_BLC.float(), cond_BD)).float()
        return logits_BLV, h_BLC[:, -self.last_l:], cond_BD

    def forward(self, x_BLCv_wo_first_l: torch.Tensor, label_B: torch.Tensor, lr_inp: torch.Tensor) -> torch.Tensor:
        """The release's forward order: teacher-forcing input (B, L − 1, Cvae), labels (B,), LR images
        (B, C, h, w) in [-1, 1] -> logits (B, L, V)."""
        return self.forward_hidden(x_BLCv_wo_first_l, label_B, lr_inp)[0]

    # ----------------------------------------------------------------- training


    @torch.no_grad()
    def training_inputs(self, tokenizer: nn.Module, images: torch.Tensor):
        """What the trainer feeds :meth:`loss` (it calls this instead of ``tokenizer.training_inputs``):
        ``(gt_BL, x_BLCv_wo_first_l, rest_BlCv)``, where ``rest_BlCv`` (B, pn_last², Cvae) is the
        residual the last scale quantises (f minus f_hat after the other scales)."""
        if tokenizer is not self.tokenizer:
            self.attach_tokenizer(tokenizer)
        quantize = tokenizer.quantize
        tokenizer._check_images(images)
        f_BChw = tokenizer.quant_conv(tokenizer.encoder(images)).float()
        idx_Bl = quantize.f_to_idxBl_or_fhat(f_BChw, to_fhat=False)
        x_BLCv_wo_first_l = quantize.idxBl_to_var_input(idx_Bl)
        ms_h = [rearrange(quantize.embedding(idx), "b (h w) c -> b c h w", h=p).contiguous()
                for idx, p in zip(idx_Bl[:-1], self.patch_nums)]
        f_hat_before_last = quantize.embed_to_fhat(ms_h, all_to_max_scale=True, last_one=True)
        rest_BlCv = rearrange(f_BChw - f_hat_before_last, "b c h w -> b (h w) c").contiguous()
        return torch.cat(idx_Bl, dim=1), x_BLCv_wo_first_l, rest_BlCv

    def last_scale_embedding(self, idx_Bl: torch.Tensor) -> torch.Tensor:
        """What the last scale adds to f_hat for tokens (B, pn²): Φ(e(idx)) or, with
        ``phi_last_scale: false`` (VARSR's VQVAE), e(idx); returned as (B, pn², Cvae)."""
        quantize = self.tokenizer.quantize
        pn = self.patch_nums[-1]
        e_BlCv = quantize.embedding(idx_Bl)
        if not self.config.phi_last_scale:
            return e_BlCv
        phi = quantize.phi_for_scale(self.num_stages_minus_1, len(self.patch_nums))
        e_BCvhw = phi(rearrange(e_BlCv, "b (h w) c -> b c h w", h=pn).contiguous())
        return rearrange(e_BCvhw, "b c h w -> b (h w) c")

    def refiner_condition(self, h_BlC: torch.Tensor, idx_Bl: torch.Tensor) -> torch.Tensor:
        """decoder_norm(h + word_embed(e(idx))): the refiner's per-token condition (B, pn², C)."""
        e_BlCv = self.tokenizer.quantize.embedding(idx_Bl)
        return self.decoder_norm(h_BlC.float() + self.word_embed(e_BlCv.float()))

    def loss(self, inputs, cond) -> dict[str, torch.Tensor]:
        """Cross-entropy over the HR pyramid (plus ``refiner_weight`` × the refiner's diffusion loss).

        ``inputs``: ``(gt_BL, x_BLCv_wo_first_l[, rest_BlCv])`` (:meth:`training_inputs`);
        ``cond``: LR images or the ``photos`` dataset's ``{"lr", "label"}``. The refiner learns
        ``rest − Φ(e(argmax))``: what the last scale leaves of the residual when its most likely
        tokens are drawn (the release's choice, so it sees the tokens inference will give it).
        """
        gt_BL, x_BLCv_wo_first_l, *rest = inputs
        if gt_BL.ndim != 2 or gt_BL.shape[1] != self.L:
            raise ValueError(f"var-sr: expected gt_BL of shape (B, {self.L}), got {tuple(gt_BL.shape)}")
        lr, label = self.split_cond(cond)
        logits_BLV, h_BlC, _ = self.forward_hidden(x_BLCv_wo_first_l, label, lr)
        logp_BLV = logits_BLV.log_softmax(dim=-1)
        nll_BL = -logp_BLV.gather(2, gt_BL.unsqueeze(2)).squeeze(2)
        eps = self.config.label_smooth
        ce_BL = (1 - eps) * nll_BL - eps * logp_BLV.mean(dim=-1) if eps > 0 else nll_BL
        ce = ce_BL.mul(self.loss_weight_1L).sum(dim=-1).mean()
        terms = {"ce": ce.detach()}
        loss = ce
        if (self.config.mean_token_weight > 0 or self.config.refiner) and self.tokenizer is None:
            raise ValueError("var-sr with mean_token_weight > 0 or refiner: true needs the tokenizer's codebook: "
                             "call attach_tokenizer or training_inputs")
        if self.config.mean_token_weight > 0:
            # What mean_tokens decoding adds at each position is the expected code vector; cross-entropy
            # only rewards the true code's probability, this term rewards mass on codes near it.
            embedding_VC = self.tokenizer.quantize.embedding.weight.detach().float()
            expected_BLC = logp_BLV.exp() @ embedding_VC
            sq_BL = (expected_BLC - F.embedding(gt_BL, embedding_VC)).pow(2).sum(dim=-1)
            mean_token = sq_BL.mul(self.loss_weight_1L).sum(dim=-1).mean()
            loss = loss + self.config.mean_token_weight * mean_token
            terms["mean_token"] = mean_token.detach()
        if self.config.refiner:
            if not rest:
                raise ValueError("var-sr with refiner: true needs the last scale's residual; the trainer gets it "
                                 "from VARSR.training_inputs")
            idx_Bl = logits_BLV[:, -self.last_l:].detach().argmax(dim=-1)
            target_BlCv = rest[0].float() - self.last_scale_embedding(idx_Bl).detach()
            z_BlC = self.refiner_condition(h_BlC, idx_Bl)
            mul = self.config.refiner_batch_mul
            target_NCv = target_BlCv.reshape(-1, self.Cvae).repeat(mul, 1) / self.config.refiner_scale
            diffusion = self.diffloss(target_NCv, z_BlC.reshape(-1, self.C).repeat(mul, 1))
            loss = loss + self.config.refiner_weight * diffusion
            terms["diffusion"] = diffusion.detach()
        with torch.no_grad():
            terms.update(acc_mean=(logits_BLV.argmax(-1) == gt_BL).float().mean() * 100,
                         acc_tail=(logits_BLV[:, -self.last_l:].argmax(-1) == gt_BL[:, -self.last_l:]).float().mean()
                         * 100)
        return {"loss": loss, **terms}

    # ----------------------------------------------------------------- inference

    @torch.no_grad()
    def sample(self, cond, *, tokenizer: nn.Module | None = None, generator: torch.Generator | None = None,
               cfg_scale: float = 0.0, top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False,
               temperature: float = 1.0, refine: bool = True, mean_tokens: bool = False,
               sampler: str = "ddpm") -> torch.Tensor:
        """f_hat (B, Cvae, pn_last, pn_last) of HR pyramids drawn for LR images ``cond``, scale by
        scale with a KV cache; ``tokenizer.decode`` then :meth:`finish_images` give the images.

        Image-based CFG: with ``cfg_scale != 0`` every row runs twice, with its label and with the
        low-quality class; logits = (1 + t)·positive − t·negative, t = cfg_scale·si/(SN − 1); the
        refiner mixes negative + t·(positive − negative) at the last scale (the release's call).
        ``top_k=1`` is greedy decoding.
        ``mean_tokens=True`` adds, at every scale, the expected code vector under the predicted
        distribution (after top-k/top-p filtering) instead of a drawn token's: the posterior mean of
        what the scale adds, which is what PSNR rewards (a drawn or greedy token is one guess; where
        the model is unsure the mean hedges between its guesses). The next scale is predicted from
        that mean, and the returned pyramid holds the argmax tokens.
        ``temperature`` scales the refiner's per-step noise; ``refine=False`` skips the refiner;
        ``sampler`` is the refiner's (``ddpm``, the release's; ``ddim``, ``dpm++2m``, ``unipc`` with
        ``refiner_steps`` steps). All randomness comes from ``generator``.
        """
        return self.sample_tokens(cond, tokenizer=tokenizer, generator=generator, cfg_scale=cfg_scale, top_k=top_k,
                                  top_p=top_p, more_smooth=more_smooth, temperature=temperature, refine=refine,
                                  mean_tokens=mean_tokens, sampler=sampler)[0]

    @torch.no_grad()
    def sample_tokens(self, cond, *, tokenizer: nn.Module | None = None, generator: torch.Generator | None = None,
                      cfg_scale: float = 0.0, top_k: int = 0, top_p: float = 0.0, more_smooth: bool = False,
                      temperature: float = 1.0, refine: bool = True, mean_tokens: bool = False,
                      sampler: str = "ddpm") -> tuple[torch.Tensor, list[torch.Tensor]]:
        """:meth:`sample` that also returns the sampled index pyramid: one (B, pn²) LongTensor per scale."""
        quantize = self.sampling_tokenizer(tokenizer).quantize
        lr, label_B = self.split_cond(cond)
        B, SN, C = lr.shape[0], len(self.patch_nums), self.C
        guided = cfg_scale != 0
        lr_BlC = self.lr_features(lr.float())
        if guided:
            lr_BlC = lr_BlC.repeat(2, 1, 1)
            label_B = torch.cat((label_B, torch.full_like(label_B, self.num_classes - 1)))
        rows = lr_BlC.shape[0]
        next_BlC, cond_BD = self._start(lr_BlC, label_B)
        memories = self._memories(lr_BlC)
        cond_or_gss = self.shared_ada_lin(cond_BD)
        modulations = [block.modulation(cond_or_gss) for block in self.blocks]
        head_scale, head_shift = self.head_nm.ada_lin(cond_BD).view(-1, 1, 2, C).unbind(2)
        caches = [KVCache(rows, self.num_heads, self.T, C // self.num_heads, like=next_BlC) for _ in self.blocks]
        rope = as_complex(self.rope_T2)
        embedding_VC = quantize.embedding.weight
        f_hat = next_BlC.new_zeros(B, self.Cvae, self.patch_nums[-1], self.patch_nums[-1]).float()
        cur, t = 0, 0.0
        idx_pyramid: list[torch.Tensor] = []
        for si, pn in enumerate(self.patch_nums):
            ratio = si / self.num_stages_minus_1
            length = next_BlC.shape[1]
            x_BlC = self._run_blocks(next_BlC, cond_BD, memories, rope[cur:cur + length], caches=caches,
                                     modulations=modulations)
            cur += length
            if si == 0:
                x_BlC = x_BlC[:, -1:]  # the start token predicts scale 0; the prefix predicts nothing
            h_BlC = self.head_nm.ln_wo_grad(x_BlC.float()).mul(head_scale.add(1)).add_(head_shift)
            logits_BlV = self.head(h_BlC).float()
            if guided:
                t = cfg_scale * ratio
                logits_BlV = mix_guidance(logits_BlV, t)
            if mean_tokens:
                probs_BlV = filter_top_k_top_p(logits_BlV, top_k=top_k, top_p=top_p).softmax(dim=-1)
                idx_Bl = probs_BlV.argmax(dim=-1)
            else:
                idx_Bl = sample_with_top_k_top_p_(logits_BlV, top_k=top_k, top_p=top_p, generator=generator)[:, :, 0]
            idx_pyramid.append(idx_Bl)
            if mean_tokens:
                h_BlCv = probs_BlV @ embedding_VC.float()
            elif not more_smooth:
                h_BlCv = F.embedding(idx_Bl, embedding_VC)
            else:
                tau = max(0.27 * (1 - ratio * 0.95), 0.005)
                h_BlCv = gumbel_softmax_with_rng(logits_BlV.mul(1 + ratio), tau=tau, dim=-1,
                                                 generator=generator) @ embedding_VC.unsqueeze(0)
            h_BCvhw = rearrange(h_BlCv, "b (h w) c -> b c h w", h=pn).contiguous()
            if si == self.num_stages_minus_1:
                if self.config.phi_last_scale:
                    f_hat, _ = quantize.get_next_autoregressive_input(si, SN, f_hat, h_BCvhw)
                else:
                    f_hat.add_(h_BCvhw)
                if self.config.refiner and refine:
                    f_hat.add_(self._refine(x_BlC, idx_Bl, guided, t, temperature, generator, sampler))
                break
            f_hat, next_BCvhw = quantize.get_next_autoregressive_input(si, SN, f_hat, h_BCvhw)
            next_BlC = self.word_embed(rearrange(next_BCvhw, "b c h w -> b (h w) c"))
            next_BlC = next_BlC + self.lvl_embed.weight[si + 1]
            if guided:
                next_BlC = next_BlC.repeat(2, 1, 1)
        return f_hat, idx_pyramid

    def _refine(self, x_BlC, idx_Bl, guided: bool, t: float, temperature: float, generator,
                sampler: str = "ddpm") -> torch.Tensor:
        """The refiner's residual (B, Cvae, pn, pn) for the last scale's hidden states and tokens."""
        B, pn = idx_Bl.shape[0], self.patch_nums[-1]
        if guided:
            idx_Bl = idx_Bl.repeat(2, 1)
        z_NC = self.refiner_condition(x_BlC, idx_Bl).reshape(-1, self.C)
        # As the release: MAR's head mixes uncond + t·(cond − uncond) with t = cfg_scale at the last scale
        # (so cfg_scale 1 leaves the refiner unguided), while the tokens take (1 + t)·cond − t·uncond.
        resid_NCv = self.diffloss.sample(z_NC, temperature=temperature, cfg=t if guided else 1.0,
                                         generator=generator, clip_denoised=True,
                                         sampler=sampler) * self.config.refiner_scale
        resid_BlCv = resid_NCv.reshape(-1, pn * pn, self.Cvae)[:B]
        return rearrange(resid_BlCv, "b (h w) c -> b c h w", h=pn).contiguous()

    def finish_images(self, images: torch.Tensor, cond) -> torch.Tensor:
        """Decoded images -> the SR result: with ``residual_gain`` the bicubic upsample of the LR plus
        the decoded residual / gain, otherwise the images themselves."""
        if self.config.residual_gain <= 0:
            return images
        lr, _ = self.split_cond(cond)
        return compose_residual(lr.to(images.device), images, self.config.residual_gain)

    # ----------------------------------------------------------------- recipes

    @classmethod
    def check_fit(cls, config: VARSRConfig, fit: Fit) -> None:
        """Refuse a tokenizer or dataset that does not fit this VAR-SR's config (:mod:`zoo.fit`)."""
        check_token_pyramid(config, fit, extra=(("image_channels", "image_channels"),))
        stride, data = fit.tokenizer.get("downsample"), fit.data
        if stride and stride != config.stem_stride:
            raise FitError("model.stem_channels", f"the stem's stride {config.stem_stride} (2^(len - 1)) must equal "
                                                  f"the tokenizer's {stride}")
        if "scale" not in data:
            raise FitError("data.name", "var-sr trains on low/high-resolution pairs; use data 'photos' or 'pairs'")
        want_gain = data["residual_gain"] if data.get("target") == "residual" else 0.0
        if config.residual_gain != want_gain:
            raise FitError("model.residual_gain", f"{config.residual_gain}, but the dataset's targets need "
                                                  f"{want_gain} (data.target {data.get('target')!r}, "
                                                  f"data.residual_gain {data.get('residual_gain')})")
        if data.get("num_classes") is not None and data["num_classes"] != config.num_classes:
            raise FitError("model.num_classes", f"{config.num_classes}, but the dataset labels {data['num_classes']} "
                                                f"qualities")
        if fit.cache_tokens:
            raise FitError("train.cache_tokens", "var-sr trains on random crops; nothing to cache")

def mix_guidance(logits_2BlV: torch.Tensor, t: float) -> torch.Tensor:
    """Image-based CFG: rows [positive; low-quality negative] -> (1 + t)·positive − t·negative."""
    B = logits_2BlV.shape[0] // 2
    return (1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]


def varsr_state_dict(checkpoint) -> dict[str, torch.Tensor]:
    """The VAR-SR weights inside a release file: ``VARSR.pth`` in the trainer format
    (``checkpoint['trainer']['var_wo_ddp']``), or a bare state dict."""
    if isinstance(checkpoint, dict) and "trainer" in checkpoint:
        trainer = checkpoint["trainer"]
        if not isinstance(trainer, dict) or "var_wo_ddp" not in trainer:
            raise KeyError(f"checkpoint['trainer'] has no 'var_wo_ddp' (keys: {sorted(trainer)[:10]})")
        return trainer["var_wo_ddp"]
    if not isinstance(checkpoint, dict):
        raise TypeError(f"expected a state dict or a trainer checkpoint dict, got {type(checkpoint).__name__}")
    return checkpoint


register_generator("var-sr", config=VARSRConfig,
                   description="VAR-SR (VARSR): next-scale prediction of an HR image from an LR one; prefix or "
                               "cross-attention conditioning, 2-D RoPE, image CFG, diffusion refiner")(VARSR)
for _depth in (2, 4, 6, 8, 16, 20, 24, 30):
    register_generator(f"var-sr-d{_depth}", config=VARSRConfig, defaults=dict(depth=_depth),
                       description=f"VAR-SR with depth {_depth}: width {64 * _depth}, {_depth} heads")(VARSR)
