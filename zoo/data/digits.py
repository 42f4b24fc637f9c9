"""scikit-learn's 1,797 real 8x8 handwritten digits as a tiny class-conditional image dataset.

The data ships inside scikit-learn (``sklearn.datasets.load_digits``), so nothing is downloaded.
Pixel values ``0..16`` become ``v / 16 * 2 - 1`` in ``[-1, 1]`` (background -1, ink up to 1),
upsampled to ``image_size`` with ``torch.nn.functional.interpolate`` (``align_corners=False``) and
clamped to ``[-1, 1]``. The whole set is computed once at construction (at most 1797 x 32 x 32).

``split`` selects a fixed subset: a permutation of the 1,797 indices drawn from
``numpy.random.default_rng(SPLIT_SEED)`` (always the same, whatever ``config.seed`` is, so "val"
means the same 297 images in every run and for :mod:`zoo.eval.digits_classifier`); the first
``VAL_SIZE`` = 297 are "val", the other 1,500 "train". Digits are not mirror-symmetric, so there is
no random augmentation; ``seed`` exists for the common dataset contract only.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch
import torch.nn.functional as F

from zoo.config import ConfigError
from zoo.data.base import ImageDataset
from zoo.registry import register_dataset

__all__ = ["DigitsConfig", "DigitsDataset", "digits_tensors", "split_indices", "NUM_DIGITS", "VAL_SIZE",
           "SPLIT_SEED"]

NUM_DIGITS = 1797
VAL_SIZE = 297
SPLIT_SEED = 0


@dataclasses.dataclass
class DigitsConfig:
    """Config of the ``digits`` dataset."""

    image_size: int = 16
    resize: str = "bilinear"
    split: str = "all"
    seed: int = 0

    CHOICES = {"image_size": (8, 16, 32), "resize": ("bilinear", "nearest", "bicubic"),
               "split": ("all", "train", "val")}

    def __post_init__(self):
        for key, allowed in self.CHOICES.items():
            value = getattr(self, key)
            if value not in allowed:
                raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(allowed)}")


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)  # (1797, 8, 8), values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    return images, labels


def split_indices(split: str) -> np.ndarray:
    """Sorted indices (into sklearn's order) of the ``"all"``, ``"train"`` or ``"val"`` split."""
    if split == "all":
        return np.arange(NUM_DIGITS)
    perm = np.random.default_rng(SPLIT_SEED).permutation(NUM_DIGITS)
    if split == "val":
        return np.sort(perm[:VAL_SIZE])
    if split == "train":
        return np.sort(perm[VAL_SIZE:])
    raise ValueError(f"split must be 'all', 'train' or 'val', got {split!r}")


def interpolate(images: torch.Tensor, size: tuple[int, int], resize: str = "bilinear") -> torch.Tensor:
    """``F.interpolate`` to ``size`` with mode ``resize``, ``align_corners=False`` where it applies: the
    digits dataset's upsampling (the pixel tokenizer inverts it), unclamped."""
    kwargs = {} if resize == "nearest" else {"align_corners": False}
    return F.interpolate(images, size=size, mode=resize, **kwargs)


def resize_pm1(images: torch.Tensor, image_size: int, resize: str = "bilinear") -> torch.Tensor:
    """Resize ``(N, C, h, w)`` images in ``[-1, 1]`` to ``image_size`` the way the digits dataset does."""
    if images.shape[-1] != image_size or images.shape[-2] != image_size:
        images = interpolate(images, (image_size, image_size), resize)
    return images.clamp(-1.0, 1.0)


@functools.lru_cache(maxsize=16)
def _digits_tensors_cached(image_size: int, resize: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    raw, labels = _raw_digits()
    idx = split_indices(split)
    x = torch.from_numpy(raw[idx]).unsqueeze(1) / 16.0 * 2.0 - 1.0  # (N, 1, 8, 8) in [-1, 1]
    x = resize_pm1(x, image_size, resize).contiguous()
    return x, torch.from_numpy(labels[idx]).contiguous()


def digits_tensors(image_size: int = 16, resize: str = "bilinear", split: str = "all"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """All images ``(N, 1, S, S)`` float32 in ``[-1, 1]`` and labels ``(N,)`` int64 of a split.

    Returns fresh copies (safe to modify).
    """
    DigitsConfig(image_size=image_size, resize=resize, split=split)  # validates
    x, y = _digits_tensors_cached(int(image_size), resize, split)
    return x.clone(), y.clone()


@register_dataset("digits", config=DigitsConfig,
                  description="scikit-learn's 1,797 real 8x8 handwritten digits (10 classes, 1 channel), "
                              "upsampled to 8/16/32 px; bundled, no download")
class DigitsDataset(ImageDataset):
    """The ``digits`` dataset: items ``(image (1, S, S) in [-1, 1], label 0..9)``."""

    @classmethod
    def describe(cls, config: DigitsConfig) -> dict:
        return {"image_size": config.image_size, "channels": 1, "num_classes": 10, "resize": config.resize}

    def __init__(self, config: DigitsConfig | None = None):
        super().__init__()
        self.config = config if config is not None else DigitsConfig()
        self.image_size = self.config.image_size
        self.channels = 1
        self.num_classes = 10
        self.class_names = [str(d) for d in range(10)]
        self.images, self.labels = digits_tensors(self.config.image_size, self.config.resize, self.config.split)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        return self.images[index].clone(), self.labels[index].clone()

    num_variants = 1  # no augmentation

    def variant_of(self, index: int) -> int:
        return 0

    def get_variant(self, index: int, variant: int):
        if variant != 0:
            raise ValueError(f"digits items have one variant (no augmentation), got variant {variant}")
        return self[index]
