"""The dataset contract the trainer relies on.

A zoo dataset is a :class:`torch.utils.data.Dataset` whose items are ``(image, label)``: ``image`` a
float32 tensor ``(channels, image_size, image_size)`` in ``[-1, 1]``, ``label`` an int64 0-dim
tensor. It carries ``num_classes``, ``image_size``, ``channels`` and ``config`` (its dataclass).

Random augmentation is a pure function of ``(config.seed, epoch, index)`` -- never of the global RNG
or of the DataLoader worker -- so a run resumed in the middle of an epoch (after
``set_epoch(epoch)``) sees exactly the images it would have seen without the interruption.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

__all__ = ["ImageDataset"]


class ImageDataset(Dataset):
    """Base class for zoo datasets (see the module docstring for the contract).

    Subclasses set ``num_classes``, ``image_size``, ``channels`` and ``config`` and implement
    ``__len__`` and ``__getitem__``; those with random augmentation draw it from :meth:`rng`.
    ``class_names`` (a list of ``num_classes`` strings) names the labels.
    """

    num_classes: int
    image_size: int
    channels: int
    config: object
    class_names: list

    def __init__(self):
        self.epoch = 0

    @classmethod
    def describe(cls, config) -> dict:
        """What a dataset built from ``config`` will give, known without loading it: ``image_size``,
        ``channels`` and ``num_classes`` (None when only the data can tell). Recipes check models against it."""
        return {"image_size": config.image_size, "channels": getattr(config, "channels", None), "num_classes": None}

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentation ``__getitem__`` draws (call before each epoch)."""
        self.epoch = int(epoch)

    @property
    def seed(self) -> int:
        return int(getattr(self.config, "seed", 0))

    def rng(self, index: int) -> np.random.Generator:
        """The random generator for item ``index`` in the current epoch: a function of
        ``(config.seed, epoch, index)`` only."""
        return np.random.default_rng(np.random.SeedSequence([self.seed & 0xFFFFFFFFFFFFFFFF, self.epoch, int(index)]))

    def flip_for(self, index: int) -> bool:
        """Whether item ``index`` is mirrored left-right this epoch (a fair coin from :meth:`rng`)."""
        return bool(self.rng(index).integers(0, 2))

    #: How many distinct versions of an item augmentation can produce (1: none, 2: a flip), or None
    #: when augmentation is continuous. With a number, ``variant_of``/``get_variant`` let the trainer
    #: cache a frozen tokenizer's output per (item, variant) (``train.cache_tokens``).
    num_variants: int | None = None

    def variant_of(self, index: int) -> int:
        """Which of the ``num_variants`` versions ``__getitem__(index)`` gives this epoch."""
        raise NotImplementedError(f"{type(self).__name__} does not enumerate its augmentations")

    def get_variant(self, index: int, variant: int):
        """Item ``index`` as version ``variant`` (what ``__getitem__`` gives in an epoch where
        ``variant_of(index) == variant``)."""
        raise NotImplementedError(f"{type(self).__name__} does not enumerate its augmentations")

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(len={len(self)}, num_classes={self.num_classes}, "
                f"image_size={self.image_size}, channels={self.channels})")
