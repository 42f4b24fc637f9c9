"""How well a tokenizer reconstructs images: PSNR, and codebook usage for discrete tokenizers."""

from __future__ import annotations

from pathlib import Path

import torch

from zoo.data.transforms import make_grid_image
from zoo.eval.metrics import psnr, ssim
from zoo.io import atomic_write
from zoo.progress import progress_bar


@torch.no_grad()
def reconstruction_report(tokenizer, images: torch.Tensor, *, batch_size: int = 64) -> dict:
    """Reconstruct ``images`` (N, C, H, W) in [-1, 1] through ``tokenizer`` (encode → decode).

    Returns ``psnr`` (dB over the whole set, on outputs clamped to [-1, 1]), ``psnr_per_image`` (the
    mean of per-image PSNRs), ``ssim`` (where the images are at least 11 px), ``mse``, ``num_images``, the
    ``reconstructions`` tensor and, for a tokenizer with index pyramids (``img_to_idxBl``), the
    fraction of the codebook used over all scales (``codebook_usage``) and per scale
    (``codebook_usage_per_scale``).
    """
    device = next(iter(tokenizer.parameters()), torch.empty(0)).device
    recons, hits = [], None
    vocab = getattr(tokenizer, "vocab_size", None)
    for start in progress_bar(range(0, len(images), batch_size), desc="reconstructing", unit="batch"):
        batch = images[start:start + batch_size].to(device)
        recons.append(tokenizer.decode(tokenizer.encode(batch)).clamp(-1, 1).float().cpu())
        if hasattr(tokenizer, "img_to_idxBl") and vocab:
            idx_Bl = tokenizer.img_to_idxBl(batch)
            if hits is None:
                hits = torch.zeros(len(idx_Bl), vocab, dtype=torch.bool)
            for si, idx in enumerate(idx_Bl):
                hits[si, idx.reshape(-1).cpu()] = True
    recon = torch.cat(recons)
    originals = images.float().cpu()
    report = {"num_images": len(images), "psnr": psnr(recon, originals),
              "psnr_per_image": psnr(recon, originals, per_image=True),
              "mse": (recon.double() - images.double().cpu()).square().mean().item()}
    if min(images.shape[-2:]) >= 11:
        report["ssim"] = ssim(recon, originals)
    if hits is not None:
        report["codebook_usage"] = hits.any(0).float().mean().item()
        report["codebook_usage_per_scale"] = hits.float().mean(1).tolist()
    report["reconstructions"] = recon
    return report


def write_pairs_grid(path: str | Path, originals: torch.Tensor, reconstructions: torch.Tensor,
                     per_row: int = 10) -> Path:
    """A PNG whose rows alternate: ``per_row`` originals, then their reconstructions below them."""
    rows = []
    for start in range(0, len(originals), per_row):
        rows += [originals[start:start + per_row], reconstructions[start:start + per_row]]
        short = per_row - len(rows[-1])
        if short > 0 and start > 0:  # pad the last pair of rows so columns stay aligned
            fill = torch.ones(short, *originals.shape[1:])
            rows[-2], rows[-1] = torch.cat([rows[-2], fill]), torch.cat([rows[-1], fill])
    tiles = torch.cat(rows)
    cols = min(per_row, len(originals))
    grid = make_grid_image(tiles.clamp(-1, 1), nrow=cols, upscale=max(1, 64 // tiles.shape[-1]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
    return path
