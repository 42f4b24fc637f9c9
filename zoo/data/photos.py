"""Super-resolution pairs: ``photos`` (scikit-image's bundled photographs) and ``pairs`` (your own HR folder).

Both give items ``(target, cond)`` for the trainer's ``(image, label)`` slots:

- ``target`` (C, S, S) in [-1, 1]: the high-resolution patch (``target: image``) or, with
  ``target: residual``, what bicubic upsampling of the low-resolution patch misses, times
  ``residual_gain`` and clamped: ``clamp((hr − up(lr)) · gain, −1, 1)``. A generator that models
  the residual adds it back with :func:`compose_residual`;
- ``cond`` a dict: ``lr`` (C, S/scale, S/scale) in [-1, 1], the low-resolution patch, and
  ``label`` (int64): 0 for a real high-quality target, 1 for a *low-quality* target — with
  probability ``negative_rate`` an item's target is replaced by the bicubic upsample of its own
  low-resolution patch (zero residual) and labelled 1, which is what VARSR's image-based
  classifier-free guidance steers away from.

Low-resolution patches are made by PIL's bicubic resize (antialiased, MATLAB-like) of the HR patch
(``degradation: bicubic``), or by a seeded Real-ESRGAN-style chain (``realesrgan``): Gaussian blur,
bicubic downsampling, Gaussian noise and JPEG compression with random strengths. Upsampling back
(:func:`bicubic_upsample`) is ``torch.nn.functional.interpolate(mode="bicubic",
align_corners=False)``, the same everywhere (datasets, VAR-SR, zoo-upscale's baseline).

Patches are random crops (and flips), a pure function of ``(seed, epoch, index)``; the ``val``
split crops on a fixed grid without flips. ``photos`` splits by image: the validation photographs
(``VAL_IMAGES``) are never cropped for training.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from zoo.config import ConfigError
from zoo.data.base import ImageDataset
from zoo.data.imagefolder import find_images, load_image
from zoo.data.transforms import to_tensor_pm1
from zoo.registry import register_dataset

__all__ = ["PhotosConfig", "PhotosDataset", "PairsConfig", "PairsDataset", "TRAIN_IMAGES", "VAL_IMAGES",
           "bicubic_upsample", "compose_residual", "degrade", "photo"]

# scikit-image ships these with the package (no download). Grey photographs are served as RGB. Training
# uses natural photographs only: the texture images (grass, gravel, brick) and the moon have residuals
# no model can predict from the LR patch, and with them even a plain MSE-trained CNN ends up below
# bicubic on chelsea and clock (docs/var-sr.md has the measurement).
TRAIN_IMAGES = ("astronaut", "coffee", "rocket", "camera", "coins", "motorcycle_left", "motorcycle_right")
VAL_IMAGES = ("chelsea", "clock")
NEGATIVE_LABEL = 1


def bicubic_upsample(lr_BCHW: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Low-resolution images (B, C, h, w) in [-1, 1] -> bicubic upsample (B, C, *size), clamped to [-1, 1]."""
    return F.interpolate(lr_BCHW.float(), size=size, mode="bicubic", align_corners=False).clamp_(-1, 1)


def compose_residual(lr_BCHW: torch.Tensor, residual_BCHW: torch.Tensor, gain: float) -> torch.Tensor:
    """The image a residual target stands for: ``up(lr) + residual / gain``, clamped to [-1, 1]."""
    up = bicubic_upsample(lr_BCHW, tuple(residual_BCHW.shape[-2:]))
    return (up + residual_BCHW.float() / gain).clamp_(-1, 1)


def degrade(hr: Image.Image, scale: int, kind: str, rng: np.random.Generator | None = None) -> Image.Image:
    """The low-resolution version (sides // scale) of a PIL image: ``bicubic`` (deterministic) or
    ``realesrgan`` (blur sigma U(0.2, 2), bicubic down, Gaussian noise sigma U(0, 10)/255, JPEG
    quality U{40..95}; strengths drawn from ``rng``)."""
    size = (max(1, hr.width // scale), max(1, hr.height // scale))
    if kind == "bicubic":
        return hr.resize(size, resample=Image.BICUBIC)
    if kind != "realesrgan":
        raise ValueError(f"degradation: {kind!r} is not allowed; choose 'bicubic' or 'realesrgan'")
    rng = rng if rng is not None else np.random.default_rng(0)
    image = hr.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.2, 2.0))))
    image = image.resize(size, resample=Image.BICUBIC)
    arr = np.asarray(image).astype(np.float32)
    arr = arr + rng.normal(0.0, float(rng.uniform(0.0, 10.0)), size=arr.shape)
    image = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), mode=image.mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(40, 96)))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert(hr.mode)


def _rescaled(images: list[np.ndarray], names: list[str], factors: tuple[float, ...]):
    """The images and, for each factor below 1, each image downscaled by it (PIL bicubic, antialiased):
    a photograph seen from further away is one more scene to learn from, with the same kind of detail."""
    out_images, out_names = [], []
    for factor in factors:
        for arr, name in zip(images, names):
            if factor == 1.0:
                out_images.append(arr)
                out_names.append(name)
                continue
            size = (max(1, round(arr.shape[1] * factor)), max(1, round(arr.shape[0] * factor)))
            out_images.append(np.asarray(Image.fromarray(arr).resize(size, resample=Image.BICUBIC)))
            out_names.append(f"{name}@{factor:g}")
    return out_images, out_names


@functools.lru_cache(maxsize=32)
def photo(name: str) -> np.ndarray:
    """A scikit-image photograph by name as uint8 HWC RGB (grey ones replicated to 3 channels)."""
    import skimage.data

    if name in ("motorcycle_left", "motorcycle_right"):  # the two views of skimage.data.stereo_motorcycle()
        arr = np.asarray(skimage.data.stereo_motorcycle()[0 if name == "motorcycle_left" else 1])
    else:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            raise ConfigError(f"data: scikit-image has no photograph {name!r}")
        arr = np.asarray(loader())
    if arr.dtype != np.uint8:
        arr = (arr.astype(np.float64) * (255 if arr.max() <= 1 else 1)).clip(0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


@dataclasses.dataclass
class SRConfig:
    """Fields shared by the super-resolution datasets."""

    image_size: int = 32  # side of the high-resolution patches
    scale: int = 4  # upscaling factor: LR patches are image_size // scale
    degradation: str = "bicubic"
    target: str = "image"
    residual_gain: float = 4.0  # target = clamp((hr - up(lr)) * gain) with target: residual
    negative_rate: float = 0.0  # fraction of items turned into low-quality targets (label 1) for image CFG
    patches_per_image: int = 64  # random crops per image and epoch (val: a fixed grid of at most this many)
    random_flip: bool = True
    random_rotate: bool = False  # also a random quarter turn: with random_flip, the 8 symmetries of the square
    image_scales: tuple[float, ...] = (1.0,)  # training photographs also downscaled by these factors (more scenes)
    channels: int = 3
    seed: int = 0

    CHOICES = {"scale": (2, 4), "degradation": ("bicubic", "realesrgan"), "target": ("image", "residual"),
               "channels": (1, 3)}

    def __post_init__(self):
        if self.image_size < 4 or self.image_size % self.scale:
            raise ConfigError(f"image_size: {self.image_size} must be >= 4 and divisible by scale {self.scale}")
        if self.residual_gain <= 0:
            raise ConfigError(f"residual_gain: must be > 0, got {self.residual_gain}")
        if not 0.0 <= self.negative_rate < 1.0:
            raise ConfigError(f"negative_rate: must be in [0, 1), got {self.negative_rate}")
        if self.patches_per_image < 1:
            raise ConfigError(f"patches_per_image: must be >= 1, got {self.patches_per_image}")
        scales = tuple(self.image_scales)
        if not scales or not all(isinstance(f, (int, float)) and 0 < f <= 1 for f in scales):
            raise ConfigError(f"image_scales: must be a non-empty list of factors in (0, 1], got {list(scales)}")
        self.image_scales = tuple(float(f) for f in scales)


class SRPatches(ImageDataset):
    """Patches of a list of HR images (uint8 HWC arrays, optionally with matching LR arrays)."""

    num_classes = 2  # 0: high-quality target, 1: low-quality (the image-CFG negative)
    class_names = ["high-quality", "low-quality"]
    num_variants = None  # random crops: continuous augmentation

    def __init__(self, config: SRConfig, images: list[np.ndarray], names: list[str], validation: bool,
                 lr_images: list[np.ndarray] | None = None):
        super().__init__()
        self.config = config
        self.image_size, self.channels, self.scale = config.image_size, config.channels, config.scale
        self.validation = validation
        if not validation and config.image_scales != (1.0,):
            if lr_images is not None:
                raise ConfigError("data.image_scales: the LR images of lr_root belong to the full-size photographs; "
                                  "leave image_scales at [1.0] with lr_root")
            images, names = _rescaled(images, names, config.image_scales)
        self.names = names
        self.images, self.lr_images = [], []
        if lr_images is None and config.degradation == "bicubic":
            # LR patches are crops of the whole photograph's LR, exactly as zoo-upscale --eval makes them
            # (downscaling each HR patch on its own would treat its edges as the image's border).
            images = [np.ascontiguousarray(arr[:arr.shape[0] // self.scale * self.scale,
                                               :arr.shape[1] // self.scale * self.scale]) for arr in images]
            lr_images = [np.asarray(degrade(Image.fromarray(arr), self.scale, "bicubic")) for arr in images]
        for i, (arr, name) in enumerate(zip(images, names)):
            if min(arr.shape[:2]) < config.image_size:
                raise ConfigError(f"data: image {name!r} is {arr.shape[1]}x{arr.shape[0]}, smaller than "
                                  f"image_size {config.image_size}")
            self.images.append(arr)
            if lr_images is not None:
                lr = lr_images[i]
                want = (arr.shape[0] // config.scale, arr.shape[1] // config.scale)
                if lr.shape[:2] != want:
                    raise ConfigError(f"data.lr_root: low-resolution image for {name!r} is {lr.shape[1]}x{lr.shape[0]}"
                                      f", expected {want[1]}x{want[0]} (the HR size // scale {config.scale})")
                self.lr_images.append(lr)
        self._grids = [self._grid(arr) for arr in self.images] if validation else None

    def _grid(self, arr: np.ndarray) -> list[tuple[int, int]]:
        s, step = self.image_size, self.scale
        per_side = max(1, int(np.sqrt(self.config.patches_per_image)))
        tops = np.linspace(0, arr.shape[0] - s, per_side).astype(int) // step * step
        lefts = np.linspace(0, arr.shape[1] - s, per_side).astype(int) // step * step
        return [(int(t), int(left)) for t in tops for left in lefts]

    def __len__(self) -> int:
        if self.validation:
            return sum(len(g) for g in self._grids)
        return len(self.images) * self.config.patches_per_image

    def _locate(self, index: int) -> tuple[int, int, int, bool, np.random.Generator]:
        rng = self.rng(index)
        if self.validation:
            for image_index, grid in enumerate(self._grids):
                if index < len(grid):
                    return image_index, *grid[index], False, rng
                index -= len(grid)
            raise IndexError(index)
        image_index = index // self.config.patches_per_image
        arr = self.images[image_index]
        s, step = self.image_size, self.scale
        top = int(rng.integers(0, (arr.shape[0] - s) // step + 1)) * step  # LR-aligned crops
        left = int(rng.integers(0, (arr.shape[1] - s) // step + 1)) * step
        return image_index, top, left, self.config.random_flip and bool(rng.integers(0, 2)), rng

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} patches")
        cfg = self.config
        image_index, top, left, flip, rng = self._locate(index)
        turns = int(rng.integers(0, 4)) if cfg.random_rotate and not self.validation else 0
        s = self.image_size
        hr = Image.fromarray(self.images[image_index][top:top + s, left:left + s])
        if self.lr_images:
            t, r = top // cfg.scale, left // cfg.scale
            lr = Image.fromarray(self.lr_images[image_index][t:t + s // cfg.scale, r:r + s // cfg.scale])
        else:
            lr = degrade(hr, cfg.scale, cfg.degradation, rng)
        if cfg.channels == 1:
            hr, lr = hr.convert("L"), lr.convert("L")
        hr_t, lr_t = to_tensor_pm1(np.asarray(hr)), to_tensor_pm1(np.asarray(lr))
        if flip:
            hr_t, lr_t = hr_t.flip(-1), lr_t.flip(-1)
        if turns:
            hr_t, lr_t = torch.rot90(hr_t, turns, dims=(-2, -1)), torch.rot90(lr_t, turns, dims=(-2, -1))
        label = 0
        if cfg.negative_rate > 0 and not self.validation and rng.uniform() < cfg.negative_rate:
            hr_t, label = bicubic_upsample(lr_t[None], (s, s))[0], NEGATIVE_LABEL
        if cfg.target == "residual":
            up = bicubic_upsample(lr_t[None], (s, s))[0]
            target = ((hr_t - up) * cfg.residual_gain).clamp_(-1, 1)
        else:
            target = hr_t
        return target.contiguous(), {"lr": lr_t.contiguous(), "label": torch.tensor(label, dtype=torch.int64)}

    def sample_conditions(self, num: int) -> dict[str, torch.Tensor]:
        """Conditions of the first ``num`` items (for sample grids): the batched ``cond`` dict."""
        items = [self[i][1] for i in range(min(num, len(self)))]
        return {"lr": torch.stack([c["lr"] for c in items]), "label": torch.stack([c["label"] for c in items])}

    @classmethod
    def describe(cls, config) -> dict:
        return {"image_size": config.image_size, "channels": config.channels, "num_classes": 2,
                "scale": config.scale, "target": config.target, "residual_gain": config.residual_gain}


@dataclasses.dataclass
class PhotosConfig(SRConfig):
    """Config of the ``photos`` dataset."""

    split: str = "train"

    CHOICES = {**SRConfig.CHOICES, "split": ("train", "val")}

    def __post_init__(self):
        super().__post_init__()
        if self.split not in self.CHOICES["split"]:
            raise ConfigError(f"split: {self.split!r} is not allowed; choose one of {list(self.CHOICES['split'])}")


@register_dataset("photos", config=PhotosConfig,
                  description="super-resolution patches of scikit-image's bundled photographs (train: 7 images, "
                              "val: chelsea and clock), LR by bicubic or Real-ESRGAN-style degradation; no download")
class PhotosDataset(SRPatches):
    def __init__(self, config: PhotosConfig | None = None):
        config = config if config is not None else PhotosConfig()
        names = list(VAL_IMAGES if config.split == "val" else TRAIN_IMAGES)
        super().__init__(config, [photo(n) for n in names], names, validation=config.split == "val")


@dataclasses.dataclass
class PairsConfig(SRConfig):
    """Config of the ``pairs`` dataset: ``hr_root`` (a folder of HR images) and optionally
    ``lr_root`` (their low-resolution versions, same file names, sides = HR // scale)."""

    hr_root: str = ""
    lr_root: str = ""
    split: str = "train"  # "val": fixed grid crops, no flips and no negatives

    CHOICES = {**SRConfig.CHOICES, "split": ("train", "val")}


@register_dataset("pairs", config=PairsConfig,
                  description="super-resolution patches of your HR folder (hr_root), LR made on the fly or read "
                              "from lr_root (same file names)")
class PairsDataset(SRPatches):
    def __init__(self, config: PairsConfig | None = None):
        config = config if config is not None else PairsConfig()
        if not config.hr_root or not os.path.isdir(config.hr_root):
            raise ConfigError(f"data.hr_root: {config.hr_root!r} is not a folder; set it to a folder of "
                              f"high-resolution images")
        paths, _, _ = find_images(config.hr_root)
        lr_images = None
        if config.lr_root:
            if not os.path.isdir(config.lr_root):
                raise ConfigError(f"data.lr_root: {config.lr_root!r} is not a folder")
            by_stem = {os.path.splitext(os.path.basename(p))[0]: p for p in find_images(config.lr_root)[0]}
            lr_images = []
            for path in paths:
                stem = os.path.splitext(os.path.basename(path))[0]
                if stem not in by_stem:
                    raise ConfigError(f"data.lr_root: no low-resolution image named {stem}.* in {config.lr_root!r} "
                                      f"for {path!r}")
                lr_images.append(np.asarray(load_image(by_stem[stem], 3)))
        images = []
        for path in paths:
            arr = np.asarray(load_image(path, 3))
            h, w = arr.shape[0] // config.scale * config.scale, arr.shape[1] // config.scale * config.scale
            images.append(np.ascontiguousarray(arr[:h, :w]))
        super().__init__(config, images, paths, validation=config.split == "val", lr_images=lr_images)
