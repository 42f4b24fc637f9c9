"""FID, Inception Score and precision/recall through torch-fidelity, with Inception weights from a local file.

Nothing here downloads: torch-fidelity would fetch its Inception weights from the internet when
given no path, so every entry point takes ``weights`` (a path) and :func:`require_weights` refuses
a missing one with a message naming the option and the file to get. The file is torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` (the TensorFlow FID Inception, converted; 91 MB),
published on torch-fidelity's GitHub releases page (v0.2.0). Its 2048-d pool features are the ones
ADM's reference statistics (``VIRTUAL_imagenet256_labeled.npz``: ``mu``, ``sigma``) were computed
with, so :func:`fid_from_reference_stats` is comparable to papers up to that port's small numeric
differences.

Images are ``uint8`` ``(N, H, W, C)`` arrays (the ADM ``.npz`` layout); grey images are repeated to
three channels, and torch-fidelity resizes everything to 299×299 itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from zoo.eval.metrics import feature_statistics, frechet_distance
from zoo.progress import progress_bar

__all__ = ["WEIGHTS_FILE", "WEIGHTS_OPTION", "require_weights", "inception_features", "fidelity_metrics",
           "read_reference_stats", "fid_from_reference_stats"]

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
WEIGHTS_OPTION = "--inception-weights"
FEATURE_EXTRACTOR = "inception-v3-compat"
INCEPTION_METRICS = ("fid", "isc", "prc")
INCEPTION_FEATURES = ("64", "192", "768", "2048")


def require_weights(weights: str | os.PathLike | None, metric: str) -> str:
    """The path of the Inception weights, or an error that says which option to give and where to get the file."""
    if not weights:
        raise FileNotFoundError(
            f"{metric} needs Inception weights, and zoo never downloads them: pass {WEIGHTS_OPTION} PATH to "
            f"torch-fidelity's {WEIGHTS_FILE} (download it once from {WEIGHTS_URL}), or leave {metric} out of "
            f"--metrics")
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"{WEIGHTS_OPTION} {path}: no such file (expected torch-fidelity's {WEIGHTS_FILE})")
    return str(path)


class _Uint8Images(torch.utils.data.Dataset):
    """``(N, H, W, C)`` uint8 -> items ``(3, H, W)`` uint8, as torch-fidelity's extractors take them."""

    def __init__(self, images: np.ndarray, where: str):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"{where}: expected uint8 images (N, H, W, 1 or 3), got {images.dtype} {images.shape}")
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


def _extractor(weights: str, features: list[str], device: str):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    # torch-fidelity unpickles the file with weights_only=False; read it the safe way first, so a file
    # that holds anything but tensors is refused before any of its code could run.
    try:
        torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure means: not a plain state dict
        raise ValueError(f"{WEIGHTS_OPTION} {weights}: not a plain state dict of tensors such as torch-fidelity's "
                         f"{WEIGHTS_FILE} ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    try:
        net = FeatureExtractorInceptionV3(FEATURE_EXTRACTOR, features, feature_extractor_weights_path=weights)
    except (RuntimeError, KeyError, OSError, EOFError) as err:
        raise ValueError(f"{WEIGHTS_OPTION} {weights}: not torch-fidelity's {WEIGHTS_FILE} "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    return net.to(device)


@torch.no_grad()
def inception_features(images: np.ndarray, weights: str, *, device: str = "cpu", batch_size: int = 64,
                       feature: str = "2048") -> np.ndarray:
    """``(N, 2048)`` float64 Inception pool features of uint8 NHWC images (``feature``: one of torch-fidelity's
    ``64``, ``192``, ``768``, ``2048``, ``logits_unbiased``)."""
    weights = require_weights(weights, "Inception features")
    net = _extractor(weights, [feature], device)
    data = _Uint8Images(images, "inception_features")
    out = []
    for start in progress_bar(range(0, len(data), batch_size), desc="Inception features", unit="batch", leave=False):
        batch = torch.stack([data[i] for i in range(start, min(start + batch_size, len(data)))]).to(device)
        out.append(net(batch)[0].double().cpu())
    return torch.cat(out).numpy()


def fidelity_metrics(samples: np.ndarray, reference: np.ndarray | None, metrics, weights: str, *,
                     device: str = "cpu", batch_size: int = 64) -> dict[str, float]:
    """torch-fidelity's ``calculate_metrics`` on uint8 NHWC arrays: ``fid`` (against ``reference``),
    ``isc`` (Inception Score, mean and std over min(10, N) splits), ``prc`` (precision, recall and
    F-score of Kynkäänniemi et al., k = 3, against ``reference``).

    Returns torch-fidelity's keys (``frechet_inception_distance``, ``inception_score_mean``,
    ``inception_score_std``, ``precision``, ``recall``, ``f_score``).
    """
    import torch_fidelity

    metrics = set(metrics)
    unknown = metrics - set(INCEPTION_METRICS)
    if unknown:
        raise ValueError(f"unknown Inception metric(s) {sorted(unknown)}; choose from {list(INCEPTION_METRICS)}")
    weights = require_weights(weights, "/".join(sorted(metrics)) or "Inception metrics")
    binary = metrics & {"fid", "prc"}
    if binary and reference is None:
        raise ValueError(f"{', '.join(sorted(binary))} compare samples with real images: give --ref (an .npz with "
                         f"arr_0 images) or evaluate a model whose dataset is known (digits)")
    inputs = {"input1": _Uint8Images(samples, "samples")}
    if binary:
        inputs["input2"] = _Uint8Images(reference, "reference images")
    result = torch_fidelity.calculate_metrics(
        **inputs, cuda=str(device).startswith("cuda"), batch_size=batch_size, isc="isc" in metrics,
        fid="fid" in metrics, prc="prc" in metrics, feature_extractor=FEATURE_EXTRACTOR,
        feature_extractor_weights_path=weights, isc_splits=max(1, min(10, len(samples))), cache=False,
        verbose=False, samples_shuffle=False, save_cpu_ram=True)  # save_cpu_ram: no loader worker processes
    return {k: float(v) for k, v in result.items()}


def read_reference_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``mu`` ``(2048,)`` and ``sigma`` ``(2048, 2048)`` from an ADM reference batch ``.npz``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--ref {path}: no such file")
    with np.load(path) as data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise ValueError(f"--ref {path}: no {' or '.join(missing)} array (it has {', '.join(data.files)}); "
                             f"FID against reference statistics needs ADM's mu/sigma")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"--ref {path}: mu {mu.shape} and sigma {sigma.shape} are not a (D,) mean and a (D, D) "
                         f"covariance")
    return mu, sigma


def fid_from_reference_stats(samples: np.ndarray, ref_path: str | os.PathLike, weights: str, *,
                             device: str = "cpu", batch_size: int = 64) -> float:
    """FID of uint8 NHWC samples against precomputed ``mu``/``sigma`` (ADM's: 2048-d pool features; statistics
    of 64, 192 or 768 dimensions use Inception's earlier feature blocks, as pytorch-fid's ``--dims``)."""
    mu_ref, sigma_ref = read_reference_stats(ref_path)
    if str(mu_ref.size) not in INCEPTION_FEATURES:
        raise ValueError(f"--ref {ref_path}: statistics of dimension {mu_ref.size}; Inception features have "
                         f"{', '.join(INCEPTION_FEATURES)} dimensions")
    weights = require_weights(weights, "fid against --ref statistics")
    features = inception_features(samples, weights, device=device, batch_size=batch_size, feature=str(mu_ref.size))
    return frechet_distance(*feature_statistics(features), mu_ref, sigma_ref)
