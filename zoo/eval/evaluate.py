"""``zoo-eval``'s library side: sample a model directory and score the samples; or score a tokenizer's
reconstructions.

Metrics (``metrics=None`` picks every one that applies to the model and the files given):

| name | what | needs |
| --- | --- | --- |
| ``agreement`` | fraction of samples the digits classifier reads as their label | a digits model |
| ``fd_digits`` | Fréchet distance to the real digits in that classifier's features (+ ``fd_digits_floor``) | digits |
| ``fid`` | FID against ``ref`` (ADM ``mu``/``sigma``, or ``arr_0`` images; default: real digits) | Inception weights |
| ``isc`` | Inception Score (mean, std) | Inception weights |
| ``prc`` | precision / recall (k = 3) against reference images | Inception weights, images |
| ``psnr``, ``ssim`` | reconstruction quality of paired images | a tokenizer directory |

``fd_digits_floor`` is the same distance between two disjoint halves of the real digits: what the
data scores against itself, the floor a generator's ``fd_digits`` is read against.

``psnr``/``ssim`` score a tokenizer directory's reconstructions of ``ref``'s ``arr_0`` images or of
the dataset its config names (digits). For a generator conditioned on images (super-resolution: its
dataset has ``sample_conditions``) they score its upscaled images against high-resolution ones,
beside bicubic upsampling (:func:`evaluate_sr_dir`, what ``zoo-upscale --eval`` prints): the
images of the folder ``ref``, or by default the ``photos`` dataset's validation photographs.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from zoo.eval import inception
from zoo.eval.sampling import load_adm_npz, sample_for_eval, save_adm_npz

__all__ = ["json_ready", "sample_identity", "GENERATOR_METRICS", "TOKENIZER_METRICS", "evaluate_model_dir",
           "evaluate_pipeline", "evaluate_samples", "evaluate_tokenizer_dir", "evaluate_sr_dir", "default_metrics"]

DIGITS_METRICS = ("agreement", "fd_digits")
GENERATOR_METRICS = (*DIGITS_METRICS, *inception.INCEPTION_METRICS)
TOKENIZER_METRICS = ("psnr", "ssim")


def json_ready(value):
    """``value`` with non-finite floats as strings (``"inf"``: PSNR of identical images) and numpy scalars as
    Python numbers, so that it is strict JSON."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def parse_metrics(spec: str | list[str] | None) -> list[str] | None:
    """``"agreement,fid"`` (or a list) -> names, checked; None or ``"auto"`` -> None (choose by model)."""
    if spec is None or spec == "auto":
        return None
    names = [m.strip() for m in (spec.split(",") if isinstance(spec, str) else spec) if m.strip()]
    known = (*GENERATOR_METRICS, *TOKENIZER_METRICS)
    unknown = [m for m in names if m not in known]
    if unknown:
        raise ValueError(f"--metrics: unknown metric {unknown[0]!r}; choose from {', '.join(known)} (or auto)")
    return names


def is_image_conditioned(config: dict) -> bool:
    """Whether a model directory's generator is conditioned on images: its dataset has
    ``sample_conditions``, as the trainer checks (super-resolution)."""
    from zoo.config import ConfigError
    from zoo.registry import get_entry

    name = config.get("data", {}).get("name")
    try:
        return bool(name) and hasattr(get_entry("dataset", name).builder, "sample_conditions")
    except ConfigError:
        return False


def refuse_image_conditioned(config: dict, where: str) -> None:
    """Raise for a generator conditioned on images (super-resolution); comparison by class label does
    not apply to it."""
    name = config.get("data", {}).get("name")
    if is_image_conditioned(config):
        raise ValueError(f"{where}: a model conditioned on images (dataset {name!r}), not on class labels, so it "
                         f"has no place in a grid by label; score it by PSNR/SSIM beside bicubic with zoo-eval "
                         f"{where} [--ref HR_DIR]")


def _is_digits(config: dict) -> bool:
    return config.get("data", {}).get("name") == "digits"


def _ref_kind(ref: str | os.PathLike | None) -> set[str]:
    """Which of ``stats`` (mu/sigma) and ``images`` (arr_0) an ``.npz`` holds."""
    if ref is None:
        return set()
    path = Path(ref)
    if not path.is_file():
        raise FileNotFoundError(f"--ref {path}: no such file")
    with np.load(path) as data:
        kinds = {"stats"} if {"mu", "sigma"} <= set(data.files) else set()
        if "arr_0" in data.files:
            kinds.add("images")
    if not kinds:
        raise ValueError(f"--ref {path}: neither ADM statistics (mu, sigma) nor images (arr_0)")
    return kinds


def default_metrics(config: dict, *, ref=None, inception_weights=None) -> list[str]:
    """The metrics that apply: digits ones for digits models; Inception ones when weights are given."""
    if "generator" not in config:
        return list(TOKENIZER_METRICS)
    metrics = list(DIGITS_METRICS) if _is_digits(config) else []
    if inception_weights:
        kinds = _ref_kind(ref)
        has_images = "images" in kinds or _is_digits(config)
        metrics += [m for m, ok in (("fid", has_images or "stats" in kinds), ("isc", True), ("prc", has_images)) if ok]
    return metrics


def _to_float_images(images_NHWC: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_NHWC).permute(0, 3, 1, 2).float() / 127.5 - 1


def _real_digits_uint8(image_size: int) -> np.ndarray:
    from zoo.data.digits import digits_tensors
    from zoo.data.transforms import to_uint8

    return to_uint8(digits_tensors(image_size, "bilinear", split="all")[0])


def evaluate_samples(images_NHWC: np.ndarray, labels: np.ndarray | None, metrics: list[str], config: dict, *,
                     ref=None, inception_weights=None, device: str = "cpu", where: str = "model") -> dict:
    """Scores of uint8 ``(N, H, W, C)`` samples of a model whose ``config.json`` is ``config``."""
    out: dict = {}
    digits = _is_digits(config)
    for name in metrics:
        if name in DIGITS_METRICS and not digits:
            raise ValueError(f"{name}: {where} is not a digits model (data {config.get('data', {}).get('name')!r}); "
                             f"digits metrics need the digits dataset")
        if name in TOKENIZER_METRICS:
            raise ValueError(f"{name}: scores paired images (a tokenizer's reconstructions, or an SR model's outputs); "
                             f"{where} is a class-conditional generator. Use fid/isc/prc, or the digits metrics")
    if "agreement" in metrics:
        from zoo.eval.digits_classifier import agreement

        if labels is None:
            raise ValueError("agreement needs the labels the samples were drawn for")
        out["agreement"] = agreement(_to_float_images(images_NHWC), torch.from_numpy(np.asarray(labels)))
    if "fd_digits" in metrics:
        from zoo.eval.digits_classifier import frechet_distance_floor, frechet_distance_to_digits

        out["fd_digits"] = frechet_distance_to_digits(_to_float_images(images_NHWC))
        out["fd_digits_floor"] = frechet_distance_floor(images_NHWC.shape[1])  # two halves of the real digits
    wanted = [m for m in metrics if m in inception.INCEPTION_METRICS]
    if wanted:
        inception.require_weights(inception_weights, ", ".join(wanted))
        kinds = _ref_kind(ref)
        reference = None
        if "images" in kinds:
            reference = load_adm_npz(ref)[0]
        elif digits:
            reference = _real_digits_uint8(images_NHWC.shape[1])
        library = [m for m in wanted if not (m == "fid" and "stats" in kinds)]
        if "fid" in wanted and "stats" in kinds:
            out["fid"] = inception.fid_from_reference_stats(images_NHWC, ref, inception_weights, device=device)
            out["fid_reference"] = f"{Path(ref).name} (mu/sigma)"
        if library:
            scores = inception.fidelity_metrics(images_NHWC, reference, library, inception_weights, device=device)
            names = {"frechet_inception_distance": "fid", "inception_score_mean": "isc",
                     "inception_score_std": "isc_std", "precision": "precision", "recall": "recall",
                     "f_score": "f_score"}
            out.update({names.get(k, k): v for k, v in scores.items()})
            if "fid" in library:
                out["fid_reference"] = Path(ref).name if "images" in kinds else "the real digits (all 1,797)"
    return out


def evaluate_pipeline(pipe, config: dict, *, num: int = 500, labels: str = "all", seed: int = 0,
                      batch_size: int | None = None, metrics: list[str] | None = None, ref=None,
                      inception_weights=None, work_dir=None, save_npz=None, progress: bool = True,
                      device: str = "cpu", identity: dict | None = None, where: str = "model", **sampling) -> dict:
    """Sample ``num`` images (resumable in ``work_dir``) and score them; returns the JSON-ready report."""
    from zoo.pipeline import parse_labels

    if num < 2:
        raise ValueError(f"--num must be >= 2 for an evaluation, got {num}")
    metrics = default_metrics(config, ref=ref, inception_weights=inception_weights) if metrics is None else metrics
    batch_size = batch_size or pipe.sample_config.batch_size
    label_tensor = parse_labels(labels, num, pipe.num_classes)
    start = time.perf_counter()
    images = sample_for_eval(pipe, label_tensor, seed=seed, batch_size=batch_size, work_dir=work_dir,
                             progress=progress, identity=identity, **sampling)
    seconds = time.perf_counter() - start
    report = {"num": num, "seed": seed, "batch_size": batch_size, "labels": labels,
              "sampling": pipe.sampling_kwargs(**sampling), "sampling_seconds": seconds}
    if save_npz:
        report["samples"] = str(save_adm_npz(save_npz, images, label_tensor.numpy()))
    report["metrics"] = evaluate_samples(images, label_tensor.numpy(), metrics, config, ref=ref,
                                         inception_weights=inception_weights, device=device, where=where)
    return report


def evaluate_model_dir(model_dir: str | os.PathLike, *, weights: str = "ema", device: str = "cpu",
                       metrics=None, work_dir=None, **options) -> dict:
    """:func:`evaluate_pipeline` on a model or run directory; a tokenizer's directory goes to
    :func:`evaluate_tokenizer_dir`."""
    from zoo.hub.model_dir import load_model_dir, read_model_config

    model_dir = Path(model_dir)
    config = read_model_config(model_dir)
    metrics = parse_metrics(metrics)
    if "generator" not in config:
        return evaluate_tokenizer_dir(model_dir, weights=weights, device=device, metrics=metrics,
                                      num=options.get("num", 500), ref=options.get("ref"),
                                      batch_size=options.get("batch_size"))
    if is_image_conditioned(config):
        return evaluate_sr_dir(model_dir, weights=weights, device=device, metrics=metrics, ref=options.get("ref"),
                               seed=options.get("seed", 0), batch_size=options.get("batch_size"))
    pipe = load_model_dir(model_dir, weights=weights, device=device)
    identity = sample_identity(model_dir, weights)
    report = {"model_dir": str(model_dir), "generator": config["generator"].get("name"), "weights": weights}
    report.update(evaluate_pipeline(pipe, config, metrics=metrics, work_dir=work_dir, device=device,
                                    identity=identity, where=str(model_dir), **options))
    return report


def evaluate_sr_dir(model_dir: str | os.PathLike, *, weights: str = "ema", device: str = "cpu",
                    metrics: list[str] | None = None, ref=None, seed: int = 0, batch_size: int | None = None) -> dict:
    """PSNR/SSIM of a super-resolution model's upscaled images against the HR images of the folder
    ``ref`` (LR made by bicubic downscaling) or, by default, the ``photos`` validation photographs,
    beside bicubic upsampling; sampling as the recipe's ``sample`` section says (what ``zoo-upscale
    --eval`` runs)."""
    from zoo.upscale import VALIDATION_PHOTOS, SRModel, evaluate_folder, mean_scores

    bad = [m for m in (metrics or []) if m not in TOKENIZER_METRICS]
    if bad:
        raise ValueError(f"{bad[0]}: {model_dir} is a super-resolution model; it is scored by "
                         f"{', '.join(TOKENIZER_METRICS)} against high-resolution images (--ref HR_DIR)")
    hr = str(ref) if ref is not None else VALIDATION_PHOTOS
    if ref is not None and not os.path.isdir(hr):
        raise ValueError(f"--ref {hr}: a super-resolution model is scored against a folder of high-resolution "
                         f"images; give one (or leave --ref out for the photos dataset's validation photographs)")
    model = SRModel.load(str(model_dir), weights=weights, device=device)
    rows = evaluate_folder(model, hr, seed=seed, batch_size=batch_size or 64)
    mean = mean_scores(rows)
    return {"model_dir": str(model_dir), "weights": weights, "hr_images": hr, "scale": model.scale,
            **{key: value for key, value in mean.items()
               if key.rsplit("_", 1)[-1] in (metrics or TOKENIZER_METRICS)},
            "images": rows}


def sample_identity(model_dir: str | os.PathLike, weights: str) -> dict:
    """What resumable evaluation samples belong to: the directory, the weights and their file's time (a run
    that trained on since makes earlier samples stale)."""
    from zoo.hub.model_dir import RAW_WEIGHTS_NAME, WEIGHTS_NAME

    model_dir = Path(model_dir)
    path = model_dir / (RAW_WEIGHTS_NAME if weights == "raw" else WEIGHTS_NAME)
    return {"model_dir": str(model_dir.resolve()), "weights": weights,
            "mtime": path.stat().st_mtime if path.is_file() else None}


@torch.no_grad()
def evaluate_tokenizer_dir(model_dir: str | os.PathLike, *, weights: str = "ema", device: str = "cpu",
                           metrics: list[str] | None = None, num: int = 500, ref=None,
                           batch_size: int | None = None) -> dict:
    """PSNR/SSIM of a tokenizer's reconstructions of ``ref``'s ``arr_0`` images, or of its dataset (digits)."""
    from zoo.eval.reconstruction import reconstruction_report
    from zoo.hub.model_dir import load_tokenizer_dir, read_model_config

    model_dir = Path(model_dir)
    config = read_model_config(model_dir)
    metrics = metrics or list(TOKENIZER_METRICS)
    bad = [m for m in metrics if m not in TOKENIZER_METRICS]
    if bad:
        raise ValueError(f"{bad[0]}: {model_dir} holds a tokenizer (no generator); it is scored by "
                         f"{', '.join(TOKENIZER_METRICS)}")
    if ref is not None:
        images = _to_float_images(load_adm_npz(ref)[0][:num])
        source = str(ref)
    elif _is_digits(config):
        from zoo.data.digits import digits_tensors

        images = digits_tensors(config["data"]["image_size"], "bilinear", split="all")[0][:num]
        source = f"the first {len(images)} real digits (training images included)"
    else:
        raise ValueError(f"{model_dir}: its dataset {config.get('data', {}).get('name')!r} cannot be rebuilt from "
                         f"config.json; give --ref IMAGES.npz (arr_0: uint8 N×H×W×C) to reconstruct")
    tokenizer = load_tokenizer_dir(model_dir, weights=weights, device=device)
    report = reconstruction_report(tokenizer, images, batch_size=batch_size or 64)
    report.pop("reconstructions")
    scores = {}
    if "psnr" in metrics:
        scores.update(psnr=report["psnr"], psnr_per_image=report["psnr_per_image"])
    if "ssim" in metrics:
        if "ssim" not in report:
            raise ValueError(f"ssim: images of {images.shape[-1]} px are smaller than its 11-px window")
        scores["ssim"] = report["ssim"]
    extra = {k: v for k, v in report.items() if k.startswith("codebook")}
    return {"model_dir": str(model_dir), "tokenizer": config["tokenizer"].get("name"), "weights": weights,
            "num": len(images), "reference": source, "metrics": {**scores, **extra}}
