"""A folder of images on disk, optionally one sub-folder per class.

Two layouts are accepted under ``root``:

* **class folders** -- ``root/<class_name>/**/*.png`` (sub-folders of a class folder are searched
  too): classes are the non-hidden sub-folders of ``root`` sorted by name, label ``i`` is the
  ``i``-th of them. Every class folder must hold at least one image (an empty one would silently
  shift the labels of the classes after it). Images lying directly in ``root`` are then ignored
  with a warning.
* **flat** -- no sub-folder holds an image, the images lie directly in ``root``: every image has
  label 0 and ``num_classes`` is 1 (class name ``""``).

Images are files with extension ``.png``, ``.jpg``, ``.jpeg``, ``.bmp`` or ``.webp`` (any case);
hidden files and folders (name starting with ".") are skipped. Each image is converted to "RGB"
(``channels=3``, alpha dropped) or "L" (``channels=1``), centre-cropped ADM-style to ``image_size``
(:func:`zoo.data.transforms.center_crop_arr`), mirrored left-right with probability 1/2 when
``random_flip`` (a function of ``(seed, epoch, index)``, see :class:`zoo.data.base.ImageDataset`)
and mapped to ``[-1, 1]``.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np
import torch
from PIL import Image

from zoo.config import ConfigError
from zoo.data.base import ImageDataset
from zoo.data.transforms import center_crop_arr, to_tensor_pm1
from zoo.registry import register_dataset

__all__ = ["ImageFolderConfig", "ImageFolderDataset", "IMAGE_EXTENSIONS", "find_images"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclasses.dataclass
class ImageFolderConfig:
    """Config of the ``imagefolder`` dataset."""

    root: str = ""
    image_size: int = 256
    random_flip: bool = True
    channels: int = 3
    seed: int = 0

    CHOICES = {"channels": (1, 3)}

    def __post_init__(self):
        if self.channels not in self.CHOICES["channels"]:
            raise ConfigError(f"channels: {self.channels!r} is not allowed; choose one of [1, 3]")
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ConfigError(f"image_size: must be a positive integer, got {self.image_size!r}")


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(folder: str) -> list[str]:
    """Image files anywhere below ``folder`` (hidden entries skipped), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(os.path.join(dirpath, f) for f in filenames if _is_image(f))
    return sorted(found)


def find_images(root: str) -> tuple[list[str], list[int], list[str]]:
    """``(paths, labels, class_names)`` for ``root`` in one of the two layouts (module docstring).

    Raises :class:`ConfigError` naming ``root`` when it is missing, not a folder or holds no image.
    """
    accepted = ", ".join(IMAGE_EXTENSIONS)
    if not root:
        raise ConfigError("data.root: is empty; set it to a folder of images "
                          "(root/<class_name>/*.png, or a flat folder of images)")
    if not os.path.exists(root):
        raise ConfigError(f"data.root: {root!r} does not exist")
    if not os.path.isdir(root):
        raise ConfigError(f"data.root: {root!r} is not a folder")
    entries = sorted(os.listdir(root))
    subdirs = [e for e in entries if not e.startswith(".") and os.path.isdir(os.path.join(root, e))]
    top_images = [os.path.join(root, e) for e in entries
                  if _is_image(e) and os.path.isfile(os.path.join(root, e))]
    per_class = {d: _images_under(os.path.join(root, d)) for d in subdirs}
    if any(per_class.values()):
        empty = [d for d, files in per_class.items() if not files]
        if empty:
            raise ConfigError(f"data.root: class folder {os.path.join(root, empty[0])!r} holds no images "
                              f"(accepted extensions: {accepted}); remove it or add images, since "
                              f"classes are numbered by sorted folder name")
        if top_images:
            warnings.warn(f"data.root: {root!r} has class folders; ignoring the {len(top_images)} images "
                          f"lying directly in it (e.g. {top_images[0]!r})", stacklevel=3)
        paths, labels = [], []
        for label, name in enumerate(subdirs):
            paths.extend(per_class[name])
            labels.extend([label] * len(per_class[name]))
        return paths, labels, list(subdirs)
    if top_images:
        return top_images, [0] * len(top_images), [""]
    raise ConfigError(f"data.root: no images found in {root!r} or its sub-folders "
                      f"(accepted extensions, any case: {accepted})")


def load_image(path: str, channels: int) -> Image.Image:
    """Open ``path`` as "RGB" (``channels=3``) or "L" (``channels=1``); ConfigError naming it if unreadable."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("P", "PA"):  # palette transparency converts cleanly only via RGBA
                image = image.convert("RGBA")
            return image.convert("RGB" if channels == 3 else "L")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ConfigError(f"data.root: cannot read image file {path!r}: {err}") from err


@register_dataset("imagefolder", config=ImageFolderConfig,
                  description="images on disk: root/<class_name>/*.{png,jpg,jpeg,bmp,webp} "
                              "(or a flat folder, one class), ADM centre crop, random flip")
class ImageFolderDataset(ImageDataset):
    """The ``imagefolder`` dataset: items ``(image (channels, S, S) in [-1, 1], label)``."""

    def __init__(self, config: ImageFolderConfig | None = None):
        super().__init__()
        self.config = config if config is not None else ImageFolderConfig()
        self.root = self.config.root
        self.image_size = self.config.image_size
        self.channels = self.config.channels
        self.paths, labels, self.class_names = find_images(self.config.root)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        return self.get_variant(index, self.variant_of(index))

    @property
    def num_variants(self) -> int:
        return 2 if self.config.random_flip else 1  # the crop is fixed; only the flip varies

    def variant_of(self, index: int) -> int:
        return int(self.config.random_flip and self.flip_for(index))

    def get_variant(self, index: int, variant: int):
        if not 0 <= variant < self.num_variants:
            raise ValueError(f"variant {variant}: this dataset has {self.num_variants} (random_flip="
                             f"{self.config.random_flip})")
        arr = center_crop_arr(load_image(self.paths[index], self.channels), self.image_size)
        if variant:
            arr = arr[:, ::-1]
        return to_tensor_pm1(np.ascontiguousarray(arr)), self.labels[index].clone()
