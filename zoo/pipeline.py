"""Generator + tokenizer + sampling defaults: labels in, images in [-1, 1] out."""

from __future__ import annotations

import dataclasses
import inspect

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
    ``zoo.save_pretrained`` describes it from the registry). A pipeline knows nothing of files or the
    Hub: ``zoo.from_pretrained``, ``zoo.save_pretrained`` and ``zoo.push_to_hub`` (:mod:`zoo.hub`) move it.
    """

    def __init__(self, generator, tokenizer, sample_config, *, num_classes: int | None, image_size: int | None,
                 config: dict | None = None):
        self.generator = generator
        self.tokenizer = tokenizer
        self.sample_config = sample_config
        self.num_classes = num_classes
        self.image_size = image_size
        self.config = config

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
