"""Generator + tokenizer + sampling defaults: labels in, images in [-1, 1] out."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import torch

from zoo.progress import progress_bar


def parse_labels(spec: str, num: int, num_classes: int | None) -> torch.Tensor:
    """``"all"`` cycles 0, 1, …, num_classes−1 over ``num`` images; ``"0,3,7"`` cycles those labels."""
    if spec == "all":
        if not num_classes:
            raise ValueError("--labels all needs a class-conditional model with a known number of classes")
        values = list(range(num_classes))
    else:
        try:
            values = [int(v) for v in str(spec).split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"labels {spec!r}: expected 'all' or comma-separated integers like 0,3,7") from None
        if not values:
            raise ValueError(f"labels {spec!r}: no label given")
        bad = [v for v in values if v < 0 or (num_classes is not None and v >= num_classes)]
        if bad:
            raise ValueError(f"label {bad[0]} is outside 0..{(num_classes or 1) - 1}")
    return torch.tensor([values[i % len(values)] for i in range(num)], dtype=torch.long)


def take(cond, start: int, end: int, device):
    """Rows [start, end) of labels, or of every tensor of a condition dict, on ``device``."""
    if isinstance(cond, dict):
        return {key: value[start:end].to(device) for key, value in cond.items()}
    return cond[start:end].to(device)


class Pipeline:
    """What ``zoo-sample`` and the trainer's sample grids use; family-agnostic.

    ``config`` is the ``config.json`` content it was loaded from (None for one built in code; then
    :meth:`save_pretrained` describes it from the registry).
    """

    def __init__(self, generator, tokenizer, sample_config, *, num_classes: int | None, image_size: int | None,
                 config: dict | None = None):
        self.generator = generator
        self.tokenizer = tokenizer
        self.sample_config = sample_config
        self.num_classes = num_classes
        self.image_size = image_size
        self.config = config

    @classmethod
    def from_pretrained(cls, path_or_repo_id, *, revision: str | None = None, weights: str = "ema",
                        device="cpu") -> Pipeline:
        """A model directory, run directory or Hub repo id (``org/name``) as a ready pipeline; see
        :func:`zoo.hub.from_pretrained`."""
        from zoo.hub.api import from_pretrained

        pipe = from_pretrained(path_or_repo_id, revision=revision, weights=weights, device=device)
        if not isinstance(pipe, cls):
            raise ValueError(f"{path_or_repo_id}: holds a tokenizer, not a generator; use zoo.from_pretrained")
        return pipe

    def save_pretrained(self, path, *, max_shard_size: int | str = "5GB", **card) -> Path:
        """Write a model directory (config.json, model.safetensors, tokenizer.safetensors, README.md);
        ``card`` keywords go to :func:`zoo.hub.card.model_card` (license, tags, metrics, ...).
        Returns the directory."""
        from zoo.hub.api import save_pretrained

        return save_pretrained(self, path, max_shard_size=max_shard_size, **card)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, revision: str | None = None,
                    commit_message: str | None = None, token: str | None = None, **card) -> str:
        """Upload as a model directory to the Hub repo ``repo_id`` (created if needed); returns the
        commit URL. See :func:`zoo.hub.push_to_hub`."""
        from zoo.hub.api import push_to_hub

        return push_to_hub(self, repo_id, private=private, revision=revision, commit_message=commit_message,
                           token=token, **card)

    def sampling_options(self) -> set[str]:
        """Keyword options the generator's ``sample`` accepts."""
        params = inspect.signature(self.generator.sample).parameters
        return {n for n, p in params.items() if p.kind == inspect.Parameter.KEYWORD_ONLY} - {"tokenizer"}

    def sampling_kwargs(self, **overrides) -> dict:
        """Recipe sampling defaults the generator understands, with ``overrides`` (None = keep default).

        Raises ValueError for an override the generator does not take.
        """
        accepted = self.sampling_options()
        kwargs = {k: v for k, v in dataclasses.asdict(self.sample_config).items() if k in accepted}
        for key, value in overrides.items():
            if value is None:
                continue
            if key not in accepted:
                raise ValueError(f"{type(self.generator).__name__} sampling takes no {key!r}; "
                                 f"it takes {', '.join(sorted(accepted - {'generator', 'noise', 'progress'}))}")
            kwargs[key] = value
        return kwargs

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, *, seed: int = 0, batch_size: int = 64, progress: bool = False,
                 **sampling) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] for ``labels`` (N,) -- or a dict of per-row condition tensors
        (VAR-SR's ``{"lr", "label"}``) -- deterministic for a fixed seed and batch size."""
        kwargs = self.sampling_kwargs(**sampling)
        if "tokenizer" in inspect.signature(self.generator.sample).parameters:
            kwargs["tokenizer"] = self.tokenizer  # VAR samples indices through the tokenizer's quantiser
        device = next(self.generator.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        images = []
        rows = len(next(iter(labels.values()))) if isinstance(labels, dict) else len(labels)
        batches = range(0, rows, batch_size)
        finish = getattr(self.generator, "finish_images", None)  # e.g. VAR-SR adds the bicubic base back
        # Several batches: a bar over them; one batch: the generator's own bar over its steps, if it has one.
        inner = progress and len(batches) < 2 and "progress" in self.sampling_options()
        if inner:
            kwargs["progress"] = True
        for start in progress_bar(batches, desc="sampling", unit="batch", enabled=progress and not inner
                                  and len(batches) > 1):
            cond = take(labels, start, start + batch_size, device)
            latents = self.generator.sample(cond, generator=generator, **kwargs)
            decoded = self.tokenizer.decode(latents)
            if finish is not None:
                decoded = finish(decoded, cond)
            images.append(decoded.clamp(-1, 1).float().cpu())
        return torch.cat(images)
