"""Image helpers shared by the datasets, the samplers and the evaluation code.

Conventions used throughout zoo:

* a model-side image is a float tensor ``(C, H, W)`` (or a batch ``(N, C, H, W)``) with values in
  ``[-1, 1]``; ``-1`` is black, ``1`` is white;
* a file-side image is ``uint8`` ``HWC`` (``HW`` for grey) as PIL and numpy store it.

``to_tensor_pm1`` goes from the second to the first (``x / 127.5 - 1``, the same numbers as
torchvision's ``ToTensor`` followed by ``Normalize(0.5, 0.5)`` that DiT trains with) and ``to_uint8``
back (DiT's ``sample_ddp.py`` convention: ``clamp(127.5 * x + 128, 0, 255)`` truncated to ``uint8``,
i.e. ``127.5 * (x + 1)`` rounded half up).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

__all__ = ["center_crop_arr", "to_tensor_pm1", "to_uint8", "make_grid_image"]


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop (as in DiT's ``train.py``): a ``uint8`` array ``image_size`` pixels square.

    While the short side is at least ``2 * image_size`` the image is halved with a BOX filter (each
    side ``// 2``); then it is resized with BICUBIC so that the short side is ``image_size`` (the
    long side scaled by the same factor and rounded), and the centre ``image_size`` square is cut
    out (offsets ``(side - image_size) // 2``). Returns ``HWC`` for RGB input, ``HW`` for grey ("L").
    """
    if image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    image = pil_image
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size].copy()  # C-contiguous and writable


def to_tensor_pm1(arr: np.ndarray) -> torch.Tensor:
    """``uint8`` ``HWC`` (or ``HW``) array -> float32 ``CHW`` tensor in ``[-1, 1]`` (``x / 127.5 - 1``)."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise ValueError(f"to_tensor_pm1 expects a uint8 array, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"to_tensor_pm1 expects an HWC or HW array, got shape {tuple(arr.shape)}")
    tensor = torch.from_numpy(np.array(arr.transpose(2, 0, 1), dtype=np.float32))  # a writable copy
    return tensor.div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` float tensor in ``[-1, 1]`` -> ``uint8`` numpy ``(N, H, W, C)``.

    Follows DiT's ``sample_ddp.py``: ``clamp(127.5 * x + 128, 0, 255)`` then a cast to ``uint8``
    (which truncates), so ``-1 -> 0``, ``0 -> 128``, ``1 -> 255``; out-of-range values are clipped.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"to_uint8 expects a tensor of shape (N, C, H, W), got {shape}")
    x = images.detach().to("cpu", torch.float32)
    x = torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def make_grid_image(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0,
                    upscale: int = 1) -> Image.Image:
    """Tile ``(N, C, H, W)`` images in ``[-1, 1]`` into one PIL image, ``nrow`` images per row.

    Each image is first enlarged ``upscale`` times with nearest-neighbour (so 8 or 16 pixel digits
    stay crisp), then tiles are laid out torchvision-style with ``padding`` pixels between them and
    around the border, filled with ``pad_value`` (in the same ``[-1, 1]`` scale; the default ``1.0``
    is white, which separates the black-background digits). With ``cols = min(nrow, N)`` and
    ``rows = ceil(N / cols)`` the result is ``cols * (W * upscale + padding) + padding`` wide and
    ``rows * (H * upscale + padding) + padding`` high. 1-channel images give an "L" image,
    3-channel images an "RGB" one.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"make_grid_image expects a non-empty tensor (N, C, H, W), got {shape}")
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise ValueError(f"make_grid_image expects 1 or 3 channels, got {c} (shape {tuple(images.shape)})")
    if nrow < 1 or padding < 0 or upscale < 1:
        raise ValueError(f"make_grid_image: need nrow >= 1, padding >= 0, upscale >= 1; "
                         f"got nrow={nrow}, padding={padding}, upscale={upscale}")
    tiles = to_uint8(images)  # N, H, W, C
    if upscale > 1:
        tiles = tiles.repeat(upscale, axis=1).repeat(upscale, axis=2)
    th, tw = h * upscale, w * upscale
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    fill = to_uint8(torch.full((1, 1, 1, 1), float(pad_value)))[0, 0, 0, 0]
    grid = np.full((rows * (th + padding) + padding, cols * (tw + padding) + padding, c), fill, np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        y = padding + r * (th + padding)
        x = padding + k * (tw + padding)
        grid[y:y + th, x:x + tw] = tiles[i]
    if c == 1:
        return Image.fromarray(grid[:, :, 0])
    return Image.fromarray(grid)
