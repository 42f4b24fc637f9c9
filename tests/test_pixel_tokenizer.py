"""The pixel tokenizer: identity, and the exact inverse of a known upsampling (``downsample``)."""

import pytest
import torch
import torch.nn.functional as F

from zoo.config import ConfigError
from zoo.data.digits import digits_tensors
from zoo.registry import create_tokenizer
from zoo.tokenizers.pixel import interpolation_matrix


def test_identity_by_default():
    tok = create_tokenizer("pixel", channels=3)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert tok.downsample == 1
    assert torch.equal(tok.encode(x), x) and torch.equal(tok.decode(x), x)


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
def test_interpolation_matrix_is_interpolate(mode):
    x = torch.randn(3, 1, 5, 7, dtype=torch.float64)
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    want = F.interpolate(x, scale_factor=2, mode=mode, **kwargs)
    got = interpolation_matrix(5, 2, mode) @ x @ interpolation_matrix(7, 2, mode).T
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("size,factor", [(16, 2), (32, 4)])
def test_digits_round_trip_to_their_native_pixels(size, factor):
    """The digits served at 16 (32) px are a bilinear upsampling of the 8x8 originals: encode recovers
    those exactly and decode gives back the served images."""
    served, _ = digits_tensors(size, "bilinear")
    native, _ = digits_tensors(8, "bilinear")
    tok = create_tokenizer("pixel", channels=1, downsample=factor)
    z = tok.encode(served[:64])
    assert z.shape == (64, 1, 8, 8) and tok.latent_shape(size) == (1, 8, 8)
    torch.testing.assert_close(z, native[:64], atol=2e-6, rtol=0)
    torch.testing.assert_close(tok.decode(z), served[:64], atol=2e-6, rtol=0)


def test_other_images_come_back_as_their_closest_upsampling():
    tok = create_tokenizer("pixel", channels=1, downsample=2)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    y = tok.decode(tok.encode(x))
    assert (y - x).abs().max() > 0.1  # information above the native resolution is dropped
    torch.testing.assert_close(tok.decode(tok.encode(y)), y, atol=1e-5, rtol=0)  # a projection


def test_bad_inputs_are_named():
    tok = create_tokenizer("pixel", channels=1, downsample=2)
    with pytest.raises(ValueError, match=r"not divisible by downsample 2"):
        tok.encode(torch.zeros(1, 1, 15, 16))
    with pytest.raises(ValueError, match=r"expected images \(N, 1, H, W\)"):
        tok.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ConfigError, match="downsample"):
        create_tokenizer("pixel", channels=1, downsample=3)


def test_recipe_refuses_an_upsampling_the_dataset_does_not_use():
    from pathlib import Path

    from zoo.recipe import load_recipe

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "mar_digits.yaml"
    assert load_recipe(recipe).tokenizer.config.downsample == 2
    with pytest.raises(ConfigError, match=r"tokenizer.resize: 'nearest' upsampling is what the tokenizer inverts.*"
                                          r"serves its images with 'bilinear'"):
        load_recipe(recipe, ["tokenizer.resize=nearest"])
