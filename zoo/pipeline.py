"""Generator + tokenizer + sampling defaults: labels in, images in [-1, 1] out."""

from __future__ import annotations

import dataclasses
import inspect

import torch
from tqdm.auto import tqdm


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


class Pipeline:
    """What ``zoo-sample`` and the trainer's sample grids use; family-agnostic."""

    def __init__(self, generator, tokenizer, sample_config, *, num_classes: int | None, image_size: int | None):
        self.generator = generator
        self.tokenizer = tokenizer
        self.sample_config = sample_config
        self.num_classes = num_classes
        self.image_size = image_size

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
        """Images (N, C, H, W) in [-1, 1] for ``labels`` (N,), deterministic for a fixed seed and batch size."""
        kwargs = self.sampling_kwargs(**sampling)
        if "tokenizer" in inspect.signature(self.generator.sample).parameters:
            kwargs["tokenizer"] = self.tokenizer  # VAR samples indices through the tokenizer's quantiser
        device = next(self.generator.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        images = []
        batches = range(0, len(labels), batch_size)
        for start in tqdm(batches, desc="sampling", disable=not progress or len(batches) < 2):
            latents = self.generator.sample(labels[start:start + batch_size].to(device), generator=generator,
                                            **kwargs)
            images.append(self.tokenizer.decode(latents).clamp(-1, 1).float().cpu())
        return torch.cat(images)
