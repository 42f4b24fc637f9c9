"""The tokenizer contract: images in [-1, 1] (N, C, H, W) <-> what a generator models.

Continuous tokenizers map images to latents and carry the affine normalisation
``latents = (z - shift_factor) * scale_factor`` (Stable Diffusion's 0.18215, MAR's 0.2325), so
generators always see roughly unit-variance inputs. Discrete tokenizers (multi-scale VQ) add
index-level methods on top of this.
"""

from __future__ import annotations

import torch
from torch import nn


class Tokenizer(nn.Module):
    """Base class. Subclasses implement :meth:`encode_raw` / :meth:`decode_raw` on unscaled latents."""

    #: "continuous" latents or "discrete" token indices; recipes check generators against it.
    kind: str = "continuous"
    #: True if ``zoo-train`` can train it (it implements ``loss``).
    trainable: bool = False

    def __init__(self, latent_channels: int, downsample: int, scale_factor: float = 1.0, shift_factor: float = 0.0):
        super().__init__()
        self.latent_channels = latent_channels
        self.downsample = downsample
        self.scale_factor = scale_factor
        self.shift_factor = shift_factor

    @classmethod
    def describe(cls, config) -> dict:
        """Shape facts of a tokenizer built from ``config``, known without building it:
        ``latent_channels``, ``downsample`` (spatial stride) and ``image_channels``."""
        raise NotImplementedError

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents of a square image of side ``image_size``."""
        if image_size % self.downsample:
            raise ValueError(f"image size {image_size} is not divisible by the tokenizer's stride {self.downsample}")
        side = image_size // self.downsample
        return (self.latent_channels, side, side)

    def encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] -> normalised latents."""
        return (self.encode_raw(images) - self.shift_factor) * self.scale_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images in (approximately) [-1, 1]."""
        return self.decode_raw(latents / self.scale_factor + self.shift_factor)

    @torch.no_grad()
    def training_inputs(self, images: torch.Tensor):
        """What a generator's ``loss`` receives for these images during training (no gradient
        reaches the tokenizer): the normalised latents by default; discrete tokenizers return what
        their generator family trains on (msvq: the index pyramid and VAR's teacher-forcing input)."""
        return self.encode(images)

    #: True if :meth:`cache_inputs` / :meth:`inputs_from_cache` are implemented: the encoder's part
    #: of ``training_inputs`` is then a deterministic function of the image (what remains, such as a
    #: KL posterior's draw, happens in ``inputs_from_cache`` from the step's RNG), and the trainer may
    #: store it per image (``train.cache_tokens``) instead of running the encoder at every step.
    cacheable: bool = False

    def cache_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """A compact per-image tensor (first dimension = batch) from which :meth:`inputs_from_cache`,
        called with the same RNG state, rebuilds exactly ``training_inputs(images)``."""
        raise NotImplementedError(f"tokenizer {type(self).__name__} does not cache its training inputs")

    def inputs_from_cache(self, cached: torch.Tensor):
        raise NotImplementedError(f"tokenizer {type(self).__name__} does not cache its training inputs")

    def loss(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training losses of the tokenizer itself (0-dim tensors, ``loss`` among them); only
        tokenizers with ``trainable = True`` implement it."""
        raise NotImplementedError(f"tokenizer {type(self).__name__} cannot be trained (trainable = False)")
