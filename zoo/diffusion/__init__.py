"""Gaussian diffusion (ADM/DiT maths, plus v-prediction) and the registered ``"gaussian"`` objective.

``create_diffusion`` mirrors DiT's factory. ``create_objective("gaussian", **overrides)`` (from
:mod:`zoo.registry`) builds a :class:`GaussianObjective`: the training diffusion with a batch
``loss`` and a ``sample`` method over any respacing of the same schedule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from zoo.config import ConfigError
from zoo.diffusion.gaussian import (
    SCHEDULE_NAMES,
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    _split_learned,
    get_named_beta_schedule,
    mean_flat,
)
from zoo.diffusion.likelihood import discretized_gaussian_log_likelihood, normal_kl
from zoo.diffusion.respace import SpacedDiffusion, space_timesteps
from zoo.diffusion.solvers import SOLVERS, solve
from zoo.registry import register_objective

__all__ = [
    "GaussianDiffusion",
    "SpacedDiffusion",
    "space_timesteps",
    "create_diffusion",
    "GaussianConfig",
    "GaussianObjective",
    "get_named_beta_schedule",
    "mean_flat",
    "ModelMeanType",
    "ModelVarType",
    "LossType",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
]

SAMPLERS = ("ddpm", "ddim", *SOLVERS)  # ancestral, DDIM, and the fast multistep ODE solvers


def _diffusion_kwargs(timestep_respacing, noise_schedule="linear", use_kl=False, sigma_small=False,
                      predict_xstart=False, learn_sigma=True, rescale_learned_sigmas=False,
                      diffusion_steps=1000, predict_v=False) -> dict[str, Any]:
    """Constructor arguments of the SpacedDiffusion that :func:`create_diffusion` builds."""
    if predict_xstart and predict_v:
        raise ValueError("predict_xstart and predict_v are exclusive: pick one parameterisation")
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if predict_xstart:
        mean_type = ModelMeanType.START_X
    elif predict_v:
        mean_type = ModelMeanType.VELOCITY
    else:
        mean_type = ModelMeanType.EPSILON
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    return dict(use_timesteps=space_timesteps(diffusion_steps, timestep_respacing), betas=betas,
                model_mean_type=mean_type, model_var_type=var_type, loss_type=loss_type)


def create_diffusion(timestep_respacing, noise_schedule="linear", use_kl=False, sigma_small=False,
                     predict_xstart=False, learn_sigma=True, rescale_learned_sigmas=False,
                     diffusion_steps=1000, predict_v=False) -> SpacedDiffusion:
    """DiT's diffusion factory.

    Args:
        timestep_respacing: ``""``/None for all ``diffusion_steps``, else a :func:`space_timesteps`
            spec (``"250"``, ``"ddim50"``, ``"10,10,10"`` or a list).
        noise_schedule: ``"linear"``, ``"cosine"`` or ``"squaredcos_cap_v2"``.
        use_kl: train on the (rescaled) variational bound instead of the MSE.
        sigma_small: with fixed variance, use the posterior variance instead of beta_t.
        predict_xstart / predict_v: the network predicts x_0 / v instead of eps.
        learn_sigma: the network also outputs a learned-range variance (2C output channels).
        rescale_learned_sigmas: use RESCALED_MSE (VB term scaled by T / 1000).
        diffusion_steps: T of the base process.

    Raises:
        ValueError: unknown schedule, bad respacing, or both predict_xstart and predict_v.
    """
    return SpacedDiffusion(**_diffusion_kwargs(
        timestep_respacing, noise_schedule=noise_schedule, use_kl=use_kl, sigma_small=sigma_small,
        predict_xstart=predict_xstart, learn_sigma=learn_sigma, rescale_learned_sigmas=rescale_learned_sigmas,
        diffusion_steps=diffusion_steps, predict_v=predict_v))


@dataclasses.dataclass
class GaussianConfig:
    """Settings of the ``"gaussian"`` objective; fields and defaults follow DiT's ``create_diffusion``."""

    timestep_respacing: str = ""
    noise_schedule: str = "linear"
    use_kl: bool = False
    sigma_small: bool = False
    predict_xstart: bool = False
    predict_v: bool = False
    learn_sigma: bool = True
    rescale_learned_sigmas: bool = False
    diffusion_steps: int = 1000

    CHOICES: ClassVar[dict[str, tuple]] = {"noise_schedule": SCHEDULE_NAMES}

    def __post_init__(self):
        if self.predict_xstart and self.predict_v:
            raise ConfigError("predict_xstart and predict_v cannot both be true; pick one parameterisation")
        if self.noise_schedule not in SCHEDULE_NAMES:
            raise ConfigError(f"noise_schedule: {self.noise_schedule!r} is not allowed; choose one of "
                              f"{list(SCHEDULE_NAMES)}")
        if self.diffusion_steps < 1:
            raise ConfigError(f"diffusion_steps: must be at least 1, got {self.diffusion_steps}")
        if self.timestep_respacing:
            try:
                space_timesteps(self.diffusion_steps, self.timestep_respacing)
            except ValueError as err:
                raise ConfigError(f"timestep_respacing: {err}") from None


@register_objective("gaussian", config=GaussianConfig,
                    description="ADM/DiT Gaussian diffusion (eps, x0 or v prediction; learned-range variance)")
class GaussianObjective(SpacedDiffusion):
    """The training diffusion of a :class:`GaussianConfig`, with batch loss and sampling helpers.

    It is the :class:`SpacedDiffusion` that ``create_diffusion`` would build from the config, so all
    ADM methods (``q_sample``, ``training_losses``, ``p_sample_loop``, ...) are available directly.

    Attributes:
        config: the :class:`GaussianConfig`.
        diffusion: this object (the training diffusion), for code that expects a wrapped one.
        num_timesteps: number of (respaced) training timesteps.
    """

    SAMPLERS = SAMPLERS  # what sample(sampler=...) accepts; recipes are checked against it

    def __init__(self, config: GaussianConfig | None = None):
        self.config = config if config is not None else GaussianConfig()
        super().__init__(**_diffusion_kwargs(**dataclasses.asdict(self.config)))
        self._sampling_cache: dict[Any, SpacedDiffusion] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    @property
    def diffusion(self) -> SpacedDiffusion:
        return self

    def loss(self, model_fn: Callable, x_start: torch.Tensor, model_kwargs: dict | None = None, *,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Batch-mean training losses at uniformly drawn timesteps.

        Draws ``t ~ U{0, .., num_timesteps-1}`` per sample, then the noise (both from ``generator``
        when given, in that order), and averages each term of :meth:`training_losses` over the batch.

        Returns:
            dict of 0-dim tensors: ``loss`` and, for MSE losses, ``mse`` (+ ``vb`` with learned sigma).
        """
        n = x_start.shape[0]
        if generator is None:
            t = torch.randint(0, self.num_timesteps, (n,), device=x_start.device)
        else:
            t = torch.randint(0, self.num_timesteps, (n,), generator=generator, device=generator.device)
            t = t.to(x_start.device)
        terms = self.training_losses(model_fn, x_start, t, model_kwargs, generator=generator)
        return {name: value.mean() for name, value in terms.items()}

    def data_prediction(self, model_fn: Callable, model_kwargs: dict | None = None, *,
                        clip_denoised: bool = False) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``x0(x_t, t)`` from the network, whatever it predicts (eps, x0 or v), at original timestep
        indices ``t`` of the base schedule; a learned-variance output's variance half is dropped."""
        model_kwargs = {} if model_kwargs is None else model_kwargs
        alphas_cumprod = np.cumprod(1.0 - self.original_betas)
        sqrt_ab = torch.from_numpy(np.sqrt(alphas_cumprod)).float()
        sqrt_1m_ab = torch.from_numpy(np.sqrt(1.0 - alphas_cumprod)).float()
        learned = self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = model_fn(x, t, **model_kwargs)
            out = out[0] if isinstance(out, tuple) else out
            if learned:
                out, _ = _split_learned(out, x)
            shape = (-1,) + (1,) * (x.ndim - 1)
            a = sqrt_ab.to(x.device)[t].view(shape).to(x.dtype)
            s = sqrt_1m_ab.to(x.device)[t].view(shape).to(x.dtype)
            if self.model_mean_type == ModelMeanType.EPSILON:
                x0 = (x - s * out) / a
            elif self.model_mean_type == ModelMeanType.START_X:
                x0 = out
            elif self.model_mean_type == ModelMeanType.VELOCITY:
                x0 = a * x - s * out
            else:
                raise ValueError(f"the fast solvers need an eps, x0 or v model, not {self.model_mean_type}")
            return x0.clamp(-1, 1) if clip_denoised else x0

        return predict

    def sampling_diffusion(self, steps: int | str | None = None) -> SpacedDiffusion:
        """This schedule respaced to ``steps``, cached per value.

        Args:
            steps: None or ``""`` for all ``diffusion_steps``; an int N for N evenly spaced steps; or
                any :func:`space_timesteps` string (``"250"``, ``"ddim50"``, ``"10,10,10"``).

        Raises:
            ValueError: a non-positive or impossible step count, or a bad string.
        """
        if isinstance(steps, bool) or not (steps is None or isinstance(steps, (int, str))):
            raise ValueError(f"steps must be None, an int or a respacing string, got {steps!r}")
        if steps not in self._sampling_cache:
            if steps is None or steps == "":
                spec: Any = [self.config.diffusion_steps]
            elif isinstance(steps, int):
                if steps < 1:
                    raise ValueError(f"steps must be at least 1, got {steps}")
                spec = str(steps)
            else:
                spec = steps
            self._sampling_cache[steps] = SpacedDiffusion(
                use_timesteps=space_timesteps(self.config.diffusion_steps, spec), betas=self.original_betas,
                model_mean_type=self.model_mean_type, model_var_type=self.model_var_type, loss_type=self.loss_type)
        return self._sampling_cache[steps]

    def sample(self, model_fn: Callable, noise: torch.Tensor, *, sampler: str = "ddpm",
               steps: int | str | None = None, model_kwargs: dict | None = None, clip_denoised: bool = False,
               eta: float = 0.0, temperature: float = 1.0, progress: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Denoise ``noise`` (x_T, ``[N, C, ...]``) to samples of the same shape, device and dtype.

        Args:
            model_fn: network called with original timestep indices.
            sampler: ``"ddpm"`` (ancestral, :meth:`p_sample_loop`), ``"ddim"`` (:meth:`ddim_sample_loop`),
                or a fast ODE solver, ``"dpm++2m"`` or ``"unipc"`` (:mod:`zoo.diffusion.solvers`: one
                network evaluation per step, good samples in 10-25 steps).
            steps: respacing, see :meth:`sampling_diffusion`; for the fast solvers a number of steps.
            clip_denoised: clamp x_0 predictions to [-1, 1] (pixel-space data; off for latents).
            eta: DDIM noise scale (ddim only).
            temperature: scale of the per-step noise (ddpm only).
            generator: source of the per-step noise.

        Raises:
            ValueError: unknown sampler, a temperature other than 1 with a deterministic sampler
                (DDIM's noise is set by ``eta``), or ``eta`` with a fast solver.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
        if sampler in SOLVERS:
            if temperature != 1.0 or eta != 0.0:
                raise ValueError(f"{sampler} integrates the deterministic probability-flow ODE: temperature and eta "
                                 f"apply to ddpm and ddim only")
            count = int(steps) if isinstance(steps, str) and steps.strip().isdigit() else steps
            if count is None or count == "":
                raise ValueError(f"{sampler} needs a number of steps (10-25 is its range)")
            predict = self.data_prediction(model_fn, model_kwargs, clip_denoised=clip_denoised)
            return solve(predict, noise, alphas_cumprod=np.cumprod(1.0 - self.original_betas), steps=count,
                         solver=sampler, progress=progress)
        diffusion = self.sampling_diffusion(steps)
        shape = tuple(noise.shape)
        if sampler == "ddpm":
            return diffusion.p_sample_loop(model_fn, shape, noise=noise, clip_denoised=clip_denoised,
                                           model_kwargs=model_kwargs, device=noise.device, progress=progress,
                                           temperature=temperature, generator=generator)
        if temperature != 1.0:
            raise ValueError("temperature applies to the ddpm sampler only; use eta to set DDIM noise")
        return diffusion.ddim_sample_loop(model_fn, shape, noise=noise, clip_denoised=clip_denoised,
                                          model_kwargs=model_kwargs, device=noise.device, progress=progress,
                                          eta=eta, generator=generator)


# Importing these registers the "flow" and "meanflow" objectives; they build on the helpers above.
from zoo.diffusion.flow import FlowConfig, FlowObjective  # noqa: E402
from zoo.diffusion.meanflow import MeanFlowConfig, MeanFlowObjective  # noqa: E402

__all__ += ["FlowConfig", "FlowObjective", "MeanFlowConfig", "MeanFlowObjective"]
