"""VAR's multi-scale residual VQ tokenizer: checkpoint key names, the quantiser, Φ choice, training,
codebook aids, config errors. Bit-for-bit parity with the official code is checked outside the test
suite (it needs the official sources)."""

from __future__ import annotations

import math

import pytest
import torch

from zoo.config import ConfigError
from zoo.tokenizers.msvq import EMA_EPS, MSVQConfig, MSVQTokenizer, MultiScaleQuantizer, phi_index, phi_ticks

TINY = dict(ch=32, ch_mult=(1, 2), vocab_size=64, z_channels=8, v_patch_nums=(1, 2, 4))


def tiny_tokenizer(**overrides) -> MSVQTokenizer:
    torch.manual_seed(0)
    return MSVQTokenizer(MSVQConfig(**{**TINY, **overrides}))


def tiny_images(batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(batch, 3, 8, 8) * 2 - 1  # side = v_patch_nums[-1] * downsample 2


def test_state_dict_keys_match_the_official_checkpoint_names():
    keys = set(tiny_tokenizer().state_dict())
    expected = {
        "encoder.conv_in.weight",
        "encoder.down.0.block.0.norm1.weight", "encoder.down.0.block.0.conv1.weight",
        "encoder.down.0.block.0.norm2.bias", "encoder.down.0.block.1.conv2.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",  # 32 -> 64 channels
        "encoder.down.1.attn.0.qkv.weight", "encoder.down.1.attn.1.proj_out.weight",
        "encoder.down.1.attn.0.norm.weight",
        "encoder.down.0.downsample.conv.weight",
        "encoder.mid.block_1.conv1.weight", "encoder.mid.attn_1.qkv.weight", "encoder.mid.block_2.norm2.weight",
        "encoder.norm_out.weight", "encoder.conv_out.weight",
        "decoder.conv_in.weight", "decoder.mid.block_1.norm1.weight", "decoder.mid.attn_1.proj_out.bias",
        "decoder.up.1.block.2.conv2.weight", "decoder.up.1.attn.2.qkv.weight", "decoder.up.1.upsample.conv.weight",
        "decoder.up.0.block.0.nin_shortcut.weight",  # 64 -> 32 channels
        "decoder.norm_out.weight", "decoder.conv_out.weight",
        "quant_conv.weight", "post_quant_conv.bias", "quantize.embedding.weight",
        "quantize.quant_resi.qresi_ls.0.weight", "quantize.quant_resi.qresi_ls.3.bias",
        "quantize.ema_vocab_hit_SV",
    }
    assert expected <= keys
    # Same-width blocks have no shortcut conv, the finest level no upsample, the coarsest no downsample.
    assert "encoder.down.0.block.0.nin_shortcut.weight" not in keys
    assert not any(k.startswith(("decoder.up.0.upsample", "encoder.down.1.downsample")) for k in keys)
    assert tiny_tokenizer().quantize.ema_vocab_hit_SV.shape == (3, 64)


def test_state_dict_round_trips_strictly():
    source, target = tiny_tokenizer(), MSVQTokenizer(MSVQConfig(**TINY))
    target.load_state_dict(source.state_dict(), strict=True)
    assert torch.equal(target.quantize.embedding.weight, source.quantize.embedding.weight)


def test_fhat_rebuilt_from_indices_equals_encoded_fhat():
    tok, images = tiny_tokenizer(), tiny_images()
    with torch.no_grad():
        idx_Bl = tok.img_to_idxBl(images)
        f_hat = tok.encode(images)
        h_BChw = [tok.quantize.embedding(idx).transpose(1, 2).reshape(2, 8, pn, pn)
                  for idx, pn in zip(idx_Bl, (1, 2, 4))]
        rebuilt = tok.quantize.embed_to_fhat(h_BChw, all_to_max_scale=True, last_one=True)
        assert [tuple(i.shape) for i in idx_Bl] == [(2, 1), (2, 4), (2, 16)]
        assert idx_Bl[0].dtype == torch.long and int(idx_Bl[-1].max()) < 64
        assert f_hat.shape == (2, 8, 4, 4)
        torch.testing.assert_close(rebuilt, f_hat, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tok.idxBl_to_img(idx_Bl), tok.decode(f_hat), rtol=1e-5, atol=1e-5)


def test_idxBl_to_var_input_gives_all_but_the_first_scale():
    tok = tiny_tokenizer()
    idx_Bl = [torch.randint(0, 64, (3, pn * pn)) for pn in (1, 2, 4)]
    x_BLC = tok.quantize.idxBl_to_var_input(idx_Bl)
    assert x_BLC.shape == (3, 1 + 4 + 16 - 1, 8)
    assert x_BLC.dtype == torch.float32
    # The first teacher-forcing token block is the Φ-refined scale-0 embedding, area-pooled to 2x2.
    f_hat = tok.quantize.embed_to_fhat(
        [tok.quantize.embedding(idx_Bl[0]).transpose(1, 2).reshape(3, 8, 1, 1)], last_one=True)
    expected = torch.nn.functional.interpolate(f_hat, size=(2, 2), mode="area").flatten(2).transpose(1, 2)
    torch.testing.assert_close(x_BLC[:, :4], expected)


def test_phi_choice_for_ten_scales_and_four_shared_phis():
    ticks = phi_ticks(4)
    expected_ticks = torch.tensor([1 / 12, 13 / 36, 23 / 36, 11 / 12], dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(ticks), expected_ticks)
    assert [phi_index(ticks, si / 9) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    tok = tiny_tokenizer(v_patch_nums=(1, 2, 3, 4))
    phis = tok.quantize.quant_resi.qresi_ls
    assert [tok.quantize.phi_for_scale(si, 4) is phis[i] for si, i in enumerate([0, 1, 2, 3])] == [True] * 4


def test_other_phi_counts_use_half_step_ticks():
    torch.testing.assert_close(torch.tensor(phi_ticks(3)), torch.tensor([1 / 6, 1 / 2, 5 / 6], dtype=torch.float64))
    assert set(tiny_tokenizer(share_quant_resi=0).state_dict()) >= {f"quantize.quant_resi.{k}.weight" for k in range(3)}
    assert "quantize.quant_resi.qresi.weight" in tiny_tokenizer(share_quant_resi=1).state_dict()


def test_channel_widths_not_divisible_by_32_are_a_config_error():
    with pytest.raises(ConfigError, match="GroupNorm"):
        MSVQConfig(ch=48, ch_mult=(1, 2))
    with pytest.raises(ConfigError, match="ch_mult"):
        MSVQConfig(ch=160, ch_mult=())
    MSVQConfig(ch=160)  # the release: 160, 320, 640 all split into 32 groups


def test_decode_returns_images_of_the_input_shape_in_range():
    tok, images = tiny_tokenizer(), tiny_images()
    with torch.no_grad():
        out = tok.decode(tok.encode(images) * 50)  # large latents: the clamp must hold
    assert out.shape == images.shape
    assert out.min() >= -1 and out.max() <= 1
    assert (out.abs() == 1).any()


def test_registered_as_discrete_msvq_with_shape_facts():
    from zoo.registry import create_tokenizer, get_entry

    entry = get_entry("tokenizer", "msvq")
    assert entry.builder is MSVQTokenizer and MSVQTokenizer.kind == "discrete"
    assert MSVQTokenizer.describe(MSVQConfig()) == {"latent_channels": 32, "downsample": 16, "image_channels": 3,
                                                    "vocab_size": 4096,
                                                    "patch_nums": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)}
    assert MSVQTokenizer.trainable
    tok = create_tokenizer("msvq", **TINY)
    assert tok.latent_shape(8) == (8, 4, 4) and not tok.training
    assert not any(p.requires_grad for p in tok.parameters())


def test_wrong_image_side_is_rejected():
    with pytest.raises(ValueError, match="8, 8"):
        tiny_tokenizer().encode(torch.zeros(1, 3, 16, 16))


# ------------------------------------------------------------------------------------------------
# Teacher forcing and training inputs
# ------------------------------------------------------------------------------------------------

def identity_phi_tokenizer(**overrides) -> MSVQTokenizer:
    """Tiny tokenizer whose Φ is the identity (quant_resi=0), so f_hat is a plain sum of upsampled codes."""
    return tiny_tokenizer(quant_resi=0.0, **overrides)


def test_teacher_forcing_input_is_the_running_fhat_pooled_to_each_next_scale():
    tok = identity_phi_tokenizer()
    codebook = tok.quantize.embedding.weight
    with torch.no_grad():
        codebook[3] = torch.arange(8.0)
        codebook[5] = torch.full((8,), -2.0)
    # Scale 0 picks code 3; every cell of scale 1 picks code 5; bicubic upsampling keeps constants.
    idx_Bl = [torch.full((2, 1), 3), torch.full((2, 4), 5), torch.randint(0, 64, (2, 16))]
    x_BLC = tok.quantize.idxBl_to_var_input(idx_Bl)
    assert x_BLC.shape == (2, 4 + 16, 8)  # the tokens of scales 1 and 2, never of scale 0
    torch.testing.assert_close(x_BLC[:, :4], torch.arange(8.0).expand(2, 4, 8))
    torch.testing.assert_close(x_BLC[:, 4:], (torch.arange(8.0) - 2).expand(2, 16, 8))


def test_teacher_forcing_input_area_pools_the_fhat_of_the_earlier_scales():
    tok = tiny_tokenizer(v_patch_nums=(1, 2, 3, 4))
    torch.manual_seed(5)
    idx_Bl = [torch.randint(0, 64, (2, pn * pn)) for pn in (1, 2, 3, 4)]
    x_BLC = tok.quantize.idxBl_to_var_input(idx_Bl)
    assert x_BLC.shape == (2, 4 + 9 + 16, 8)
    h_BChw = [tok.quantize.embedding(idx).transpose(1, 2).reshape(2, 8, pn, pn) for idx, pn in zip(idx_Bl, (1, 2))]
    f_hat = tok.quantize.embed_to_fhat(h_BChw, last_one=True)  # after scales 0 and 1, (2, 8, 4, 4)
    expected = torch.nn.functional.interpolate(f_hat, size=(3, 3), mode="area").flatten(2).transpose(1, 2)
    torch.testing.assert_close(x_BLC[:, 4:13], expected)


def test_training_inputs_are_the_concatenated_pyramid_and_the_teacher_forcing_input():
    tok, images = tiny_tokenizer(), tiny_images()
    gt_BL, x_BLCv = tok.training_inputs(images)
    idx_Bl = tok.img_to_idxBl(images)
    assert gt_BL.shape == (2, 1 + 4 + 16) and gt_BL.dtype == torch.long
    assert torch.equal(gt_BL, torch.cat(idx_Bl, 1))
    assert x_BLCv.shape == (2, 4 + 16, 8) and not x_BLCv.requires_grad
    torch.testing.assert_close(x_BLCv, tok.quantize.idxBl_to_var_input(idx_Bl))


def test_continuous_tokenizers_train_generators_on_their_latents():
    from zoo.tokenizers.pixel import PixelConfig, PixelTokenizer

    images = tiny_images()
    assert torch.equal(PixelTokenizer(PixelConfig(channels=3)).training_inputs(images), images)
    with pytest.raises(NotImplementedError, match="cannot be trained"):
        PixelTokenizer(PixelConfig(channels=3)).loss(images)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def trainable_tokenizer(**overrides) -> MSVQTokenizer:
    return tiny_tokenizer(**overrides).train().requires_grad_(True)


def test_loss_terms_are_scalars_and_combine_with_their_weights():
    tok = trainable_tokenizer(recon_weight=2.0, codebook_weight=0.5, recon_loss="l1")
    out = tok.loss(tiny_images())
    assert set(out) == {"loss", "recon", "vq", "usage", "perplexity"}
    assert all(v.ndim == 0 for v in out.values())
    torch.testing.assert_close(out["loss"], 2.0 * out["recon"] + 0.5 * out["vq"])
    assert not out["usage"].requires_grad and not out["perplexity"].requires_grad


def test_training_reduces_the_loss_on_a_fixed_batch_with_sane_usage():
    tok = trainable_tokenizer()
    torch.manual_seed(1)
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    optimizer = torch.optim.Adam(tok.parameters(), lr=2e-3)
    history = []
    for _ in range(30):
        out = tok.loss(images)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        history.append(out)
    first, last = history[0], history[-1]
    assert last["loss"] < 0.4 * first["loss"]
    assert last["recon"] < 0.2 * first["recon"]
    for out in history:
        assert 0 < out["usage"] <= 1
        # At least one code, at most one per token (4 * 21) and never more than the vocabulary.
        assert 1 <= out["perplexity"] <= min(64, 4 * 21) + 1e-4
        assert out["perplexity"] <= out["usage"] * 64 + 1e-4  # exp(entropy) <= number of codes used


class FixedFeatures(torch.nn.Module):
    """Stands in for the encoder: returns the same feature map for any images."""

    def __init__(self, f_BChw: torch.Tensor):
        super().__init__()
        self.f_BChw = f_BChw

    def forward(self, images):
        return self.f_BChw


def test_usage_and_perplexity_come_from_the_batch_code_histogram():
    # Four codes 100 * e_k; the features are built so that scale 0 (1x1) picks code 0 and the four
    # cells of scale 1 (2x2) pick codes 0, 1, 2, 3: histogram [2, 1, 1, 1].
    tok = trainable_tokenizer(vocab_size=4, quant_resi=0.0, v_patch_nums=(1, 2))
    with torch.no_grad():
        tok.quantize.embedding.weight.copy_(torch.eye(4, 8) * 100)
    f = torch.zeros(1, 8, 2, 2)
    f[0, :4] = torch.eye(4).reshape(4, 2, 2) * 100
    f[0, 0] += 40
    tok.encoder, tok.quant_conv = FixedFeatures(f), torch.nn.Identity()
    out = tok.loss(torch.zeros(1, 3, 4, 4))
    assert out["usage"] == 1.0
    entropy = -(0.4 * math.log(0.4) + 3 * 0.2 * math.log(0.2))
    torch.testing.assert_close(out["perplexity"], torch.tensor(math.exp(entropy)))  # 3.79
    # Every token on code 0: one code of four in use, perplexity 1.
    f[0, 1:4] = 0
    f[0, 0] = 150  # scale 0 takes 100 of it, the residual 50 * e_0 is nearest to code 0 again
    out = tok.loss(torch.zeros(1, 3, 4, 4))
    assert out["usage"] == 0.25 and out["perplexity"] == 1.0


def test_reconstruction_gradient_reaches_the_encoder_straight_through():
    tok = trainable_tokenizer()
    tok.loss(tiny_images())["recon"].backward()
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0
    assert tok.quant_conv.weight.grad.abs().sum() > 0
    # The reconstruction term alone does not move the codebook: its gradient skips the quantiser.
    assert tok.quantize.embedding.weight.grad is None


def test_vq_loss_trains_codebook_and_phi_and_commits_the_encoder():
    tok = trainable_tokenizer()
    tok.loss(tiny_images())["vq"].backward()
    assert tok.quantize.embedding.weight.grad.abs().sum() > 0
    assert tok.quantize.quant_resi.qresi_ls[0].weight.grad.abs().sum() > 0
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0  # commitment
    assert tok.decoder.conv_in.weight.grad is None


def test_usage_statistics_update_in_training_only():
    tok = tiny_tokenizer()
    tok.loss(tiny_images())  # eval mode (test_mode)
    assert tok.quantize.ema_vocab_hit_SV.abs().sum() == 0
    tok.train()
    tok.loss(tiny_images())
    # The official schedule: scale 0 copies the first hit counts, later scales average with 0.9.
    assert tok.quantize.ema_vocab_hit_SV[0].sum() == 2  # one token per image at scale 0
    torch.testing.assert_close(tok.quantize.ema_vocab_hit_SV[2].sum(), torch.tensor(0.1 * 2 * 16))
    assert tok.quantize.record_hit == 3


# ------------------------------------------------------------------------------------------------
# EMA codebook and dead-code restarts
# ------------------------------------------------------------------------------------------------

def far_codebook_quantizer(**options) -> MultiScaleQuantizer:
    """Two scales (1, 2), Φ identity, code 0 at the origin and every other code far away: every
    quantiser input picks code 0, so the residual never changes and the inputs are known."""
    torch.manual_seed(0)
    quantizer = MultiScaleQuantizer(vocab_size=16, Cvae=4, using_znorm=False, beta=0.25, default_qresi_counts=0,
                                    v_patch_nums=(1, 2), quant_resi=0.0, share_quant_resi=4, **options)
    with torch.no_grad():
        quantizer.embedding.weight.copy_(1000 + torch.rand(16, 4))
        quantizer.embedding.weight[0] = 0
        if "ema_embed_sum" in dict(quantizer.named_buffers()):
            quantizer.ema_embed_sum.copy_(quantizer.embedding.weight)
    return quantizer.train()


def quantiser_inputs(f_BChw: torch.Tensor) -> torch.Tensor:
    """What the far-codebook quantiser quantises: f pooled to 1x1, then f itself (rows, C)."""
    C = f_BChw.shape[1]
    pooled = f_BChw.mean((2, 3))
    return torch.cat([pooled, f_BChw.permute(0, 2, 3, 1).reshape(-1, C)])


def test_ema_codebook_moves_codes_to_the_mean_of_their_assigned_features():
    quantizer = far_codebook_quantizer(ema_codebook=True, ema_decay=0.9)
    torch.manual_seed(2)
    f = torch.randn(3, 4, 2, 2)
    before = quantizer.embedding.weight.detach().clone()
    _, _, hit_V = quantizer.quantize_for_training(f)
    assert hit_V[0] == 3 * 5 and hit_V[1:].sum() == 0
    inputs = quantiser_inputs(f)
    # Cluster sizes 0.9 * 1 + 0.1 * hits, sums 0.9 * old code + 0.1 * sum of inputs, Laplace-smoothed.
    sizes = torch.full((16,), 0.9)
    sizes[0] += 0.1 * 15
    smoothed = (sizes + EMA_EPS) / (sizes.sum() + 16 * EMA_EPS) * sizes.sum()
    expected = (0.9 * before + 0.1 * torch.zeros(16, 4).index_add_(0, torch.zeros(15, dtype=torch.long), inputs))
    expected = expected / smoothed[:, None]
    torch.testing.assert_close(quantizer.embedding.weight.detach(), expected)
    mean = inputs.mean(0)
    assert (quantizer.embedding.weight[0] - mean).norm() < (before[0] - mean).norm()
    torch.testing.assert_close(quantizer.ema_cluster_size, sizes)


def test_ema_codebook_smoothing_keeps_codes_without_hits_finite():
    quantizer = far_codebook_quantizer(ema_codebook=True)
    with torch.no_grad():  # code 5 has not been picked for so long that its statistics reached zero
        quantizer.ema_cluster_size[5] = 0
        quantizer.ema_embed_sum[5] = 0
    quantizer.quantize_for_training(torch.randn(2, 4, 2, 2))
    assert torch.isfinite(quantizer.embedding.weight).all()
    assert torch.equal(quantizer.embedding.weight[5], torch.zeros(4))


def test_ema_codebook_gets_no_gradient_but_phi_does():
    tok = trainable_tokenizer(ema_codebook=True)  # train().requires_grad_(True) leaves the codebook out
    assert not tok.quantize.embedding.weight.requires_grad
    tok.quantize.embedding.weight.requires_grad = True  # even so, the loss does not reach it
    tok.loss(tiny_images())["loss"].backward()
    assert tok.quantize.embedding.weight.grad is None
    assert tok.quantize.quant_resi.qresi_ls[0].weight.grad.abs().sum() > 0
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0


def test_ema_codebook_is_left_alone_in_eval_mode():
    quantizer = far_codebook_quantizer(ema_codebook=True).eval()
    before = quantizer.embedding.weight.detach().clone()
    quantizer.quantize_for_training(torch.randn(2, 4, 2, 2))
    assert torch.equal(quantizer.embedding.weight, before)


def test_dead_codes_restart_from_features_of_the_batch():
    quantizer = far_codebook_quantizer(restart_dead_codes=True, dead_code_threshold=1.0)
    torch.manual_seed(3)
    f = torch.randn(2, 4, 2, 2)
    torch.manual_seed(4)
    quantizer.quantize_for_training(f)
    codes = quantizer.embedding.weight.detach()
    inputs = quantiser_inputs(f)
    assert torch.equal(codes[0], torch.zeros(4))  # the used code stays (cluster 0.99 + 0.01 * 10 >= 1)
    # Every unused code (cluster size 0.99 < 1) is now exactly one of the batch's quantiser inputs.
    assert all(any(torch.equal(code, row) for row in inputs) for code in codes[1:])
    assert torch.all(quantizer.ema_cluster_size[1:] == 1.0)
    # The draw comes from the global RNG: the same seed restarts the same way.
    again = far_codebook_quantizer(restart_dead_codes=True)
    torch.manual_seed(4)
    again.quantize_for_training(f)
    assert torch.equal(again.embedding.weight, quantizer.embedding.weight)


def test_restarts_lift_codebook_usage_in_training():
    def usage_after_training(**options):
        tok = trainable_tokenizer(**options)
        torch.manual_seed(1)
        images = torch.rand(4, 3, 8, 8) * 2 - 1
        optimizer = torch.optim.Adam(tok.parameters(), lr=2e-3)
        for _ in range(10):
            out = tok.loss(images)
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
        return out["usage"]

    assert usage_after_training(restart_dead_codes=True) > 2 * usage_after_training()


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------

def test_codebook_aids_add_buffers_only_when_enabled():
    default = set(tiny_tokenizer().state_dict())
    assert not any("ema_cluster" in k or "ema_embed" in k for k in default)
    assert set(tiny_tokenizer(restart_dead_codes=True).state_dict()) - default == {"quantize.ema_cluster_size"}
    assert set(tiny_tokenizer(ema_codebook=True).state_dict()) - default == {
        "quantize.ema_cluster_size", "quantize.ema_embed_sum"}


def test_official_state_dict_loads_strictly_with_the_ema_codebook_on():
    source = tiny_tokenizer()
    target = MSVQTokenizer(MSVQConfig(**TINY, ema_codebook=True, restart_dead_codes=True))
    target.load_state_dict(source.state_dict(), strict=True)
    torch.testing.assert_close(target.quantize.ema_embed_sum, source.quantize.embedding.weight)
    assert torch.all(target.quantize.ema_cluster_size == 1)
    with pytest.raises(RuntimeError, match="Missing key"):
        target.load_state_dict({k: v for k, v in source.state_dict().items() if "encoder.conv_in" not in k})


@pytest.mark.parametrize("assign", [False, True])
def test_fp16_state_dict_loads_strictly_and_is_cast_to_the_model_dtype(assign):
    half = {k: v.half() for k, v in tiny_tokenizer().state_dict().items()}
    target = MSVQTokenizer(MSVQConfig(**TINY))
    target.load_state_dict(half, strict=True, assign=assign)
    loaded = target.state_dict()
    assert {v.dtype for v in loaded.values()} == {torch.float32}
    assert all(torch.equal(loaded[k], v.float()) for k, v in half.items())


def test_ema_statistics_survive_a_state_dict_round_trip():
    source = trainable_tokenizer(ema_codebook=True, restart_dead_codes=True)
    source.loss(tiny_images())
    target = MSVQTokenizer(MSVQConfig(**TINY, ema_codebook=True, restart_dead_codes=True))
    target.load_state_dict(source.state_dict(), strict=True)
    assert torch.equal(target.quantize.ema_cluster_size, source.quantize.ema_cluster_size)
    assert torch.equal(target.quantize.ema_embed_sum, source.quantize.ema_embed_sum)


# ------------------------------------------------------------------------------------------------
# Config errors
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"recon_loss": "l3"}, r"recon_loss: 'l3' is not allowed; choose one of \['l1', 'l2'\]"),
    ({"ema_decay": 1.0}, r"ema_decay: must lie strictly between 0 and 1"),
    ({"restart_dead_codes": True, "dead_code_threshold": 0}, r"dead_code_threshold: must be > 0"),
    ({"recon_weight": -1}, r"recon_weight: must be >= 0"),
    ({"codebook_weight": -0.5}, r"codebook_weight: must be >= 0"),
])
def test_training_fields_are_checked_with_the_field_named(overrides, message):
    from zoo.registry import create_tokenizer

    with pytest.raises(ConfigError, match=message):
        create_tokenizer("msvq", **TINY, **overrides)
    with pytest.raises(ConfigError, match=message.split(":")[0]):
        MSVQConfig(**{**TINY, **overrides})
