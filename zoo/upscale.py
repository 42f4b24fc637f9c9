"""Super-resolution of whole images of any size with a VAR-SR model directory (what ``zoo-upscale`` calls).

A VAR-SR model works on fixed LR patches (``data.image_size / scale`` pixels). :func:`upscale_tiled`
covers an image with overlapping tiles (the last row and column aligned to the border, so no
padding is needed once the image is at least one tile), upscales them in batches and blends the
HR tiles with weights that ramp linearly over the overlap, so seams fade and memory stays bounded
by one batch of tiles plus the output. :func:`read_image` / :func:`upscale_file` handle grey and
RGBA files (the alpha channel is upscaled bicubically, apart from the model), and
:func:`evaluate_folder` measures PSNR and SSIM against ground truth beside the bicubic baseline.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from zoo.data.photos import bicubic_upsample, degrade
from zoo.data.transforms import to_tensor_pm1, to_uint8
from zoo.progress import progress_bar

__all__ = ["upscale_tiled", "tile_starts", "blend_window", "dihedral", "bicubic_downscale", "back_project", "SRModel",
           "read_image", "upscale_file", "psnr_ssim", "evaluate_folder", "mean_scores", "detail_window", "crop_grid"]


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets along one side: every ``tile − overlap`` pixels, the last one flush with the end."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def blend_window(side: int, ramp: int) -> torch.Tensor:
    """(side,) weights rising linearly over ``ramp`` pixels at both ends (never 0, so image borders,
    covered by one tile only, keep their value)."""
    i = torch.arange(side, dtype=torch.float32)
    distance = torch.minimum(i + 0.5, side - i - 0.5)
    return (distance / max(ramp, 1)).clamp(1e-3, 1.0)


@torch.no_grad()
def upscale_tiled(upscale_fn: Callable[[torch.Tensor], torch.Tensor], lr_CHW: torch.Tensor, scale: int, tile: int,
                  overlap: int, batch_size: int = 16, on_batch: Callable[[], None] | None = None) -> torch.Tensor:
    """Upscale one image (C, h, w) in [-1, 1] by ``scale`` with ``upscale_fn`` on (N, C, tile, tile)
    LR tiles -> (N, C, tile·scale, tile·scale), blending overlaps; returns (C, h·scale, w·scale).
    ``on_batch`` is called after each batch of tiles (a progress bar's update).

    Images smaller than a tile are edge-padded to one tile and the result cropped back.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile) = [0, {tile}), got {overlap}")
    C, h, w = lr_CHW.shape
    H, W = max(h, tile), max(w, tile)
    if (H, W) != (h, w):
        lr_CHW = torch.nn.functional.pad(lr_CHW[None], (0, W - w, 0, H - h), mode="replicate")[0]
    T = tile * scale
    window = blend_window(T, overlap * scale)
    weight_TT = window[:, None] * window[None, :]
    out = torch.zeros(C, H * scale, W * scale)
    total = torch.zeros(1, H * scale, W * scale)
    boxes = [(top, left) for top in tile_starts(H, tile, overlap) for left in tile_starts(W, tile, overlap)]
    for start in range(0, len(boxes), batch_size):
        chunk = boxes[start:start + batch_size]
        tiles = torch.stack([lr_CHW[:, t:t + tile, left:left + tile] for t, left in chunk])
        hr = upscale_fn(tiles).float().cpu()
        if hr.shape != (len(chunk), C, T, T):
            raise ValueError(f"upscale_fn returned {tuple(hr.shape)} for tiles {tuple(tiles.shape)}; expected "
                             f"{(len(chunk), C, T, T)}")
        for (t, left), tile_hr in zip(chunk, hr):
            out[:, t * scale:t * scale + T, left * scale:left * scale + T] += tile_hr * weight_TT
            total[:, t * scale:t * scale + T, left * scale:left * scale + T] += weight_TT
        if on_batch is not None:
            on_batch()
    return (out / total)[:, :h * scale, :w * scale]


def bicubic_downscale(image_CHW: torch.Tensor, scale: int) -> torch.Tensor:
    """(C, H, W) -> (C, H // scale, W // scale) by PIL's bicubic resize (antialiased: the kernel widened
    ``scale`` times) on float channels: the operator ``degrade(..., "bicubic")`` applies to the ``photos``
    data and ``--eval`` images, without its rounding to uint8."""
    size = (max(1, image_CHW.shape[-1] // scale), max(1, image_CHW.shape[-2] // scale))
    channels = [np.asarray(Image.fromarray(c.numpy()).resize(size, resample=Image.BICUBIC))
                for c in image_CHW.detach().float().cpu()]
    return torch.from_numpy(np.stack(channels)).to(image_CHW.device)


def back_project(sr_CHW: torch.Tensor, lr_CHW: torch.Tensor, scale: int, steps: int) -> torch.Tensor:
    """Iterative back-projection (Irani & Peleg, 1991): ``steps`` times x <- x + up(lr - down(x)), down
    being :func:`bicubic_downscale` (the degradation the recipes train on) and up bicubic upsampling;
    the result's own downscale moves towards the LR image it was made from. Returns (C, H, W) in [-1, 1].
    Only right when ``lr_CHW`` came from a bicubic downscale: on other degradations it re-imposes them."""
    if steps < 0:
        raise ValueError(f"back-projection steps must be >= 0, got {steps}")
    expected = (lr_CHW.shape[-2] * scale, lr_CHW.shape[-1] * scale)
    if tuple(sr_CHW.shape[-2:]) != expected or sr_CHW.shape[0] != lr_CHW.shape[0]:
        raise ValueError(f"back_project: the upscaled image {tuple(sr_CHW.shape)} must be the LR image "
                         f"{tuple(lr_CHW.shape)} times {scale} on each side, with as many channels")
    x, lr = sr_CHW.float(), lr_CHW.float().to(sr_CHW.device)
    for _ in range(steps):
        error = lr - bicubic_downscale(x, scale)
        x = x + F.interpolate(error[None], size=expected, mode="bicubic", align_corners=False)[0]
    return x.clamp(-1, 1)


@dataclasses.dataclass
class SRModel:
    """A loaded VAR-SR pipeline and its patch geometry (from the model directory's config)."""

    pipe: object
    scale: int
    tile: int  # LR patch side the model was trained on
    channels: int

    @classmethod
    def load(cls, model_dir: str, *, weights: str = "ema", device: str = "cpu") -> SRModel:
        from zoo.config import ConfigError
        from zoo.hub.model_dir import load_model_dir, read_model_config

        config = read_model_config(model_dir)
        data = config.get("data", {})
        if "generator" not in config or not hasattr(_builder(config), "finish_images") or "scale" not in data:
            raise ConfigError(f"{model_dir}: not a super-resolution model (its config.json needs a var-sr generator "
                              f"trained on data with a scale, such as 'photos' or 'pairs')")
        pipe = load_model_dir(model_dir, weights=weights, device=device)
        return cls(pipe, int(data["scale"]), int(data["image_size"]) // int(data["scale"]),
                   int(data.get("channels") or 3))

    def upscale_fn(self, *, seed: int = 0, batch_size: int = 16, **sampling) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(tiles: torch.Tensor) -> torch.Tensor:
            return self.pipe.generate({"lr": tiles}, seed=seed, batch_size=batch_size, **sampling)
        return run

    def back_projection_steps(self, back_projection: int | None = None) -> int:
        """``back_projection``, or the recipe's ``sample.back_projection`` when None (0 if it has none)."""
        if back_projection is None:
            back_projection = getattr(self.pipe.sample_config, "back_projection", 0)
        if back_projection < 0:
            raise ValueError(f"back-projection {back_projection}: give a number of steps >= 0 (0 = off)")
        return back_projection

    def upscale(self, lr_CHW: torch.Tensor, *, overlap: int | None = None, ensemble: int | None = None, seed: int = 0,
                batch_size: int = 16, back_projection: int | None = None, **sampling) -> torch.Tensor:
        """(C, h, w) in [-1, 1] -> (C, h·scale, w·scale), tiled with ``overlap`` LR pixels, averaged
        over ``ensemble`` flipped/rotated copies of the image (:func:`dihedral`), then ``back_projection``
        steps of :func:`back_project`; they default to the recipe's ``sample.tile_overlap`` (None: a
        quarter tile), ``sample.self_ensemble`` and ``sample.back_projection``."""
        defaults = self.pipe.sample_config
        steps = self.back_projection_steps(back_projection)
        if overlap is None:
            overlap = getattr(defaults, "tile_overlap", None)
            overlap = self.tile // 4 if overlap is None else overlap
        ensemble = ensemble if ensemble is not None else getattr(defaults, "self_ensemble", 1)
        if ensemble not in ENSEMBLE_SIZES:
            raise ValueError(f"ensemble {ensemble}: choose one of {list(ENSEMBLE_SIZES)} (flips, then rotations)")
        upscale_fn = self.upscale_fn(seed=seed, batch_size=batch_size, **sampling)
        total = None
        h, w = (max(n, self.tile) for n in lr_CHW.shape[-2:])  # a transposed view has as many tiles
        tiles = len(tile_starts(h, self.tile, overlap)) * len(tile_starts(w, self.tile, overlap))
        with progress_bar(total=math.ceil(tiles / batch_size) * ensemble, unit="batch", leave=False,
                          desc=f"upscaling ({tiles} tiles x {ensemble} view(s))") as bar:
            for k in DIHEDRAL_ORDER[:ensemble]:
                sr = upscale_tiled(upscale_fn, dihedral(lr_CHW, k), self.scale, self.tile, overlap, batch_size,
                                   on_batch=bar.update)
                sr = dihedral(sr, k, inverse=True)
                total = sr if total is None else total + sr
        return back_project(total / ensemble, lr_CHW, self.scale, steps) if steps else total / ensemble


ENSEMBLE_SIZES = (1, 2, 4, 8)
DIHEDRAL_ORDER = (0, 4, 2, 6, 1, 5, 3, 7)  # identity, h-flip, 180°, v-flip, then the four transposing ones


def dihedral(image: torch.Tensor, k: int, *, inverse: bool = False) -> torch.Tensor:
    """The k-th of the 8 symmetries of the square on the last two dims: a horizontal flip if k >= 4,
    then k mod 4 quarter turns; ``inverse=True`` undoes it. Self-ensembling averages a model's results
    over these (the test-time augmentation of EDSR's "+" models): the models train on flipped
    patches, and a mean over views is closer to the posterior mean that PSNR rewards."""
    turns = k % 4
    if not inverse:
        image = image.flip(-1) if k >= 4 else image
        return torch.rot90(image, turns, dims=(-2, -1))
    image = torch.rot90(image, -turns, dims=(-2, -1))
    return image.flip(-1) if k >= 4 else image


def _builder(config: dict):
    from zoo.registry import get_entry

    return get_entry("generator", config["generator"]["name"]).builder


def read_image(path: str) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """(RGB uint8 HWC, alpha uint8 HW or None, was_grey) of an image file; ValueError naming it if unreadable."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            image.load()
            grey = image.mode in ("1", "L", "LA", "I", "I;16", "F")
            if image.mode in ("P", "PA"):
                image = image.convert("RGBA")
            alpha = np.asarray(image.getchannel("A")) if "A" in image.getbands() else None
            rgb = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: cannot read image file: {err}") from None
    return rgb, alpha, grey


def upscale_file(model: SRModel, path: str, out: str, *, overlap: int | None = None, ensemble: int | None = None,
                 seed: int = 0, batch_size: int = 16, back_projection: int | None = None,
                 **sampling) -> tuple[int, int]:
    """Upscale the image at ``path`` into ``out`` (PNG; grey stays grey, alpha is kept); returns (width, height)."""
    from zoo.io import atomic_write

    rgb, alpha, grey = read_image(path)
    lr = to_tensor_pm1(rgb)
    if model.channels == 1:
        lr = lr.mean(dim=0, keepdim=True)
    sr = model.upscale(lr, overlap=overlap, ensemble=ensemble, seed=seed, batch_size=batch_size,
                       back_projection=back_projection, **sampling)
    result = Image.fromarray(to_uint8(sr[None])[0].squeeze(-1) if model.channels == 1 else to_uint8(sr[None])[0])
    if grey and model.channels == 3:
        result = result.convert("L")
    if alpha is not None:
        big_alpha = Image.fromarray(alpha).resize(result.size, resample=Image.BICUBIC)
        result = result.convert("LA" if result.mode == "L" else "RGB")
        result.putalpha(big_alpha)
    atomic_write(out, lambda tmp: result.save(tmp, format="PNG"))
    return result.size


def psnr_ssim(prediction: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """PSNR (dB) and SSIM of uint8 HWC images over all channels (no border crop), with the metrics
    every zoo tool uses (:mod:`zoo.eval.metrics`: SSIM with the 11-tap Gaussian window of Wang et al.)."""
    from zoo.eval.metrics import psnr, ssim

    def as_tensor(image: np.ndarray) -> torch.Tensor:  # (1, C, H, W) in [-1, 1]; the PSNR is range-free
        return torch.from_numpy(np.array(image, dtype=np.float64)).permute(2, 0, 1)[None] / 127.5 - 1

    a, b = as_tensor(prediction), as_tensor(truth)
    return float(psnr(a, b)), float(ssim(a, b))


VALIDATION_PHOTOS = "photos"  # --eval photos: the ``photos`` dataset's validation photographs


def evaluate_folder(model: SRModel, hr_dir: str, *, crop: int = 0, overlap: int | None = None,
                    ensemble: int | None = None, seed: int = 0, batch_size: int = 16,
                    back_projection: int | None = None, on_image: Callable[[str, dict], None] | None = None,
                    **sampling) -> list[dict]:
    """For each image of ``hr_dir``: LR by bicubic downscaling (as the ``photos`` data), then PSNR/SSIM
    of the model's and of bicubic upsampling's results against the HR image; when the model's results
    are back-projected (``back_projection`` steps, default the recipe's), also of bicubic upsampling
    back-projected as many steps (``backprojected_psnr``/``_ssim``: what that step alone gives). ``hr_dir`` ``"photos"``
    (when no such folder exists) means the ``photos`` dataset's validation photographs (chelsea and
    clock, from scikit-image). ``crop`` > 0 first centre-crops each HR image to at most crop x crop
    pixels (a faster check on a CPU). ``on_image(name, images)`` receives each image's uint8 HWC
    ``lr``, ``bicubic``, ``model`` and ``hr`` arrays (what :func:`crop_grid` shows)."""
    steps = model.back_projection_steps(back_projection)
    rows = []
    for name, rgb in progress_bar(list(_hr_images(hr_dir)), desc="evaluating", unit="image"):
        if crop:
            top, left = max(0, (rgb.shape[0] - crop) // 2), max(0, (rgb.shape[1] - crop) // 2)
            rgb = rgb[top:top + crop, left:left + crop]
        h, w = rgb.shape[0] // model.scale * model.scale, rgb.shape[1] // model.scale * model.scale
        hr = np.ascontiguousarray(rgb[:h, :w])
        lr_image = np.asarray(degrade(Image.fromarray(hr), model.scale, "bicubic"))
        lr = to_tensor_pm1(lr_image)
        sr = to_uint8(model.upscale(lr, overlap=overlap, ensemble=ensemble, seed=seed, batch_size=batch_size,
                                     back_projection=steps, **sampling)[None])[0]
        bicubic_float = bicubic_upsample(lr[None], (h, w))[0]
        bicubic = to_uint8(bicubic_float[None])[0]
        model_psnr, model_ssim = psnr_ssim(sr, hr)
        base_psnr, base_ssim = psnr_ssim(bicubic, hr)
        if on_image is not None:
            on_image(name, {"lr": lr_image, "bicubic": bicubic, "model": sr, "hr": hr})
        row = {"image": name, "size": [w, h], "psnr": model_psnr, "ssim": model_ssim,
               "bicubic_psnr": base_psnr, "bicubic_ssim": base_ssim}
        if steps:
            projected = to_uint8(back_project(bicubic_float, lr, model.scale, steps)[None])[0]
            row["backprojected_psnr"], row["backprojected_ssim"] = psnr_ssim(projected, hr)
            row["back_projection"] = steps
        rows.append(row)
    return rows


def detail_window(hr: np.ndarray, bicubic: np.ndarray, side: int) -> tuple[int, int]:
    """(top, left) of the side x side window (on a side/4 grid) where bicubic upsampling misses the most
    (the largest sum of |HR − bicubic|): where a super-resolution model has something to show."""
    error = np.abs(hr.astype(np.float64) - bicubic.astype(np.float64)).sum(axis=2)
    h, w = error.shape
    side = min(side, h, w)
    integral = np.pad(error.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    step = max(1, side // 4)
    # Sums of every side x side window from the integral image, on the step grid.
    totals = (integral[side:, side:] - integral[:-side, side:] - integral[side:, :-side]
              + integral[:-side, :-side])[::step, ::step]
    top, left = np.unravel_index(np.argmax(totals), totals.shape)
    return int(top) * step, int(left) * step


def crop_grid(images: list[tuple[str, dict]], path: str, *, scale: int, side: int = 64, zoom: int = 3) -> str:
    """A PNG at ``path`` with one row per image (``evaluate_folder``'s ``on_image`` arrays) and the columns
    LR (enlarged, nearest), bicubic, model and HR, each the same side x side HR crop (:func:`detail_window`)
    enlarged ``zoom`` times so pixels can be seen. Returns the path."""
    from zoo.eval.report import comparison_grid
    from zoo.io import atomic_write

    rows, names = [], []
    for name, arrays in images:
        hr = arrays["hr"]
        crop = min(side, hr.shape[0], hr.shape[1]) // scale * scale
        top, left = (v // scale * scale for v in detail_window(hr, arrays["bicubic"], crop))
        lr = arrays["lr"][top // scale:(top + crop) // scale, left // scale:(left + crop) // scale]
        panels = [to_tensor_pm1(lr)[None]] + [to_tensor_pm1(arrays[key][top:top + crop, left:left + crop])[None]
                                              for key in ("bicubic", "model", "hr")]
        rows.append(torch.cat([torch.nn.functional.interpolate(p, size=(crop * zoom, crop * zoom), mode="nearest")
                               for p in panels]))
        names.append(f"{name} ({left},{top})")
    grid, _ = comparison_grid(rows, names, ["LR", "bicubic", "zoo", "HR"], tile=max(r.shape[-1] for r in rows))
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
    return path


SCORE_KEYS = ("psnr", "ssim", "bicubic_psnr", "bicubic_ssim", "backprojected_psnr", "backprojected_ssim")


def mean_scores(rows: list[dict]) -> dict:
    """The mean of each of :data:`SCORE_KEYS` that every one of :func:`evaluate_folder`'s rows has."""
    return {key: sum(row[key] for row in rows) / len(rows) for key in SCORE_KEYS if all(key in row for row in rows)}


def _hr_images(hr_dir: str):
    """(name, RGB uint8 HWC) of every image in ``hr_dir``, or of the validation photographs."""
    if hr_dir == VALIDATION_PHOTOS and not os.path.exists(hr_dir):
        from zoo.data.photos import VAL_IMAGES, photo

        for name in VAL_IMAGES:
            yield name, photo(name)
        return
    from zoo.data.imagefolder import find_images

    paths, _, _ = find_images(hr_dir)
    for path in paths:
        yield os.path.basename(path), read_image(path)[0]
