"""The identity tokenizer: generators model pixels directly."""

from __future__ import annotations

import dataclasses

import torch

from zoo.registry import register_tokenizer
from zoo.tokenizers.base import Tokenizer


@dataclasses.dataclass
class PixelConfig:
    channels: int = 3  # image channels; set from the dataset by recipes

    CHOICES = {"channels": (1, 3, 4)}


@register_tokenizer("pixel", config=PixelConfig, description="identity: the generator sees pixels in [-1, 1]")
class PixelTokenizer(Tokenizer):
    def __init__(self, config: PixelConfig):
        super().__init__(latent_channels=config.channels, downsample=1)
        self.config = config

    @classmethod
    def describe(cls, config: PixelConfig) -> dict:
        return {"latent_channels": config.channels, "downsample": 1, "image_channels": config.channels}

    def encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] != self.latent_channels:
            raise ValueError(f"pixel tokenizer: expected {self.latent_channels}-channel images, "
                             f"got shape {tuple(images.shape)}")
        return images

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return z
