"""Converting checkpoints of the original implementations into zoo model directories.

Every zoo family keeps the official parameter names, so converting is mostly *reading*: pick the
weights out of the checkpoint's layout, rename where the source is diffusers, and recover the
architecture from tensor shapes. What shapes cannot tell (the number of attention heads, mostly)
comes from the official size tables when the shapes match a released model, from ``overrides``
(``zoo-convert --set key=value``), or the conversion stops and says which field to give.

Formats (``FORMATS``):

===============  ==========  ===================================================================
format           kind        source
===============  ==========  ===================================================================
dit              generator   facebookresearch/DiT: ``DiT-XL-2-256x256.pt`` (bare) or a training
                             checkpoint ``{model, ema, opt, args}`` (``ema`` is used)
diffusers-dit    generator   a diffusers ``DiTTransformer2DModel`` folder (``transformer/`` of
                             ``facebook/DiT-XL-2-256``) or its weights file
meanflow         generator   haidog-yaqub/MeanFlow ``MFDiT`` state dict (``step_*.pt``)
var              generator   FoundationVision/VAR ``var_d16.pth`` … ``var_d30.pth``
var-sr           generator   qyp2000/VARSR ``VARSR.pth`` (``['trainer']['var_wo_ddp']``)
mar              generator   LTH14/mar ``checkpoint-last.pth`` (``model_ema``) or
                             ``mar-{base,large,huge}.safetensors``
kl-vae           tokenizer   an LDM-layout AutoencoderKL: MAR's ``kl16.ckpt``, SD checkpoints
diffusers-vae    tokenizer   a diffusers ``AutoencoderKL`` folder (``stabilityai/sd-vae-ft-ema``)
vqvae            tokenizer   VAR's ``vae_ch160v4096z32.pth``, VARSR's ``VQVAE.pth``
===============  ==========  ===================================================================

All pickles are read by :func:`zoo.hub.safe_load.load_checkpoint` (``weights_only=True``).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from zoo.config import ConfigError, config_to_dict
from zoo.hub.safe_load import load_checkpoint
from zoo.io import load_state_strict
from zoo.progress import progress_bar

GENERATOR_FORMATS = ("dit", "diffusers-dit", "meanflow", "var", "var-sr", "mar")
TOKENIZER_FORMATS = ("kl-vae", "diffusers-vae", "vqvae")
FORMATS = GENERATOR_FORMATS + TOKENIZER_FORMATS
# Training-checkpoint layouts, most preferred first (EMA weights are what the releases evaluate).
LAYOUT_KEYS = ("ema", "model_ema", "model", "state_dict", "module", "net")
NESTED_LAYOUTS = (("trainer", "var_wo_ddp"), ("trainer", "vae_local"))
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                     "diffusion_pytorch_model.fp16.safetensors")


@dataclass
class Converted:
    """A converted component: its ``config.json`` section (``{name, fields…}``) and the built module
    holding the source's weights."""

    kind: str  # "generator" or "tokenizer"
    section: dict[str, Any]
    module: torch.nn.Module
    source: str
    objective: dict[str, Any] | None = None  # a generator's objective section, when it has one


# ------------------------------------------------------------------------------------------------
# Reading sources
# ------------------------------------------------------------------------------------------------

def parse_overrides(items: list[str] | tuple[str, ...] | None) -> dict[str, Any]:
    """``["depth=12", "patch_nums=[1,2,4]", "tokenizer.scale_factor=0.2"]`` -> a dict; values are YAML."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected key=value, e.g. num_heads=16")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def pick_state_dict(obj, where: str, *, prefer_ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """The weights inside a loaded checkpoint and the layout they were found under: a bare state
    dict, ``ema``/``model_ema``/``model``/``state_dict``/…, or ``['trainer']['var_wo_ddp']``;
    DDP's ``module.`` and ``torch.compile``'s ``_orig_mod.`` prefixes are dropped."""
    layout = "bare state dict"
    if not _is_state_dict(obj):
        if not isinstance(obj, dict):
            raise ConfigError(f"{where}: expected a dict of weights, got {type(obj).__name__}")
        found = None
        keys = LAYOUT_KEYS if prefer_ema else tuple(k for k in LAYOUT_KEYS if "ema" not in k)
        for key in keys:
            if _is_state_dict(obj.get(key)):
                found, layout = obj[key], f"['{key}']"
                break
        for outer, inner in NESTED_LAYOUTS:
            if found is None and isinstance(obj.get(outer), dict) and _is_state_dict(obj[outer].get(inner)):
                found, layout = obj[outer][inner], f"['{outer}']['{inner}']"
        if found is None:
            raise ConfigError(f"{where}: no weights found; expected a state dict or one of the layouts "
                              f"{list(LAYOUT_KEYS)} or ['trainer']['var_wo_ddp'], got keys "
                              f"{sorted(map(str, obj))[:10]}")
        obj = found
    state = dict(obj)
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, layout


def _diffusers_folder(path: Path, sub: str) -> Path | None:
    """A diffusers model folder: ``path`` itself, or ``path/sub`` of a pipeline folder."""
    for folder in (path, path / sub):
        if folder.is_dir() and (folder / "config.json").is_file() and any((folder / n).is_file()
                                                                         for n in DIFFUSERS_WEIGHTS):
            return folder
    return None


def read_source(src: str | os.PathLike, *, where: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Weights of a checkpoint file (any layout of :func:`pick_state_dict`), safely loaded."""
    src = Path(src)
    state, layout = pick_state_dict(load_checkpoint(src), where or str(src))
    return state, f"{src} ({layout})"


# ------------------------------------------------------------------------------------------------
# Shape helpers
# ------------------------------------------------------------------------------------------------

class _Shapes:
    def __init__(self, state: dict[str, torch.Tensor], source: str, format: str):
        self.state, self.source, self.format = state, source, format

    def __call__(self, key: str) -> tuple[int, ...]:
        if key not in self.state:
            sample = sorted(self.state)[:6]
            raise ConfigError(f"{self.source}: no tensor {key!r}, so this is not a {self.format!r} checkpoint "
                              f"(its first keys: {sample}); check --format")
        return tuple(self.state[key].shape)

    def count(self, prefix: str) -> int:
        """Number of numbered children under ``prefix`` (``blocks.`` -> 28)."""
        indices = {int(k[len(prefix):].split(".")[0]) for k in self.state
                   if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()}
        if indices and indices != set(range(len(indices))):
            raise ConfigError(f"{self.source}: {prefix}* is not numbered 0..{len(indices) - 1}: {sorted(indices)}")
        return len(indices)


def _square_side(n: int, what: str, source: str) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ConfigError(f"{source}: {what} has {n} entries, not a square number of tokens")
    return side


def _need(fields: dict, key: str, source: str, why: str) -> None:
    if fields.get(key) is None:
        raise ConfigError(f"{source}: the weights do not tell {key} ({why}); give it with --set {key}=VALUE")


# ------------------------------------------------------------------------------------------------
# Generators
# ------------------------------------------------------------------------------------------------

def _dit_fields(shapes: _Shapes, overrides: dict, *, sizes: dict, prefix: str, input_size: int | None = None,
                y_table: str = "y_embedder.embedding_table.weight", null_row: bool = True) -> tuple[str, dict]:
    hidden, channels, patch, _ = shapes("x_embedder.proj.weight")
    depth = shapes.count("blocks.")
    if "pos_embed" in shapes.state:
        input_size = _square_side(shapes("pos_embed")[1], "pos_embed", shapes.source) * patch
    rows = shapes(y_table)[0]
    fields: dict[str, Any] = dict(input_size=overrides.get("input_size", input_size), patch_size=patch,
                                  in_channels=channels, hidden_size=hidden, depth=depth,
                                  mlp_ratio=shapes("blocks.0.mlp.fc1.weight")[0] / hidden,
                                  num_classes=rows - 1 if null_row else rows)
    _need(fields, "input_size", shapes.source, "the source stores no position table")
    name = None
    for size, (d, w, heads) in sizes.items():
        if (d, w) == (depth, hidden):
            fields["num_heads"] = heads
            name = f"{prefix}-{size}/{patch}"
    if "num_heads" not in overrides and "num_heads" not in fields:
        _need(fields, "num_heads", shapes.source, f"depth {depth} and width {hidden} match no released size")
    from zoo.registry import list_entries

    if name not in list_entries("generator"):
        name = sorted(n for n in list_entries("generator") if n.startswith(prefix + "-"))[0]
    return name, fields


def _infer_dit(state, source, overrides):
    from zoo.generators.dit import DIT_SIZES

    shapes = _Shapes(state, source, "dit")
    dropout = overrides.get("class_dropout_prob", 0.1)
    name, fields = _dit_fields(shapes, overrides, sizes=DIT_SIZES, prefix="dit", null_row=dropout > 0,
                               input_size=overrides.get("input_size"))
    out = shapes("final_layer.linear.weight")[0] // (fields["patch_size"] ** 2)
    fields["learn_sigma"] = out == 2 * fields["in_channels"]
    if out not in (fields["in_channels"], 2 * fields["in_channels"]):
        raise ConfigError(f"{source}: final_layer.linear predicts {out} channels per pixel for {fields['in_channels']} "
                          f"input channels; expected {fields['in_channels']} or {2 * fields['in_channels']}")
    fields["class_dropout_prob"] = dropout
    return name, fields


def _infer_meanflow(state, source, overrides):
    from zoo.generators.dit import DIT_SIZES

    shapes = _Shapes(state, source, "meanflow")
    return _dit_fields(shapes, overrides, sizes=DIT_SIZES, prefix="mfdit", y_table="y_embedder.embedding.weight")


# diffusers DiTTransformer2DModel -> facebookresearch/DiT names (the inverse of diffusers'
# scripts/convert_dit_to_diffusers.py). The timestep and class embedders are copied into every
# block there; block 0's copy is taken.
_DIFFUSERS_DIT_BLOCK = {
    "norm1.linear": "adaLN_modulation.1",
    "attn1.to_out.0": "attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}
_DIFFUSERS_DIT_TOP = {"pos_embed.proj": "x_embedder.proj", "proj_out_1": "final_layer.adaLN_modulation.1",
                      "proj_out_2": "final_layer.linear"}


def diffusers_dit_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers DiT state dict to the original names (q/k/v fused back into ``qkv``).
    Keys it does not know are kept, so strict loading names them."""
    out: dict[str, torch.Tensor] = {}
    emb = "transformer_blocks.0.norm1.emb."
    for key, tensor in state.items():
        if key.startswith("transformer_blocks."):
            index, rest = key[len("transformer_blocks."):].split(".", 1)
            if rest.startswith("norm1.emb."):
                if key.startswith(emb):
                    rest = rest[len("norm1.emb."):]
                    rest = (rest.replace("timestep_embedder.linear_1", "t_embedder.mlp.0")
                            .replace("timestep_embedder.linear_2", "t_embedder.mlp.2")
                            .replace("class_embedder.embedding_table", "y_embedder.embedding_table"))
                    out[rest] = tensor
                continue
            if rest.startswith(("attn1.to_q.", "attn1.to_k.", "attn1.to_v.")):
                param = rest.rsplit(".", 1)[1]
                parts = [state[f"transformer_blocks.{index}.attn1.to_{x}.{param}"] for x in "qkv"]
                out[f"blocks.{index}.attn.qkv.{param}"] = torch.cat(parts, dim=0)
                continue
            module, _, param = rest.rpartition(".")
            out[f"blocks.{index}.{_DIFFUSERS_DIT_BLOCK.get(module, module)}.{param}"] = tensor
        else:
            module, _, param = key.rpartition(".")
            out[f"{_DIFFUSERS_DIT_TOP.get(module, module)}.{param}"] = tensor
    return out


def _read_diffusers_dit(src: Path) -> tuple[dict[str, torch.Tensor], str, dict]:
    import json

    folder = _diffusers_folder(src, "transformer") if src.is_dir() else None
    config: dict = {}
    if folder is not None:
        config = json.loads((folder / "config.json").read_text())
        weights = next(folder / n for n in DIFFUSERS_WEIGHTS if (folder / n).is_file())
    elif src.is_file():
        weights = src
    else:
        raise ConfigError(f"{src}: not a diffusers DiT folder (config.json + {DIFFUSERS_WEIGHTS[0]}, in it or in "
                          f"its transformer/ folder) nor a weights file")
    state, layout = pick_state_dict(load_checkpoint(weights), str(weights))
    return diffusers_dit_to_official(state), f"{weights} ({layout})", config


def _var_trunk(shapes: _Shapes, overrides: dict, *, null_row: bool) -> dict[str, Any]:
    """Fields of VAR's transformer trunk (shared by VAR-SR): widths, depth, heads, classes, codebook."""
    width, cvae = shapes("word_embed.weight")
    depth = shapes.count("blocks.")
    rows = shapes("class_emb.weight")[0]
    fields: dict[str, Any] = dict(depth=depth, embed_dim=width, Cvae=cvae, vocab_size=shapes("head.weight")[0],
                                  num_classes=rows - 1 if null_row else rows,
                                  mlp_ratio=shapes("blocks.0.ffn.fc1.weight")[0] / width,
                                  shared_aln="shared_ada_lin.1.weight" in shapes.state,
                                  attn_l2_norm="blocks.0.attn.scale_mul_1H11" in shapes.state)
    if fields["attn_l2_norm"]:  # one learned temperature per head
        fields["num_heads"] = shapes("blocks.0.attn.scale_mul_1H11")[1]
    elif "num_heads" not in overrides:
        fields["num_heads"] = depth  # build_vae_var's rule: as many heads as blocks
    return fields


def _level_counts(shapes: _Shapes) -> list[int] | None:
    """Tokens per level of the ``lvl_1L`` buffer (level k of a plain VAR holds pn_k² tokens)."""
    if "lvl_1L" not in shapes.state:
        return None
    return torch.bincount(shapes.state["lvl_1L"].flatten().long()).tolist()


def _infer_var(state, source, overrides):
    from zoo.registry import list_entries

    shapes = _Shapes(state, source, "var")
    fields = _var_trunk(shapes, overrides, null_row=True)
    counts = _level_counts(shapes)
    if counts:
        fields["patch_nums"] = [_square_side(c, f"level {i} of lvl_1L", source) for i, c in enumerate(counts)]
    elif "patch_nums" not in overrides:
        _need(fields, "patch_nums", source, "the checkpoint has no lvl_1L buffer")
    depth = fields["depth"]
    name = f"var-d{depth}" if f"var-d{depth}" in list_entries("generator") else "var-d16"
    return name, fields


def _infer_var_sr(state, source, overrides):
    """VARSR's ``VAR_RoPE``: VAR's trunk (no null class row), an LR stem (``con_embedding``) feeding
    pn_last² prefix tokens (level 0 of ``lvl_1L``) or cross-attention, and the diffusion refiner."""
    from zoo.registry import get_entry

    shapes = _Shapes(state, source, "var-sr")
    fields = _var_trunk(shapes, overrides, null_row=False)
    fields["cond_mode"] = "cross" if any(k.startswith("cross_blocks.") for k in state) else "prefix"
    stem = [shapes("con_embedding.conv_in.weight")[0]]
    stem += [shapes(f"con_embedding.blocks.{i}.weight")[0] for i in range(1, shapes.count("con_embedding.blocks."), 2)]
    fields["stem_channels"] = stem
    counts = _level_counts(shapes)
    if counts:  # level 0 also holds the pn_last² prefix tokens in prefix mode
        sides = [_square_side(c, f"level {i} of lvl_1L", source) for i, c in enumerate(counts) if i > 0]
        prefix = sides[-1] ** 2 if fields["cond_mode"] == "prefix" else 0
        fields["patch_nums"] = [_square_side(counts[0] - prefix, "level 0 of lvl_1L", source), *sides]
    elif "patch_nums" not in overrides:
        _need(fields, "patch_nums", source, "the checkpoint has no lvl_1L buffer")
    fields["refiner"] = any(k.startswith("diffloss.") for k in state)
    if fields["refiner"]:
        fields.update(refiner_depth=shapes.count("diffloss.net.res_blocks."),
                      refiner_width=shapes("diffloss.net.input_proj.weight")[0])
    known = set(get_entry("generator", "var-sr").config_cls.__dataclass_fields__)
    return "var-sr", {k: v for k, v in fields.items() if k in known}


def _infer_mar(state, source, overrides, tokenizer_info: dict | None = None):
    from zoo.generators.mar import MAR_SIZES

    shapes = _Shapes(state, source, "mar")
    enc_dim, token_dim = shapes("z_proj.weight")
    seq_len = shapes("diffusion_pos_embed_learned")[1]
    tok = tokenizer_info or {}
    vae_embed_dim = overrides.get("vae_embed_dim", tok.get("latent_channels", 16))
    vae_stride = overrides.get("vae_stride", tok.get("downsample", 16))
    if token_dim % vae_embed_dim:
        raise ConfigError(f"{source}: tokens are {token_dim} wide, not a multiple of vae_embed_dim {vae_embed_dim}; "
                          f"give --set vae_embed_dim=")
    patch = _square_side(token_dim // vae_embed_dim, "z_proj input (tokens per patch)", source)
    depth = shapes.count("encoder_blocks.")
    fields: dict[str, Any] = dict(
        img_size=_square_side(seq_len, "diffusion_pos_embed_learned", source) * vae_stride * patch,
        vae_stride=vae_stride, patch_size=patch, vae_embed_dim=vae_embed_dim,
        encoder_embed_dim=enc_dim, encoder_depth=depth,
        decoder_embed_dim=shapes("decoder_embed.weight")[0], decoder_depth=shapes.count("decoder_blocks."),
        mlp_ratio=shapes("encoder_blocks.0.mlp.fc1.weight")[0] / enc_dim, class_num=shapes("class_emb.weight")[0],
        buffer_size=shapes("encoder_pos_embed_learned")[1] - seq_len,
        diffloss_d=shapes.count("diffloss.net.res_blocks."), diffloss_w=shapes("diffloss.net.input_proj.weight")[0],
        norm_eps=1e-6)  # the released mar_base/large/huge
    name = "mar-b"
    for size, s in MAR_SIZES.items():
        if (s["embed"], s["depth"]) == (enc_dim, depth):
            fields["encoder_num_heads"] = fields["decoder_num_heads"] = s["heads"]
            name = f"mar-{size}"
    for key in ("encoder_num_heads", "decoder_num_heads"):
        if key not in overrides:
            _need(fields, key, source, f"width {enc_dim} and depth {depth} match no released MAR size")
    return name, fields


# ------------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------------

def _ldm_arch(shapes: _Shapes) -> dict[str, Any]:
    ch, image_channels = shapes("encoder.conv_in.weight")[:2]
    levels = shapes.count("encoder.down.")
    return dict(ch=ch, image_channels=image_channels,
                ch_mult=[shapes(f"encoder.down.{i}.block.0.conv2.weight")[0] // ch for i in range(levels)])


def _infer_kl_vae(state, source, overrides):
    from zoo.tokenizers.kl_vae import PRESETS, _plain

    shapes = _Shapes(state, source, "kl-vae")
    fields = _ldm_arch(shapes)
    levels = len(fields["ch_mult"])
    z_channels = shapes("encoder.conv_out.weight")[0] // 2
    fields.update(num_res_blocks=shapes.count("encoder.down.0.block."), z_channels=z_channels,
                  use_quant_conv="quant_conv.weight" in state, use_post_quant_conv="post_quant_conv.weight" in state,
                  mid_attention=any(k.startswith("encoder.mid.attn_1.") for k in state),
                  encoder_attn_levels=[i for i in range(levels) if f"encoder.down.{i}.attn.0.norm.weight" in state],
                  decoder_attn_levels=[i for i in range(levels) if f"decoder.up.{i}.attn.0.norm.weight" in state])
    fields["embed_dim"] = shapes("quant_conv.weight")[0] // 2 if fields["use_quant_conv"] else z_channels
    for preset, values in PRESETS.items():  # a released architecture: name it (fixes its latent scale too)
        if all(_plain(values[k]) == _plain(v) for k, v in fields.items() if k in values):
            return "kl-vae", {"preset": preset}
    if "scale_factor" not in overrides:  # the one field that neither shapes nor presets tell
        from zoo.tokenizers.kl_vae import KLVAEConfig

        print(f"warning: {source}: not a known release, so its latent scale is unknown; scale_factor stays at "
              f"{KLVAEConfig.scale_factor} (Stable Diffusion's). Pass --set scale_factor=VALUE (1 / the std of its "
              f"latents) if the generator was trained with another", file=sys.stderr)
    return "kl-vae", fields


def _infer_vqvae(state, source, overrides, generator_fields: dict | None = None):
    shapes = _Shapes(state, source, "vqvae")
    vocab, cvae = shapes("quantize.embedding.weight")
    fields: dict[str, Any] = dict(_ldm_arch(shapes), vocab_size=vocab, z_channels=cvae,
                                  quant_conv_ks=shapes("quant_conv.weight")[-1])
    shared = shapes.count("quantize.quant_resi.qresi_ls.")
    if shared:
        fields["share_quant_resi"] = shared
    elif "quantize.quant_resi.qresi.weight" in state:
        fields["share_quant_resi"] = 1
    elif shapes.count("quantize.quant_resi."):
        fields.update(share_quant_resi=0, default_qresi_counts=shapes.count("quantize.quant_resi."))
    if generator_fields and "patch_nums" in generator_fields:
        fields["v_patch_nums"] = list(generator_fields["patch_nums"])
    elif "quantize.ema_vocab_hit_SV" in state and shapes("quantize.ema_vocab_hit_SV")[0] != 10 \
            and "v_patch_nums" not in overrides:
        _need({}, "v_patch_nums", source, f"{shapes('quantize.ema_vocab_hit_SV')[0]} scales, not the release's 10")
    return "msvq", fields


# ------------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------------

def _build(kind: str, name: str, fields: dict, overrides: dict, state: dict, source: str, **extra) -> Converted:
    from zoo.registry import get_entry

    entry = get_entry(kind, name)
    known = {f for f in entry.config_cls.__dataclass_fields__}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"--set {unknown[0]}: not a field of {name!r} (fields: {', '.join(sorted(known))})")
    values = {**fields, **overrides}
    config = entry.make_config(values, where=f"{source}: {kind} {name}")
    module = entry.build(config, **extra)
    if kind == "tokenizer" and name == "kl-vae":
        target = module.vae  # the official names are those of the AutoencoderKL inside
    else:
        target = module
    load_state_strict(target, state, source)
    section = {"name": name, **config_to_dict(config)}
    if section.get("pretrained"):
        section["pretrained"] = ""
    return Converted(kind, section, module.eval(), source)


def convert_tokenizer(src: str | os.PathLike, format: str, overrides: dict | None = None, *,
                      generator_fields: dict | None = None) -> Converted:
    """A tokenizer from an official file or folder (``format`` in ``TOKENIZER_FORMATS``)."""
    from zoo.tokenizers.kl_vae import _strip_wrappers, diffusers_to_ldm, read_diffusers_config

    src, overrides = Path(src), dict(overrides or {})
    if format == "diffusers-vae":
        folder = _diffusers_folder(src, "vae")
        if folder is None:
            raise ConfigError(f"{src}: not a diffusers VAE folder (config.json + {DIFFUSERS_WEIGHTS[0]}, in it or in "
                              f"its vae/ folder)")
        fields = read_diffusers_config(folder)
        weights = next(folder / n for n in DIFFUSERS_WEIGHTS if (folder / n).is_file())
        state, layout = pick_state_dict(load_checkpoint(weights), str(weights))
        state = diffusers_to_ldm(_strip_wrappers(state), len(fields["ch_mult"]))
        return _build("tokenizer", "kl-vae", fields, overrides, state, f"{weights} ({layout})")
    if format == "kl-vae":
        state, source = read_source(src)
        state = _strip_wrappers(state)
        if any(k.startswith("encoder.down_blocks.") for k in state):
            levels = len({k.split(".")[2] for k in state if k.startswith("encoder.down_blocks.")})
            state = diffusers_to_ldm(state, levels)
        name, fields = _infer_kl_vae(state, source, overrides)
        return _build("tokenizer", name, fields, overrides, state, source)
    if format == "vqvae":
        state, source = read_source(src)
        name, fields = _infer_vqvae(state, source, overrides, generator_fields)
        return _build("tokenizer", name, fields, overrides, state, source)
    raise ValueError(f"format {format!r} is not a tokenizer format; choose one of {', '.join(TOKENIZER_FORMATS)}")


def convert_generator(src: str | os.PathLike, format: str, overrides: dict | None = None, *,
                      tokenizer_info: dict | None = None) -> Converted:
    """A generator from an official checkpoint (``format`` in ``GENERATOR_FORMATS``), built with
    its objective as the recipe of that family names it."""
    from zoo.registry import create_objective

    src, overrides = Path(src), dict(overrides or {})
    if format == "diffusers-dit":
        state, source, config = _read_diffusers_dit(src)
        if config:  # diffusers' config.json tells what the weights cannot
            overrides.setdefault("num_heads", config.get("num_attention_heads"))
            if config.get("sample_size"):
                overrides.setdefault("input_size", config["sample_size"])
            overrides = {k: v for k, v in overrides.items() if v is not None}
        if "pos_embed" not in state:  # diffusers recomputes the fixed sin-cos table: take the model's own
            name, fields = _infer_dit(state, source, overrides)
            from zoo.registry import get_entry

            entry = get_entry("generator", name)
            fresh = entry.build(entry.make_config({**fields, **overrides}))
            state["pos_embed"] = fresh.pos_embed.detach().clone()
        format = "dit"
    else:
        state, source = read_source(src)
    if format == "dit":
        name, fields = _infer_dit(state, source, overrides)
        learn_sigma = overrides.get("learn_sigma", fields["learn_sigma"])
        objective = {"name": "gaussian", "learn_sigma": learn_sigma}
    elif format == "meanflow":
        name, fields = _infer_meanflow(state, source, overrides)
        objective = {"name": "meanflow"}
    elif format == "var":
        name, fields = _infer_var(state, source, overrides)
        objective = None
    elif format == "var-sr":
        name, fields = _infer_var_sr(state, source, overrides)
        objective = None
    elif format == "mar":
        from zoo.generators.mar import read_official_state_dict

        state = read_official_state_dict(state)
        name, fields = _infer_mar(state, source, overrides, tokenizer_info)
        objective = {"name": "gaussian", "noise_schedule": "cosine", "learn_sigma": True}
    else:
        raise ValueError(f"format {format!r} is not a generator format; choose one of {', '.join(GENERATOR_FORMATS)}")
    objective_obj = None
    if objective is not None:
        values = dict(objective)
        objective_obj = create_objective(values.pop("name"), **values)
    converted = _build("generator", name, fields, overrides, state, source, objective=objective_obj)
    if objective_obj is not None:
        converted.objective = {"name": objective["name"], **config_to_dict(objective_obj.config)}
    return converted


# ------------------------------------------------------------------------------------------------
# Model directories
# ------------------------------------------------------------------------------------------------

DEFAULT_TOKENIZER_FORMAT = {"dit": "kl-vae", "diffusers-dit": "kl-vae", "meanflow": "kl-vae", "mar": "kl-vae",
                            "var": "vqvae", "var-sr": "vqvae"}


def _split_overrides(overrides: dict) -> dict[str, dict]:
    out: dict[str, dict] = {"model": {}, "tokenizer": {}, "sample": {}, "data": {}}
    for key, value in overrides.items():
        section, dot, rest = key.partition(".")
        if dot and section in ("tokenizer", "sample", "data", "model"):
            out[section][rest] = value
        else:
            out["model"][key] = value
    return out


def _tokenizer_for(tokenizer, format: str, split: dict, generator_fields: dict | None = None) -> Converted:
    """The tokenizer named by ``--tokenizer``: a zoo directory, or an official file/folder converted."""
    from zoo.hub.model_dir import load_tokenizer_dir, read_model_config

    path = Path(tokenizer)
    if path.is_dir() and (path / "config.json").is_file() and "tokenizer" in read_model_config(path):
        module = load_tokenizer_dir(path)
        section = read_model_config(path)["tokenizer"]
        return Converted("tokenizer", dict(section), module, str(path))
    tok_format = split["tokenizer"].pop("format", None) or (
        "diffusers-vae" if path.is_dir() else DEFAULT_TOKENIZER_FORMAT[format])
    return convert_tokenizer(path, tok_format, split["tokenizer"], generator_fields=generator_fields)


def convert(src: str | os.PathLike, format: str, out: str | os.PathLike, *, overrides: dict | list | None = None,
            tokenizer: str | os.PathLike | None = None, sample: dict | None = None, source: dict | None = None,
            max_shard_size: int | str = "5GB", license: str | None = None) -> Path:
    """Convert ``src`` (``format``) into the zoo model directory ``out`` and return it.

    Generators need their tokenizer's weights (``tokenizer``: a zoo tokenizer directory, or an
    official tokenizer file/folder), except a pixel-space DiT/MeanFlow model (1 or 3 input channels),
    which gets the ``pixel`` tokenizer. ``overrides``: config fields the shapes cannot tell (or to
    correct), as a dict or ``key=value`` strings; ``tokenizer.KEY``, ``sample.KEY`` and ``data.KEY``
    address those sections. ``source`` is recorded in the model card.
    """
    if format not in FORMATS:
        raise ValueError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    if isinstance(overrides, (list, tuple)):
        overrides = parse_overrides(overrides)
    split = _split_overrides(dict(overrides or {}))
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty directory; choose a new output directory")
    files = [Path(src).name] + ([Path(tokenizer).name] if tokenizer is not None else [])
    card = dict(source={"format": format, "files": files, **(source or {})}, license=license)
    # Written beside ``out`` and renamed at the end: a failed conversion leaves no half directory.
    tmp = out.with_name(f".{out.name}.converting")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        stages = 2 if format in TOKENIZER_FORMATS else 3
        with progress_bar(total=stages, desc=f"converting {Path(src).name}", unit="stage") as bar:
            def stage(name: str) -> None:
                bar.set_postfix_str(name, refresh=False)
                bar.update()

            _convert_into(src, format, tmp, split, tokenizer, sample, card, max_shard_size, stage)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _convert_into(src, format: str, out: Path, split: dict, tokenizer, sample: dict | None, card: dict,
                  max_shard_size, stage) -> None:
    """The work of :func:`convert`; ``stage(name)`` is called as each stage ends (a progress bar)."""
    from zoo.config import build_config
    from zoo.hub.api import save_pretrained
    from zoo.pipeline import Pipeline
    from zoo.recipe import SampleConfig

    if format in TOKENIZER_FORMATS:
        if tokenizer is not None:
            raise ValueError(f"--tokenizer does not apply to the tokenizer format {format!r}")
        converted = convert_tokenizer(src, format, {**split["model"], **split["tokenizer"]})
        stage("read")
        save_pretrained(converted.module, out, max_shard_size=max_shard_size, **card)
        stage("written")
        return

    if format == "mar" and tokenizer is not None:
        tok = _tokenizer_for(tokenizer, format, split)
        generator = convert_generator(src, format, split["model"], tokenizer_info=type(tok.module).describe(
            tok.module.config))
    else:
        generator = convert_generator(src, format, split["model"])
        tok = None
    stage("generator read")
    gen_fields = generator.section
    if tok is None and tokenizer is not None:
        tok = _tokenizer_for(tokenizer, format, split, generator_fields=gen_fields)
    if tok is None:
        channels = gen_fields.get("in_channels")
        if format in ("dit", "diffusers-dit", "meanflow") and channels in (1, 3):
            from zoo.registry import create_tokenizer

            module = create_tokenizer("pixel", channels=channels)
            tok = Converted("tokenizer", {"name": "pixel", "channels": channels}, module, "pixel")
        else:
            raise ConfigError(f"{src}: a {format!r} generator works on a tokenizer with weights; give it with "
                              f"--tokenizer (a zoo tokenizer directory, or the official "
                              f"{DEFAULT_TOKENIZER_FORMAT[format]!r} file; see zoo-pull --list-official)")
    stage("tokenizer read")
    info = type(tok.module).describe(tok.module.config)
    _check_pair(format, gen_fields, info, str(src), tok.source)
    if format in ("dit", "diffusers-dit", "meanflow"):
        image_size = gen_fields["input_size"] * info["downsample"]
    elif format == "mar":
        image_size = gen_fields["img_size"]
    else:
        image_size = gen_fields["patch_nums"][-1] * info["downsample"]
    num_classes = gen_fields.get("num_classes", gen_fields.get("class_num"))
    data = {"name": "imagefolder", "image_size": image_size, "channels": info["image_channels"],
            "num_classes": num_classes, **split["data"]}
    sample_config = build_config(SampleConfig, {**(sample or {}), **split["sample"]}, where="sample")
    config = {"generator": gen_fields, "tokenizer": tok.section, "data": data,
              "sample": config_to_dict(sample_config)}
    if generator.objective is not None:
        config["objective"] = generator.objective
    pipe = Pipeline(generator.module, tok.module, sample_config, num_classes=num_classes, image_size=image_size,
                    config=config)
    save_pretrained(pipe, out, max_shard_size=max_shard_size, **card)
    stage("written")


def _check_pair(format: str, gen: dict, tok: dict, gen_source: str, tok_source: str) -> None:
    """The generator's latent geometry must be the tokenizer's."""
    checks = []
    if format in ("dit", "diffusers-dit", "meanflow"):
        checks.append(("in_channels", gen["in_channels"], "latent_channels", tok["latent_channels"]))
    elif format == "mar":
        checks += [("vae_embed_dim", gen["vae_embed_dim"], "latent_channels", tok["latent_channels"]),
                   ("vae_stride", gen["vae_stride"], "downsample", tok["downsample"])]
    else:
        checks += [("vocab_size", gen["vocab_size"], "vocab_size", tok.get("vocab_size")),
                   ("Cvae", gen["Cvae"], "latent_channels", tok["latent_channels"]),
                   ("patch_nums", list(gen["patch_nums"]), "patch_nums", list(tok.get("patch_nums") or []))]
    for gen_key, gen_value, tok_key, tok_value in checks:
        if gen_value != tok_value:
            raise ConfigError(f"{gen_source}: the generator's {gen_key} is {gen_value}, but the tokenizer {tok_source} "
                              f"has {tok_key} {tok_value}; they do not belong together")
