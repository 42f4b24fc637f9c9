"""What a generator's config must agree with, as plain values: the layer below recipes and generators.

Recipe validation (:func:`zoo.recipe.validate_combination`) describes the recipe's tokenizer, data
and objective as a :class:`Fit` and hands it to the generator's ``check_fit(config, fit)``; the
generator raises :class:`FitError` naming the recipe key at fault, and the recipe layer prefixes the
file. So a generator checks sizes without knowing what a recipe is.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from zoo.config import ConfigError


class FitError(ConfigError):
    """A config value that does not fit the rest of the recipe: ``key`` (``model.in_channels``) and why."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclasses.dataclass(frozen=True)
class Fit:
    """The parts of a recipe a generator's config must fit, described without building anything."""

    tokenizer_name: str
    tokenizer: dict[str, Any]  # the tokenizer's describe(): latent_channels, downsample, image_channels, ...
    tokenizer_config: Any  # its config dataclass (fields such as v_patch_nums, vocab_size, z_channels)
    data_name: str
    data: dict[str, Any]  # the dataset's describe(): image_size, channels, num_classes, (scale, target, ...)
    objective_name: str | None = None
    objective_config: Any = None
    objective_predicts_variance: bool | None = None  # None: the objective does not say
    cache_tokens: bool = False  # train.cache_tokens


def check_image_channels(fit: Fit) -> None:
    """The tokenizer reads the dataset's images: their channels, and (a pixel tokenizer with
    ``downsample``) the upsampling that served them."""
    channels, takes = fit.data.get("channels"), fit.tokenizer.get("image_channels")
    if channels is not None and takes not in (None, channels):
        raise FitError("tokenizer", f"takes {takes}-channel images but the dataset gives {channels}-channel images; "
                                    f"set tokenizer.channels={channels}")
    inverts, served = fit.tokenizer.get("resize"), fit.data.get("resize")
    if inverts is not None and served is not None and inverts != served:
        raise FitError("tokenizer.resize", f"{inverts!r} upsampling is what the tokenizer inverts, but the dataset "
                                           f"serves its images with {served!r}; set tokenizer.resize={served}")


def check_latent_fit(config, fit: Fit, channels_key: str, size_key: str, classes_key: str = "num_classes") -> None:
    """A latent generator's channels, side and classes agree with the tokenizer and the data."""
    check_image_channels(fit)
    latent = fit.tokenizer["latent_channels"]
    if getattr(config, channels_key) != latent:
        raise FitError(f"model.{channels_key}", f"{getattr(config, channels_key)} does not match the {latent} latent "
                                                f"channels of tokenizer {fit.tokenizer_name!r}; set "
                                                f"model.{channels_key}={latent}")
    size, stride = fit.data.get("image_size"), fit.tokenizer["downsample"]
    if size is not None:
        if size % stride:
            raise FitError("data.image_size", f"{size} is not divisible by the tokenizer's stride {stride}")
        side = size // stride
        if getattr(config, size_key) != side:
            raise FitError(f"model.{size_key}", f"{getattr(config, size_key)} does not match the latent side {side} "
                                                f"(data.image_size {size} / tokenizer stride {stride}); set "
                                                f"model.{size_key}={side}")
    check_classes(config, fit, classes_key)


def check_classes(config, fit: Fit, classes_key: str = "num_classes") -> None:
    classes = fit.data.get("num_classes")
    if classes is not None and getattr(config, classes_key) != classes:
        raise FitError(f"model.{classes_key}", f"{getattr(config, classes_key)} but dataset {fit.data_name!r} has "
                                               f"{classes} classes; set model.{classes_key}={classes}")


def check_token_pyramid(config, fit: Fit, extra: tuple[tuple[str, str], ...] = ()) -> None:
    """A VAR-like generator's scales, vocabulary and code width equal its multi-scale tokenizer's,
    and its last scale times the tokenizer's stride is the image side. ``extra``: further
    (tokenizer field, model field) pairs that must be equal."""
    tok = fit.tokenizer_config
    if hasattr(tok, "v_patch_nums"):
        pairs = (("v_patch_nums", "patch_nums"), ("vocab_size", "vocab_size"), ("z_channels", "Cvae"), *extra)
        for tok_key, model_key in pairs:
            tok_value, model_value = getattr(tok, tok_key), getattr(config, model_key)
            if isinstance(tok_value, (list, tuple)):
                tok_value, model_value = tuple(tok_value), tuple(model_value)
            if tok_value != model_value:
                raise FitError(f"model.{model_key}", f"{model_value} disagrees with tokenizer.{tok_key}={tok_value}; "
                                                     f"set both the same")
    stride, size = fit.tokenizer.get("downsample"), fit.data.get("image_size")
    if size is not None and stride and size != config.patch_nums[-1] * stride:
        raise FitError("model.patch_nums", f"the last scale ({config.patch_nums[-1]}) times the tokenizer's stride "
                                           f"({stride}) must equal data.image_size ({size})")
