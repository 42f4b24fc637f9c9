"""VAR's multi-scale residual VQ tokenizer: checkpoint key names, the quantiser, Φ choice, config errors."""

from __future__ import annotations

import pytest
import torch

from zoo.config import ConfigError
from zoo.tokenizers.msvq import MSVQConfig, MSVQTokenizer, phi_index, phi_ticks

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
    assert MSVQTokenizer.describe(MSVQConfig()) == {"latent_channels": 32, "downsample": 16, "image_channels": 3}
    tok = create_tokenizer("msvq", **TINY)
    assert tok.latent_shape(8) == (8, 4, 4) and not tok.training
    assert not any(p.requires_grad for p in tok.parameters())


def test_wrong_image_side_is_rejected():
    with pytest.raises(ValueError, match="8, 8"):
        tiny_tokenizer().encode(torch.zeros(1, 3, 16, 16))
