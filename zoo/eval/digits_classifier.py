"""A small classifier of the real scikit-learn digits, to judge generated digit images.

:class:`DigitsClassifier` is a two-hidden-layer MLP on pixel vectors (``S*S -> 256 -> 128 -> 10``)
trained on the 1,500 "train" digits of :mod:`zoo.data.digits`, resized exactly as that dataset
resizes them, for 30 epochs of AdamW with light augmentation so that slightly imperfect generated
digits are still read correctly: a random affine warp (shift up to 1 pixel at 8 px scale, rotation
up to 10 degrees, scale 0.9-1.1; bilinear, so it also blurs a little) and Gaussian noise of a random
standard deviation up to 0.3. It takes about one to two seconds on two CPU cores and reads 98-99% of
the 297 held-out "val" digits correctly. Training is deterministic for a given ``seed`` and leaves
the global torch RNG untouched.

:meth:`DigitsClassifier.features` returns the 128-dimensional second hidden layer (before its ReLU,
so no dimension is dead and feature covariances are well conditioned) for a Fréchet distance in
the classifier's feature space.

:func:`agreement` (the fraction of generated images classified as the label they were generated
for) uses :func:`get_classifier`, which fits once per process and per ``(image_size, resize, seed)``
and keeps the weights in ``$ZOO_CACHE_DIR`` (default ``~/.cache/zoo``) as
``digits_classifier_v{VERSION}_{size}px_{resize}_seed{seed}.npz`` (written atomically; a missing,
unreadable or stale file is simply refitted). Nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
import threading

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.data.digits import DigitsConfig, digits_tensors

__all__ = ["DigitsClassifier", "get_classifier", "agreement", "frechet_distance_to_digits", "frechet_distance_floor",
           "real_feature_statistics",
           "FEATURE_DIM", "VERSION"]

VERSION = 1  # bump when the architecture or training recipe changes (invalidates disk caches)
FEATURE_DIM = 128
HIDDEN = 256
NUM_CLASSES = 10
EPOCHS = 30
BATCH_SIZE = 128
MAX_LR = 3e-3
WEIGHT_DECAY = 1e-4
LABEL_SMOOTHING = 0.05
_EVAL_BATCH = 4096


class _MLP(nn.Module):
    def __init__(self, image_size: int):
        super().__init__()
        self.fc1 = nn.Linear(image_size * image_size, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.flatten(1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.features(x)))


@functools.lru_cache(maxsize=4)
def _base_grid(size: int) -> torch.Tensor:
    """``(size*size, 3)`` rows ``(x, y, 1)`` of pixel centres in ``[-1, 1]`` (``align_corners=False``)."""
    coords = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1), torch.ones(size * size)], dim=1)


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random small affine warp + Gaussian noise of ``(N, 1, S, S)`` digits in ``[-1, 1]``."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(10)
    scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2.0 / 8)  # +-1 px at 8 px (grid spans 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = (_base_grid(x.shape[-1]) @ theta.transpose(1, 2)).view(n, x.shape[-2], x.shape[-1], 2)
    # Shift to [0, 2] so that grid_sample's zero padding is the -1 background.
    warped = F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
    sigma = torch.rand(n, 1, 1, 1, generator=generator) * 0.3
    return (warped + sigma * torch.randn(warped.shape, generator=generator)).clamp(-1, 1)


class DigitsClassifier:
    """MLP digit classifier for ``(N, 1, S, S)`` images in ``[-1, 1]`` (see the module docstring)."""

    def __init__(self, image_size: int, net: nn.Module | None = None, resize: str = "bilinear", seed: int = 0):
        DigitsConfig(image_size=image_size, resize=resize)  # validates both
        self.image_size = int(image_size)
        self.resize = resize
        self.seed = int(seed)
        self.net = (net if net is not None else _MLP(self.image_size)).eval()
        self.feature_dim = FEATURE_DIM
        self.num_classes = NUM_CLASSES

    # ----------------------------------------------------------------------------------- training
    @classmethod
    def fit(cls, image_size: int = 16, seed: int = 0, resize: str = "bilinear") -> DigitsClassifier:
        """Train on the "train" split of the digits at ``image_size`` (resized with ``resize``)."""
        DigitsConfig(image_size=image_size, resize=resize)
        x, y = digits_tensors(image_size, resize, split="train")
        generator = torch.Generator().manual_seed(int(seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            net = _MLP(int(image_size))
        optimizer = torch.optim.AdamW(net.parameters(), lr=MAX_LR, weight_decay=WEIGHT_DECAY, foreach=True)
        steps_per_epoch = math.ceil(len(x) / BATCH_SIZE)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, MAX_LR, total_steps=EPOCHS * steps_per_epoch)
        net.train()
        for _ in range(EPOCHS):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), BATCH_SIZE):
                idx = order[start:start + BATCH_SIZE]
                loss = F.cross_entropy(net(_augment(x[idx], generator)), y[idx], label_smoothing=LABEL_SMOOTHING)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        return cls(image_size, net, resize=resize, seed=seed)

    # ---------------------------------------------------------------------------------- inference
    def _check(self, images) -> torch.Tensor:
        expected = f"(N, 1, {self.image_size}, {self.image_size})"
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"expected a tensor of shape {expected} in [-1, 1], got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 1 or images.shape[2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected images of shape {expected} (1 channel, values in [-1, 1]) for this "
                             f"{self.image_size}px digits classifier, got {tuple(images.shape)}")
        images = images.detach().to("cpu")
        if images.dtype == torch.uint8:
            return images.to(torch.float32) / 127.5 - 1.0
        return images.to(torch.float32).clamp(-1.0, 1.0)

    @torch.no_grad()
    def _batched(self, images, fn) -> torch.Tensor:
        x = self._check(images)
        if len(x) == 0:
            return fn(x)
        return torch.cat([fn(x[i:i + _EVAL_BATCH]) for i in range(0, len(x), _EVAL_BATCH)])

    def logits(self, images) -> torch.Tensor:
        """``(N, 10)`` float logits."""
        return self._batched(images, self.net)

    def predict_proba(self, images) -> torch.Tensor:
        """``(N, 10)`` class probabilities."""
        return self.logits(images).softmax(dim=1)

    def predict(self, images) -> torch.Tensor:
        """``(N,)`` int64 predicted digits."""
        return self.logits(images).argmax(dim=1)

    def features(self, images) -> torch.Tensor:
        """``(N, 128)`` penultimate-layer features (second hidden layer, pre-ReLU)."""
        return self._batched(images, self.net.features)

    def accuracy(self, images, labels) -> float:
        """Fraction of ``images`` predicted as ``labels``."""
        predicted = self.predict(images)
        labels = _as_labels(labels, len(predicted))
        return float((predicted == labels).float().mean()) if len(labels) else float("nan")

    # -------------------------------------------------------------------------------- persistence
    def state_arrays(self) -> dict[str, np.ndarray]:
        arrays = {k: v.detach().cpu().numpy() for k, v in self.net.state_dict().items()}
        arrays["_meta"] = np.array([VERSION, self.image_size, self.seed], dtype=np.int64)
        arrays["_resize"] = np.array(self.resize)
        return arrays

    def save(self, path: str) -> None:
        """Write the weights to ``path`` (``.npz``) atomically."""
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".digits_classifier_", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **self.state_arrays())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str) -> DigitsClassifier:
        """Read weights written by :meth:`save`; ValueError if they are from another VERSION."""
        with np.load(path, allow_pickle=False) as data:
            version, image_size, seed = (int(v) for v in data["_meta"])
            if version != VERSION:
                raise ValueError(f"{path}: digits classifier version {version}, this code is version {VERSION}")
            resize = str(data["_resize"])
            net = _MLP(image_size)
            net.load_state_dict({k: torch.from_numpy(data[k].copy()) for k in net.state_dict()})
        return cls(image_size, net, resize=resize, seed=seed)

    def __repr__(self) -> str:
        return f"DigitsClassifier(image_size={self.image_size}, resize={self.resize!r}, seed={self.seed})"


def _as_labels(labels, n: int) -> torch.Tensor:
    labels = torch.as_tensor(labels).detach().to("cpu").reshape(-1)
    if labels.numel() != n:
        raise ValueError(f"expected {n} labels (one per image), got {labels.numel()}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers 0..9, got dtype {labels.dtype}")
    return labels.to(torch.int64)


_CACHE: dict[tuple, DigitsClassifier] = {}
_LOCK = threading.Lock()


def _cache_dir() -> str:
    return os.environ.get("ZOO_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "zoo")


def get_classifier(image_size: int, seed: int = 0, resize: str = "bilinear", disk_cache: bool = True
                   ) -> DigitsClassifier:
    """The classifier for ``image_size``: fitted once per process, kept on disk when ``disk_cache``."""
    DigitsConfig(image_size=image_size, resize=resize)
    key = (int(image_size), resize, int(seed))
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        path = os.path.join(_cache_dir(), f"digits_classifier_v{VERSION}_{image_size}px_{resize}_seed{seed}.npz")
        classifier = None
        if disk_cache and os.path.exists(path):
            try:
                classifier = DigitsClassifier.load(path)
            except Exception:  # stale or damaged cache file: refit and overwrite it
                classifier = None
        if classifier is None:
            classifier = DigitsClassifier.fit(image_size, seed=seed, resize=resize)
            if disk_cache:
                try:
                    classifier.save(path)
                except OSError:
                    pass  # a read-only home is no reason to fail an evaluation
        _CACHE[key] = classifier
        return classifier


def agreement(images, labels, image_size: int | None = None, seed: int = 0, resize: str = "bilinear") -> float:
    """Fraction of ``images`` ``(N, 1, S, S)`` in ``[-1, 1]`` that the digits classifier reads as ``labels``.

    ``image_size`` defaults to the images' size; ``labels`` are the digits the images were generated
    for (a tensor, array or list of ``N`` integers 0..9).
    """
    if not hasattr(images, "shape") or len(images.shape) != 4:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"expected images of shape (N, 1, S, S) with S in (8, 16, 32), got {shape}")
    size = int(images.shape[-1]) if image_size is None else int(image_size)
    if size not in DigitsConfig.CHOICES["image_size"]:
        raise ValueError(f"expected images of shape (N, 1, S, S) with S in (8, 16, 32), got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("agreement needs at least one image")
    return get_classifier(size, seed=seed, resize=resize).accuracy(images, labels)


_REAL_STATS: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def real_feature_statistics(image_size: int, seed: int = 0, resize: str = "bilinear", split: str = "all"
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(128,)`` and covariance ``(128, 128)`` of the classifier's features of the real digits of ``split``
    (all 1,797 by default), computed once per process."""
    from zoo.eval.metrics import feature_statistics

    key = (int(image_size), int(seed), resize, split)
    if key not in _REAL_STATS:
        images, _ = digits_tensors(image_size, resize, split=split)
        _REAL_STATS[key] = feature_statistics(get_classifier(image_size, seed=seed, resize=resize).features(images))
    return _REAL_STATS[key]


def frechet_distance_to_digits(images, image_size: int | None = None, seed: int = 0, resize: str = "bilinear",
                               split: str = "all") -> float:
    """Fréchet distance between ``images`` ``(N, 1, S, S)`` (in ``[-1, 1]``, or uint8) and the real digits of
    ``split``, in the classifier's 128-d feature space. Like FID it is biased by the sample count:
    compare models at equal N (it needs N >= 2; a few hundred give stable values)."""
    from zoo.eval.metrics import feature_statistics, frechet_distance

    size = int(images.shape[-1]) if image_size is None else int(image_size)
    if len(images) < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 images, got {len(images)}")
    features = get_classifier(size, seed=seed, resize=resize).features(images)
    return frechet_distance(*feature_statistics(features), *real_feature_statistics(size, seed, resize, split))


_FLOORS: dict[tuple, float] = {}


def frechet_distance_floor(image_size: int = 16, seed: int = 0, resize: str = "bilinear") -> float:
    """The Fréchet distance between two disjoint random halves of the real digits (898 and 899
    images), in the same feature space: what a perfect generator would score against the data at
    about this sample size. :func:`frechet_distance_to_digits` of 500 samples is comparable to it
    (their finite-sample biases, ~1/N1 + 1/N2, are within 15 %)."""
    from zoo.eval.metrics import feature_statistics, frechet_distance

    key = (int(image_size), int(seed), resize)
    if key not in _FLOORS:
        images, _ = digits_tensors(image_size, resize, split="all")
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        features = get_classifier(image_size, seed=seed, resize=resize).features(images[order])
        half = len(images) // 2
        _FLOORS[key] = float(frechet_distance(*feature_statistics(features[:half]),
                                              *feature_statistics(features[half:])))
    return _FLOORS[key]
