"""Rectified flow (flow matching on straight paths): the registered ``"flow"`` objective.

Data and noise are joined by the linear interpolant ``x_t = (1 - t) x_0 + t eps`` (t = 0 data,
t = 1 noise), whose velocity ``dx_t/dt = eps - x_0`` is the regression target.  Sampling integrates
``dx/dt = v(x, t)`` from t = 1 to t = 0 with Euler or Heun steps; no noise is added on the way.

The network is called as ``model(x_t, t * time_scale, **model_kwargs)``: DiT's sinusoidal timestep
embedder was designed for integer steps 0..1000, so continuous times are stretched to that range.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import ClassVar

import torch

from zoo.config import ConfigError
from zoo.diffusion.gaussian import mean_flat, randn
from zoo.registry import register_objective

__all__ = ["FlowConfig", "FlowObjective", "TIME_SAMPLINGS", "FLOW_SAMPLERS", "sample_time"]

TIME_SAMPLINGS = ("uniform", "logit_normal")
FLOW_SAMPLERS = ("euler", "heun")


def sample_time(shape, *, time_sampling: str, logit_mean: float = 0.0, logit_std: float = 1.0,
                generator: torch.Generator | None = None, device=None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Times of ``shape`` drawn from ``"uniform"`` on [0, 1) or ``"logit_normal"`` on (0, 1).

    Logit-normal is ``sigmoid(logit_mean + logit_std * n)`` with ``n ~ N(0, 1)`` (Esser et al. 2024);
    it puts more training effort at intermediate times.  With a generator the draw happens on the
    generator's device, so a seed gives the same times wherever the data lives.

    Raises:
        ValueError: an unknown ``time_sampling``.
    """
    if time_sampling not in TIME_SAMPLINGS:
        raise ValueError(f"unknown time_sampling {time_sampling!r}; choose one of {list(TIME_SAMPLINGS)}")
    device = torch.device("cpu") if device is None else torch.device(device)
    if time_sampling == "uniform":
        if generator is None:
            return torch.rand(tuple(shape), device=device, dtype=dtype)
        return torch.rand(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)
    normal = randn(shape, device=device, dtype=dtype, generator=generator)
    return torch.sigmoid(logit_mean + logit_std * normal)


def check_prediction(output, x: torch.Tensor, objective: str) -> torch.Tensor:
    """Return ``output`` if it is a tensor shaped like ``x``; a ValueError a person can act on otherwise."""
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"the {objective} objective needs the network to return one tensor, "
                         f"got {type(output).__name__}")
    if output.shape != x.shape:
        hint = " (a network with learn_sigma=True outputs 2C channels; set learn_sigma=False)" \
            if output.ndim == x.ndim and output.shape[1] == 2 * x.shape[1] else ""
        raise ValueError(f"the {objective} objective needs a network output shaped like its input "
                         f"{tuple(x.shape)}, got {tuple(output.shape)}{hint}")
    return output


def _per_example(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """``[N]`` -> ``[N, 1, ...]`` with ``ndim`` dimensions, to broadcast one value per example."""
    return values.view(-1, *([1] * (ndim - 1)))


def _steps_bar(steps: int, progress: bool):
    from zoo.progress import progress_bar

    return progress_bar(range(steps), desc="steps", unit="step", leave=False) if progress else range(steps)


@dataclasses.dataclass
class FlowConfig:
    """Settings of the ``"flow"`` objective (rectified flow / flow matching)."""

    time_sampling: str = "uniform"
    logit_mean: float = 0.0  # location of the logit-normal time density
    logit_std: float = 1.0  # scale of the logit-normal time density
    time_scale: float = 1000.0  # the network sees t * time_scale as its timestep
    sampler: str = "euler"  # used when sample() gets sampler=None
    steps: int = 50  # used when sample() gets steps=None

    CHOICES: ClassVar[dict[str, tuple]] = {"time_sampling": TIME_SAMPLINGS, "sampler": FLOW_SAMPLERS}

    def __post_init__(self):
        for key, allowed in self.CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}: {getattr(self, key)!r} is not allowed; choose one of {list(allowed)}")
        if not (math.isfinite(self.logit_std) and self.logit_std > 0):
            raise ConfigError(f"logit_std: must be a positive number, got {self.logit_std}")
        if not math.isfinite(self.logit_mean):
            raise ConfigError(f"logit_mean: must be a finite number, got {self.logit_mean}")
        if not (math.isfinite(self.time_scale) and self.time_scale > 0):
            raise ConfigError(f"time_scale: must be a positive number, got {self.time_scale}")
        if self.steps < 1:
            raise ConfigError(f"steps: must be at least 1, got {self.steps}")


@register_objective("flow", config=FlowConfig,
                    description="rectified flow: linear interpolant, velocity target, Euler/Heun ODE sampling")
class FlowObjective:
    """Flow-matching loss and ODE sampler of a :class:`FlowConfig`.

    Attributes:
        config: the :class:`FlowConfig`.
        predicts_variance: always False; the network outputs a velocity of the input's shape.
        SAMPLERS: the sampler names :meth:`sample` accepts.
    """

    predicts_variance = False
    SAMPLERS: ClassVar[tuple[str, ...]] = FLOW_SAMPLERS

    def __init__(self, config: FlowConfig | None = None):
        self.config = config if config is not None else FlowConfig()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    def sample_t(self, n: int, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """``n`` training times from the configured density: ``[n]`` float32 in [0, 1)."""
        cfg = self.config
        return sample_time((n,), time_sampling=cfg.time_sampling, logit_mean=cfg.logit_mean,
                           logit_std=cfg.logit_std, generator=generator, device=device)

    def loss(self, model: Callable, x_start: torch.Tensor, model_kwargs: dict | None = None, *,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Batch-mean velocity regression loss.

        Draws ``t`` (``[N]``) and then ``eps`` (shape of ``x_start``), both from ``generator`` when
        given, in that order, and regresses ``model(x_t, t * time_scale, **model_kwargs)`` on
        ``eps - x_start``: squared error averaged over the non-batch dimensions, then over the batch.

        Returns:
            dict of 0-dim tensors ``loss`` and ``mse`` (the same value).

        Raises:
            ValueError: the network output is not shaped like ``x_start``.
        """
        t = self.sample_t(x_start.shape[0], generator=generator, device=x_start.device).to(x_start.dtype)
        eps = randn(x_start.shape, like=x_start, generator=generator)
        t_N1 = _per_example(t, x_start.ndim)
        x_t = (1 - t_N1) * x_start + t_N1 * eps
        velocity = check_prediction(model(x_t, t * self.config.time_scale, **(model_kwargs or {})), x_start, "flow")
        mse = mean_flat((velocity - (eps - x_start)) ** 2).mean()
        return {"loss": mse, "mse": mse}

    def num_function_evals(self, sampler: str | None = None, steps: int | None = None) -> int:
        """Network calls that :meth:`sample` makes: ``steps`` for Euler, ``2 * steps - 1`` for Heun."""
        sampler, steps = self._resolve(sampler, steps)
        return steps if sampler == "euler" else 2 * steps - 1

    def _resolve(self, sampler: str | None, steps: int | None) -> tuple[str, int]:
        sampler = self.config.sampler if sampler is None else sampler
        steps = self.config.steps if steps is None else steps
        if sampler not in FLOW_SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r} for the flow objective; choose one of {list(FLOW_SAMPLERS)}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer of at least 1, got {steps!r}")
        return sampler, steps

    def _velocity(self, model: Callable, x: torch.Tensor, t: float, model_kwargs: dict,
                  clip_denoised: bool) -> torch.Tensor:
        """The network's velocity at time ``t > 0``; with clipping, the velocity of the clipped x_0."""
        t_N = torch.full((x.shape[0],), t * self.config.time_scale, device=x.device, dtype=x.dtype)
        velocity = check_prediction(model(x, t_N, **model_kwargs), x, "flow")
        if clip_denoised:
            # x_0 = x_t - t v on the straight path; moving it into [-1, 1] changes v by the same
            # amount divided by t (exactly v where nothing was clipped).
            x_start = x - t * velocity
            velocity = velocity + (x_start - x_start.clamp(-1, 1)) / t
        return velocity

    @torch.no_grad()
    def sample(self, model: Callable, noise: torch.Tensor, *, sampler: str | None = None, steps: int | None = None,
               model_kwargs: dict | None = None, clip_denoised: bool = False, eta: float = 0.0,
               temperature: float = 1.0, progress: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Integrate ``dx/dt = v(x, t)`` from ``noise`` at t = 1 to samples at t = 0 (same shape and dtype).

        The grid is uniform: ``t_i = 1 - i / steps``.  Euler takes ``x += (t_{i+1} - t_i) v(x, t_i)``.
        Heun (Karras et al. 2022) corrects each step with the velocity at the Euler point, except the
        last one, which stays an Euler step, so the network is never evaluated at t = 0 (where the
        clipped velocity would divide by zero): ``2 * steps - 1`` evaluations.

        Args:
            model: network called as ``model(x, t * time_scale, **model_kwargs)``.
            sampler: ``"euler"`` or ``"heun"``; None for the config's.
            steps: number of steps (>= 1); None for the config's.
            clip_denoised: clamp the implied x_0 = x_t - t v to [-1, 1] at every evaluation and step
                with the velocity that leads there (pixel-space data; off for latents).
            eta, temperature: accepted for a common sampler signature; the ODE adds no noise, so
                anything but 0 and 1 is refused.
            progress: show a tqdm bar.
            generator: unused: the result is a deterministic function of ``noise``.

        Raises:
            ValueError: unknown sampler, bad steps, eta != 0 or temperature != 1.
        """
        del generator  # the ODE is deterministic given its start
        if eta != 0:
            raise ValueError(f"eta={eta}: the flow ODE sampler adds no noise; leave eta at 0")
        if temperature != 1:
            raise ValueError(f"temperature={temperature}: the flow ODE sampler adds no noise; leave temperature at 1")
        sampler, steps = self._resolve(sampler, steps)
        model_kwargs = model_kwargs or {}
        times = [1.0 - i / steps for i in range(steps)] + [0.0]
        x = noise
        for i in _steps_bar(steps, progress):
            t, t_next = times[i], times[i + 1]
            velocity = self._velocity(model, x, t, model_kwargs, clip_denoised)
            x_euler = x + (t_next - t) * velocity
            if sampler == "heun" and t_next > 0:
                velocity_next = self._velocity(model, x_euler, t_next, model_kwargs, clip_denoised)
                x = x + (t_next - t) * 0.5 * (velocity + velocity_next)
            else:
                x = x_euler
        return x
