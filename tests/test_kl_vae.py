"""The kl-vae tokenizer (LDM AutoencoderKL): official parameter names, loading MAR's and diffusers'
checkpoints, the Gaussian posterior, the latent scale, training, config errors. Parity with the
official code (LTH14/mar models/vae.py, diffusers' AutoencoderKL) at real sizes is checked outside the
test suite: it needs the official sources."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from zoo.config import ConfigError
from zoo.registry import create_tokenizer, get_entry
from zoo.tokenizers.kl_vae import (
    PRESETS,
    AutoencoderKL,
    DiagonalGaussianDistribution,
    KLVAEConfig,
    KLVAETokenizer,
    read_diffusers_config,
)

# Two levels (stride 2); attention after the res blocks of level 1 in the encoder (MAR's layout, scaled down).
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, encoder_attn_levels=(1,))


def tiny_tokenizer(**overrides) -> KLVAETokenizer:
    torch.manual_seed(0)
    tok = KLVAETokenizer(KLVAEConfig(**{**TINY, **overrides}))
    with torch.no_grad():  # GroupNorm affine away from 1 / 0, so that a misplaced norm changes the outputs
        for name, p in tok.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return tok.eval()


def tiny_images(batch: int = 2, side: int = 8) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(batch, 3, side, side) * 2 - 1


# ------------------------------------------------------------------------------------------------
# Official names
# ------------------------------------------------------------------------------------------------

def test_vae_state_dict_has_the_official_mar_names():
    vae = tiny_tokenizer().vae
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    expected = {
        "encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight", "encoder.down.0.block.0.conv1.weight",
        "encoder.down.0.block.0.norm2.bias", "encoder.down.0.block.0.conv2.weight",
        "encoder.down.0.downsample.conv.weight", "encoder.down.1.block.0.nin_shortcut.weight",  # 32 -> 64
        "encoder.down.1.attn.0.norm.weight", "encoder.down.1.attn.0.q.weight", "encoder.down.1.attn.0.k.bias",
        "encoder.down.1.attn.0.v.weight", "encoder.down.1.attn.0.proj_out.weight",
        "encoder.mid.block_1.conv1.weight", "encoder.mid.attn_1.q.weight", "encoder.mid.block_2.norm2.weight",
        "encoder.norm_out.weight", "encoder.conv_out.weight",
        "decoder.conv_in.weight", "decoder.mid.block_1.norm1.weight", "decoder.mid.attn_1.proj_out.bias",
        "decoder.up.1.block.1.conv2.weight", "decoder.up.1.upsample.conv.weight",
        "decoder.up.0.block.0.nin_shortcut.weight",  # 64 -> 32
        "decoder.norm_out.weight", "decoder.conv_out.weight",
        "quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight", "post_quant_conv.bias",
    }
    assert expected <= set(shapes)
    assert not any(".qkv." in k or k.startswith(("decoder.up.1.attn", "encoder.down.0.attn")) for k in shapes)
    assert shapes["encoder.conv_out.weight"] == (8, 64, 3, 3)  # double z: mean and log-variance
    assert shapes["quant_conv.weight"] == (8, 8, 1, 1) and shapes["post_quant_conv.weight"] == (4, 4, 1, 1)
    assert shapes["encoder.down.1.attn.0.q.weight"] == (64, 64, 1, 1)
    assert len(vae.encoder.down[1].attn) == 1 and len(vae.decoder.up[1].block) == 2  # decoder: one more block
    # The tokenizer's own state dict holds the same tensors under "vae."
    assert set(tiny_tokenizer().state_dict()) == {f"vae.{k}" for k in shapes}


def test_mar_constructor_builds_kl16_with_encoder_attention_at_16_px():
    with torch.device("meta"):  # names and shapes only
        official = AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))
        preset = KLVAETokenizer(KLVAEConfig(preset="mar-kl16")).vae
    shapes = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in preset.state_dict().items()}
    assert {"encoder.down.4.attn.1.q.weight", "encoder.down.3.downsample.conv.weight",
            "decoder.up.4.block.2.conv1.weight"} <= set(shapes)
    assert not any(k.startswith(("encoder.down.3.attn", "encoder.down.4.downsample", "decoder.up.4.attn"))
                   for k in shapes)
    assert not any(k.startswith("decoder.up.") and ".attn." in k for k in shapes)  # no attention in decoder levels
    assert shapes["encoder.conv_in.weight"] == (128, 3, 3, 3) and shapes["quant_conv.weight"] == (32, 32, 1, 1)
    assert shapes["encoder.down.4.block.0.conv1.weight"] == (512, 256, 3, 3)


# ------------------------------------------------------------------------------------------------
# Loading checkpoints
# ------------------------------------------------------------------------------------------------

def diffusers_names(official: dict[str, torch.Tensor], num_levels: int, attention: str) -> dict[str, torch.Tensor]:
    """Our LDM-named state dict under diffusers' names, written out by hand: blocks renamed, the decoder's
    up blocks numbered coarse to fine, attention convs as linear weights named ``attention``-style."""
    attn_names = {"to_q": {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"},
                  "query": {"norm": "group_norm", "q": "query", "k": "key", "v": "value", "proj_out": "proj_attn"}}
    out = {}
    for key, tensor in official.items():
        parts = key.split(".")
        part, rest = parts[0], parts[1:]
        if rest[0] in ("down", "up"):
            level = int(rest[1]) if rest[0] == "down" else num_levels - 1 - int(rest[1])
            kind = {"block": "resnets", "attn": "attentions", "downsample": "downsamplers.0",
                    "upsample": "upsamplers.0"}[rest[2]]
            index = rest[3:4] if rest[2] in ("block", "attn") else []
            head = [f"{rest[0]}_blocks", str(level), kind, *index]
            rest = rest[4:] if index else rest[3:]
            is_attn = kind == "attentions"
        elif rest[0] == "mid":
            head = ["mid_block", {"block_1": "resnets.0", "block_2": "resnets.1", "attn_1": "attentions.0"}[rest[1]]]
            is_attn = rest[1] == "attn_1"
            rest = rest[2:]
        else:
            head, is_attn = [], False
            rest = ["conv_norm_out" if rest[0] == "norm_out" else rest[0], *rest[1:]]
        if is_attn:
            rest = [attn_names[attention][rest[0]], *rest[1:]]
            tensor = tensor.reshape(tensor.shape[:2]) if tensor.ndim == 4 else tensor
        elif rest[0] == "nin_shortcut":
            rest = ["conv_shortcut", *rest[1:]]
        out[".".join([part, *head, *rest])] = tensor
    return out


TINY_DIFFUSERS_CONFIG = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [32, 64],
                         "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                         "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "in_channels": 3,
                         "out_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 32,
                         "scaling_factor": 0.18215, "sample_size": 8}


def write_diffusers_dir(path: Path, state: dict, config: dict, fmt: str) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path / "diffusion_pytorch_model.safetensors"))
    else:
        torch.save(state, path / "diffusion_pytorch_model.bin")
    return path


def test_handwritten_diffusers_names_are_those_of_the_sd_vae():
    with torch.device("meta"):
        official = KLVAETokenizer(KLVAEConfig(preset="sd-vae-ft-ema")).vae.state_dict()
    names = set(diffusers_names(official, 4, "to_q"))
    assert {  # keys of stabilityai/sd-vae-ft-ema's diffusion_pytorch_model.safetensors
        "encoder.down_blocks.0.resnets.0.norm1.weight", "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
        "encoder.down_blocks.2.downsamplers.0.conv.weight", "encoder.mid_block.attentions.0.group_norm.weight",
        "encoder.mid_block.attentions.0.to_out.0.weight", "encoder.mid_block.resnets.1.conv2.bias",
        "encoder.conv_norm_out.weight", "decoder.up_blocks.0.upsamplers.0.conv.weight",
        "decoder.up_blocks.3.resnets.0.conv_shortcut.weight", "decoder.up_blocks.3.resnets.2.norm2.weight",
        "decoder.mid_block.attentions.0.to_q.weight", "quant_conv.weight", "post_quant_conv.bias",
    } <= names
    assert len(names) == len(official)


@pytest.mark.parametrize("attention, fmt", [("to_q", "safetensors"), ("query", "bin")])
def test_diffusers_directory_loads_to_the_same_model(tmp_path, attention, fmt):
    source = tiny_tokenizer()
    state = diffusers_names(source.vae.state_dict(), 2, attention)
    path = write_diffusers_dir(tmp_path / "vae", state, TINY_DIFFUSERS_CONFIG, fmt)
    torch.manual_seed(9)  # a different random init, all overwritten
    target = create_tokenizer("kl-vae", **read_diffusers_config(path), pretrained=str(path)).eval()
    for key, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], tensor), key
    images = tiny_images()
    with torch.no_grad():
        torch.testing.assert_close(target.vae.encode(images).mean, source.vae.encode(images).mean, rtol=0, atol=0)
        z = torch.randn(2, 4, 4, 4)
        torch.testing.assert_close(target.decode(z), source.decode(z), rtol=0, atol=0)


def test_diffusers_config_json_gives_the_config_fields(tmp_path):
    sd_config = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
                 "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
                 "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
                 "norm_num_groups": 32, "sample_size": 256}  # sd-vae-ft-ema's: no scaling_factor, diffusers' default
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps(sd_config))
    assert read_diffusers_config(tmp_path) == PRESETS["sd-vae-ft-ema"]  # a pipeline directory's vae/ folder
    fields = read_diffusers_config(write_diffusers_dir(tmp_path / "tiny", {}, TINY_DIFFUSERS_CONFIG, "bin"))
    assert fields["encoder_attn_levels"] == (1,) and fields["decoder_attn_levels"] == ()
    up_attention = {**TINY_DIFFUSERS_CONFIG, "up_block_types": ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]}
    (tmp_path / "up.json").write_text(json.dumps(up_attention))
    assert read_diffusers_config(write_diffusers_dir(tmp_path / "up", {}, up_attention, "bin"))[
        "decoder_attn_levels"] == (1,)  # up_blocks run coarse to fine: up_blocks.0 is level 1


def test_diffusers_config_that_disagrees_with_the_tokenizer_config_is_refused(tmp_path):
    path = write_diffusers_dir(tmp_path / "vae", {}, TINY_DIFFUSERS_CONFIG, "bin")
    with pytest.raises(ConfigError, match=r"config\.json: gives scale_factor = 0\.18215, but the kl-vae config has "
                                          r"scale_factor = 0\.5; set scale_factor: 0\.18215"):
        create_tokenizer("kl-vae", **TINY, scale_factor=0.5, pretrained=str(path))
    bad = {**TINY_DIFFUSERS_CONFIG, "norm_num_groups": 16}
    with pytest.raises(ConfigError, match=r"config\.json: norm_num_groups: 16 is not supported"):
        read_diffusers_config(write_diffusers_dir(tmp_path / "bad", {}, bad, "bin"))


@pytest.mark.parametrize("wrap", ["mar", "lightning_full_ldm", "ddp_bare", "zoo_safetensors"])
def test_ldm_layout_checkpoints_load_with_weights_only(tmp_path, wrap):
    source = tiny_tokenizer()
    official = source.vae.state_dict()
    if wrap == "mar":  # kl16.ckpt: {'model': ...}; LDM's training-loss keys beside the autoencoder are dropped
        checkpoint = {"model": {**official, "loss.logvar": torch.zeros(()),
                                "loss.discriminator.main.0.weight": torch.zeros(8, 3, 4, 4)}}
    elif wrap == "lightning_full_ldm":  # an SD/LDM checkpoint: the autoencoder is first_stage_model
        checkpoint = {"state_dict": {**{f"first_stage_model.{k}": v for k, v in official.items()},
                                     "model.diffusion_model.out.0.weight": torch.zeros(3)}, "global_step": 5}
    elif wrap == "ddp_bare":
        checkpoint = {f"module.{k}": v for k, v in official.items()}
    path = tmp_path / ("w.safetensors" if wrap == "zoo_safetensors" else "w.ckpt")
    if wrap == "zoo_safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))  # "vae."-prefixed
    else:
        torch.save(checkpoint, path)
    target = create_tokenizer("kl-vae", **TINY, pretrained=str(path))
    assert all(torch.equal(target.vae.state_dict()[k], v) for k, v in official.items())
    # The official call surface loads the same way.
    assert torch.equal(AutoencoderKL(4, (1, 2), ch=32, num_res_blocks=1, encoder_attn_levels=(1,),
                                     ckpt_path=str(path)).quant_conv.weight, official["quant_conv.weight"])


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))  # what unpickling would do: call Path.touch(marker)


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"model": _RunsCode(marker)}, path)
    with pytest.raises(ConfigError, match=r"evil\.ckpt: refused by torch\.load\(weights_only=True\)"):
        create_tokenizer("kl-vae", **TINY, pretrained=str(path))
    assert not marker.exists()


def test_mismatched_weights_name_the_file_and_the_first_bad_tensor(tmp_path):
    path = tmp_path / "w.ckpt"
    torch.save({"model": tiny_tokenizer().vae.state_dict()}, path)
    with pytest.raises(ConfigError, match=r"w\.ckpt: tensor 'quant_conv\.weight' has shape \(8, 8, 1, 1\), the "
                                          r"config needs \(16, 8, 1, 1\)"):
        create_tokenizer("kl-vae", **{**TINY, "embed_dim": 8}, pretrained=str(path))
    with pytest.raises(ConfigError, match=r"w\.ckpt: weights do not fit the config: missing "
                                          r"\['decoder\.up\.1\.attn\.0\.norm\.weight'"):
        create_tokenizer("kl-vae", **{**TINY, "decoder_attn_levels": (1,)}, pretrained=str(path))
    with pytest.raises(ConfigError, match=r"nothing\.ckpt: pretrained weights not found"):
        create_tokenizer("kl-vae", **TINY, pretrained=str(tmp_path / "nothing.ckpt"))


# ------------------------------------------------------------------------------------------------
# The posterior and the latent scale
# ------------------------------------------------------------------------------------------------

def moments() -> torch.Tensor:
    torch.manual_seed(3)
    params = torch.randn(2, 6, 3, 3)
    params[0, 3, 0, 0], params[0, 4, 0, 0] = 50.0, -50.0  # log-variances outside the clamp [-30, 20]
    return params


def test_posterior_mean_logvar_and_kl_follow_the_formulas():
    params = moments()
    posterior = DiagonalGaussianDistribution(params)
    mean, logvar = params[:, :3], params[:, 3:].clamp(-30, 20)
    assert torch.equal(posterior.mean, mean) and torch.equal(posterior.mode(), mean)
    assert posterior.logvar[0, 0, 0, 0] == 20 and posterior.logvar[0, 1, 0, 0] == -30
    torch.testing.assert_close(posterior.std, torch.exp(0.5 * logvar))
    torch.testing.assert_close(posterior.var, torch.exp(logvar))
    expected = [0.5 * sum(float(m) ** 2 + math.exp(lv) - 1 - float(lv) for m, lv in
                          zip(mean[b].flatten(), logvar[b].flatten())) for b in range(2)]
    torch.testing.assert_close(posterior.kl(), torch.tensor(expected))
    other = DiagonalGaussianDistribution(torch.zeros(2, 6, 3, 3))  # N(0, I) given explicitly
    torch.testing.assert_close(posterior.kl(other), posterior.kl())
    assert torch.equal(DiagonalGaussianDistribution(params, deterministic=True).kl(), torch.zeros(2))


def test_posterior_sample_is_mean_plus_std_times_seeded_noise():
    posterior = DiagonalGaussianDistribution(moments())
    eps = torch.randn(2, 3, 3, 3, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(posterior.sample(generator=torch.Generator().manual_seed(4)),
                               posterior.mean + posterior.std * eps)
    torch.manual_seed(4)  # without a generator: the global CPU RNG, as the official sample()
    torch.testing.assert_close(posterior.sample(), posterior.mean + posterior.std * eps)


def test_encode_scales_the_posterior_and_decode_unscales():
    tok, images = tiny_tokenizer(scale_factor=0.5, shift_factor=0.25), tiny_images()
    with torch.no_grad():
        posterior = tok.vae.encode(images)
        torch.manual_seed(6)
        sampled = tok.encode(images)  # sample_posterior (default): a draw from the global RNG, as MAR trains
        torch.manual_seed(6)
        assert torch.equal(sampled, (posterior.sample() - 0.25) * 0.5)
        mean_tok = tiny_tokenizer(scale_factor=0.5, shift_factor=0.25, sample_posterior=False)
        assert torch.equal(mean_tok.encode(images), (posterior.mean - 0.25) * 0.5)
        assert torch.equal(tok.decode(sampled), tok.vae.decode(sampled / 0.5 + 0.25))
        assert tok.decode(sampled).shape == images.shape and sampled.shape == (2, 4, 4, 4)


def test_images_of_a_side_not_divisible_by_the_stride_are_rejected():
    with pytest.raises(ValueError, match=r"expected images \(N, 3, H, W\) with H and W multiples of its stride 2"):
        tiny_tokenizer().encode(torch.zeros(1, 3, 9, 8))


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def test_loss_is_reconstruction_plus_weighted_kl_per_pixel():
    tok = tiny_tokenizer(kl_weight=0.01, recon_weight=2.0, recon_loss="l2")
    images = tiny_images()
    torch.manual_seed(8)
    out = tok.loss(images)
    assert set(out) == {"loss", "recon", "kl", "z_std"} and all(v.ndim == 0 for v in out.values())
    torch.testing.assert_close(out["loss"], 2.0 * out["recon"] + 0.01 * out["kl"] / (3 * 8 * 8))
    with torch.no_grad():
        posterior = tok.vae.encode(images)
        torch.manual_seed(8)
        reconstruction = tok.vae.decode(posterior.sample())
    torch.testing.assert_close(out["recon"], ((reconstruction - images) ** 2).mean())
    torch.testing.assert_close(out["kl"], posterior.kl().mean())


def test_training_loss_decreases_on_a_fixed_batch():
    tok = tiny_tokenizer(kl_weight=1e-3).train()
    images = tiny_images(4)
    optimizer = torch.optim.Adam(tok.parameters(), lr=2e-3)
    losses = []
    for step in range(12):
        torch.manual_seed(step)
        out = tok.loss(images)
        optimizer.zero_grad()
        out["loss"].backward()
        if step == 0:
            assert tok.vae.encoder.conv_in.weight.grad.abs().sum() > 0
            assert tok.vae.post_quant_conv.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.7 * losses[0], losses


# ------------------------------------------------------------------------------------------------
# Registry and config
# ------------------------------------------------------------------------------------------------

def test_registered_trainable_with_shape_facts_of_the_presets():
    assert get_entry("tokenizer", "kl-vae").builder is KLVAETokenizer and KLVAETokenizer.trainable
    assert KLVAETokenizer.describe(KLVAEConfig(preset="sd-vae-ft-ema")) == {
        "latent_channels": 4, "downsample": 8, "image_channels": 3}
    assert KLVAETokenizer.describe(KLVAEConfig(preset="mar-kl16")) == {
        "latent_channels": 16, "downsample": 16, "image_channels": 3}
    assert KLVAEConfig(preset="mar-kl16").scale_factor == 0.2325
    assert tiny_tokenizer().latent_shape(8) == (4, 4, 4)


@pytest.mark.parametrize("overrides, message", [
    ({"preset": "mar-kl16"}, r"ch: preset 'mar-kl16' fixes ch = 128, got 32; remove ch, or set preset to ''"),
    ({"encoder_attn_levels": (2,)}, r"encoder_attn_levels: levels \[2\] do not exist; .* 0 \(full resolution\) to 1"),
    ({"ch": 48}, r"GroupNorm\(32\)"),
    ({"recon_loss": "l3"}, r"recon_loss: 'l3' is not allowed"),
    ({"kl_weight": -1.0}, r"kl_weight: must be >= 0"),
    ({"z_channels": 8, "use_quant_conv": False}, r"z_channels \(8\) and embed_dim \(4\) differ"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        create_tokenizer("kl-vae", **{**TINY, **overrides})
