"""The LDM ``AutoencoderKL`` latent tokenizer: its configuration, named in recipes today.

The network itself (encoder/decoder, Gaussian posterior, loading MAR's ``kl16.ckpt`` and the
Stable Diffusion VAE) arrives with the MAR issue. Until then recipes naming ``kl-vae`` parse and
validate (latent channels and stride are known from the config), and building one says so.
"""

from __future__ import annotations

import dataclasses

from zoo.config import ConfigError
from zoo.registry import register_tokenizer
from zoo.tokenizers.base import Tokenizer

# Known architectures: (ch_mult, z_channels, embed_dim, scale_factor).
PRESETS = {
    "sd-vae-ft-ema": ((1, 2, 4, 4), 4, 4, 0.18215),
    "sd-vae-ft-mse": ((1, 2, 4, 4), 4, 4, 0.18215),
    "mar-kl16": ((1, 1, 2, 2, 4), 16, 16, 0.2325),
}


@dataclasses.dataclass
class KLVAEConfig:
    preset: str = ""  # one of PRESETS, or "" to give the fields below
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    image_channels: int = 3
    scale_factor: float = 0.18215
    pretrained: str = ""  # path to weights

    CHOICES = {"preset": ("", *PRESETS)}

    def __post_init__(self):
        if self.preset:
            self.ch_mult, self.z_channels, self.embed_dim, self.scale_factor = PRESETS[self.preset]
        if not self.ch_mult:
            raise ConfigError("ch_mult must list at least one multiplier")


@register_tokenizer("kl-vae", config=KLVAEConfig,
                    description="LDM AutoencoderKL (SD-VAE f8, MAR KL-16) — network arrives with the MAR issue")
class KLVAETokenizer(Tokenizer):
    @classmethod
    def describe(cls, config: KLVAEConfig) -> dict:
        return {"latent_channels": config.embed_dim, "downsample": 2 ** (len(config.ch_mult) - 1),
                "image_channels": config.image_channels}

    def __init__(self, config: KLVAEConfig):
        raise NotImplementedError("the kl-vae tokenizer network is not in this version of zoo yet (it arrives with "
                                  "the MAR issue); recipes that name it can be validated but not trained")
