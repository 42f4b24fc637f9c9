"""Pixel tokenizers: the generator models pixels directly, at the image's size or below it.

``downsample: 1`` (the default) is the identity. ``downsample: s`` undoes a known ``s``-fold
upsampling instead: ``decode`` is that upsampling (``torch.nn.functional.interpolate`` with the
configured ``resize`` mode, ``align_corners=False``, as the digits dataset serves its 8x8 digits at
16x16), and ``encode`` is its least-squares inverse, ``P x Pᵀ`` with ``P`` the pseudo-inverse of the
1-D interpolation matrix. On images that are such an upsampling (the digits at 16 or 32 px) the
round trip is exact to float rounding: the generator models the native pixels and the decoder adds
nothing the data did not have. Other images come back as their closest upsampled image.

Why: MAR's per-token head draws each token's values independently of its neighbours' noise, so on
pixels that an interpolation made (a token's border shares its neighbours' values) the draws show
as seams and speckle; on the native pixels the interpolation is the decoder's, and exact.
"""

from __future__ import annotations

import dataclasses

import torch

from zoo.data.digits import interpolate as upsample
from zoo.registry import register_tokenizer
from zoo.tokenizers.base import Tokenizer


@dataclasses.dataclass
class PixelConfig:
    channels: int = 3  # image channels; set from the dataset by recipes
    downsample: int = 1  # 1: identity; s > 1: model the pixels of an s-fold upsampling (see the module)
    resize: str = "bilinear"  # the upsampling that decode applies (the digits dataset's ``resize``)

    CHOICES = {"channels": (1, 3, 4), "downsample": (1, 2, 4), "resize": ("bilinear", "nearest", "bicubic")}


def interpolation_matrix(size: int, factor: int, mode: str) -> torch.Tensor:
    """The (size·factor, size) matrix of 1-D :func:`upsample` by ``factor``, float64."""
    basis = torch.eye(size, dtype=torch.float64).reshape(size, 1, 1, size)
    columns = upsample(basis, (1, size * factor), mode)  # (size, 1, 1, size·factor)
    return columns.reshape(size, size * factor).T.contiguous()


@register_tokenizer("pixel", config=PixelConfig,
                    description="pixels in [-1, 1]: the identity, or the native pixels of an upsampled image")
class PixelTokenizer(Tokenizer):
    def __init__(self, config: PixelConfig):
        super().__init__(latent_channels=config.channels, downsample=config.downsample)
        self.config = config
        self._inverse: dict[tuple, torch.Tensor] = {}

    @classmethod
    def describe(cls, config: PixelConfig) -> dict:
        facts = {"latent_channels": config.channels, "downsample": config.downsample, "image_channels": config.channels}
        if config.downsample > 1:
            facts["resize"] = config.resize  # the upsampling it inverts: the dataset's must be the same
        return facts

    def _check_channels(self, x: torch.Tensor, what: str) -> None:
        if x.dim() != 4 or x.shape[1] != self.latent_channels:
            raise ValueError(f"pixel tokenizer: expected {what} (N, {self.latent_channels}, H, W), "
                             f"got shape {tuple(x.shape)}")

    def _pinv(self, side: int, x: torch.Tensor) -> torch.Tensor:
        key = (side, x.dtype, x.device)
        if key not in self._inverse:
            s = self.downsample
            matrix = torch.linalg.pinv(interpolation_matrix(side // s, s, self.config.resize))  # (side/s, side)
            self._inverse[key] = matrix.to(dtype=x.dtype, device=x.device)
        return self._inverse[key]

    def encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        self._check_channels(images, "images")
        s = self.downsample
        if s == 1:
            return images
        H, W = images.shape[-2:]
        if H % s or W % s:
            raise ValueError(f"pixel tokenizer: image size {H}x{W} is not divisible by downsample {s}")
        rows, cols = self._pinv(H, images), self._pinv(W, images)
        return torch.einsum("ih,nchw,jw->ncij", rows, images, cols)

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        self._check_channels(z, "latents")
        s = self.downsample
        if s == 1:
            return z
        return upsample(z, (z.shape[-2] * s, z.shape[-1] * s), self.config.resize)


__all__ = ["PixelConfig", "PixelTokenizer", "interpolation_matrix"]
