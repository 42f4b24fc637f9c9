"""Timestep respacing: run a diffusion trained on T steps with a subset of its timesteps."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from zoo.diffusion.gaussian import GaussianDiffusion

__all__ = ["space_timesteps", "SpacedDiffusion"]


def space_timesteps(num_timesteps: int, section_counts) -> set[int]:
    """The set of original timesteps to keep when respacing a ``num_timesteps``-step process.

    ``section_counts`` is one of:

    - a list of ints, or a comma-separated string (``"10,15,20"``): the process is cut into that
      many equal sections (the first ``num_timesteps % len`` sections one step longer) and each
      section keeps that many evenly spaced steps, rounded to integers and including both ends;
    - ``"N"`` (``"250"``): the one-section case of the above;
    - ``"ddimN"``: the DDIM paper's fixed integer stride ``range(0, T, stride)`` with exactly N steps.

    Raises:
        ValueError: a section has fewer steps than requested, no integer stride gives exactly N
            steps, or the string is not in one of the forms above.
    """
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            try:
                desired = int(text[len("ddim"):])
            except ValueError:
                raise ValueError(f"bad respacing {section_counts!r}: expected 'ddimN' with an integer N") from None
            if desired == num_timesteps:
                return set(range(num_timesteps))
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps out of {num_timesteps} with an integer stride")
        try:
            section_counts = [int(x) for x in text.split(",")]
        except ValueError:
            raise ValueError(f"bad respacing {section_counts!r}: expected 'N', 'N1,N2,...' or 'ddimN'") from None
    section_counts = [int(c) for c in section_counts]
    if not section_counts or any(c < 1 for c in section_counts):
        raise ValueError(f"section counts must be positive integers, got {section_counts}")
    if len(section_counts) > num_timesteps:
        raise ValueError(f"cannot cut {num_timesteps} steps into {len(section_counts)} sections")

    size_per, extra = divmod(num_timesteps, len(section_counts))
    start = 0
    steps: list[int] = []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Accumulating the fractional stride (rather than multiplying) reproduces the reference
        # rounding exactly, which matters for matching published sampling numbers.
        position = 0.0
        for _ in range(count):
            steps.append(start + round(position))
            position += stride
        start += size
    return set(steps)


class SpacedDiffusion(GaussianDiffusion):
    """A :class:`GaussianDiffusion` that keeps only ``use_timesteps`` of a base process.

    The betas are recomputed so that the kept steps have exactly the base ``alphas_cumprod``:
    ``beta'_k = 1 - ab[t_k] / ab[t_{k-1}]``. Indices 0..K-1 of this process map to original
    timesteps through ``timestep_map``; the model is always called with the original timesteps,
    so a network trained on the full process can be sampled with fewer steps.

    Args:
        use_timesteps: original timestep indices to keep (any iterable; order is irrelevant).
        betas, model_mean_type, model_var_type, loss_type: the base process, as for
            :class:`GaussianDiffusion`.

    Attributes:
        timestep_map: sorted list of kept original timesteps.
        original_num_steps: T of the base process.
        original_betas: the base betas (float64), for building other respacings.

    Raises:
        ValueError: ``use_timesteps`` is empty or has indices outside [0, T).
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs):
        self.use_timesteps = {int(t) for t in use_timesteps}
        self.original_betas = np.array(kwargs["betas"], dtype=np.float64)
        self.original_num_steps = len(self.original_betas)
        bad = sorted(t for t in self.use_timesteps if not 0 <= t < self.original_num_steps)
        if not self.use_timesteps or bad:
            raise ValueError(f"use_timesteps must be a non-empty subset of [0, {self.original_num_steps}); "
                             f"bad entries: {bad[:5]}")

        base = GaussianDiffusion(**kwargs)
        self.timestep_map: list[int] = []
        new_betas = []
        last_alpha_cumprod = 1.0
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        super().__init__(**{**kwargs, "betas": np.array(new_betas)})

    # Every entry point that calls the model is wrapped so that it sees original timesteps.
    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self.timestep_map, self.original_num_steps)

    def _scale_timesteps(self, t):
        # The wrapped model does the mapping; kept for ADM API compatibility.
        return t


class _WrappedModel:
    """Calls ``model`` with ``timestep_map[t]`` in place of the respaced index ``t``."""

    def __init__(self, model, timestep_map, original_num_steps):
        self.model = model
        self.timestep_map = timestep_map
        self.original_num_steps = original_num_steps

    def __call__(self, x, ts, **kwargs):
        map_tensor = torch.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
        return self.model(x, map_tensor[ts], **kwargs)
