"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"): the ``"meanflow"`` objective.

The network predicts the *average* velocity ``u(z, r, t) = 1/(t - r) * integral_r^t v(z_s, s) ds``
over an interval of the flow ``z_t = (1 - t) x + t eps`` (t = 0 data, t = 1 noise).  Differentiating
``(t - r) u = integral`` in t gives the MeanFlow identity used as a regression target::

    u_tgt = v - (t - r) * du/dt,      du/dt = v . d_z u + d_t u

where ``du/dt`` is one Jacobian-vector product of the network along the tangent (v, 1, 0) of its
inputs (z, t, r).  The target and the adaptive loss weight are held constant (stop-gradient).
With ``r = t`` the target is the plain flow-matching velocity.  One network call,
``x = eps - u(eps, t=1, r=0)``, then maps noise to a sample.

Classifier-free guidance is folded into training (the paper's eq. 19): conditional examples regress
on ``omega * v + (1 - omega) * u(z, t, t | null)`` instead of v, so sampling needs no second pass.
With the paper's mixing term ``kappa`` (its appendix; the official code's default 0.5) the target is
``omega * v + kappa * u(z, t, t | c) + (1 - omega - kappa) * u(z, t, t | null)``: the network's own
conditional velocity takes a share of the noisy single-sample v, and the guidance the network learns
is ``omega / (1 - kappa)``. Guidance applies where t lies in ``guidance_interval`` (elsewhere omega
is 1 and kappa 0).

The network is called as ``model(z, t, r, **model_kwargs)`` with t and r as ``[N]`` tensors in [0, 1].
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import ClassVar

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from zoo.config import ConfigError
from zoo.diffusion.flow import TIME_SAMPLINGS, _per_example, _steps_bar, check_prediction, sample_time
from zoo.diffusion.gaussian import mean_flat, randn
from zoo.registry import register_objective

__all__ = ["MeanFlowConfig", "MeanFlowObjective", "Normalizer", "select_condition"]

NORMALIZERS = ("minmax", "mean_std")
JVP_MODES = ("forward", "double_backward")
PREDICTIONS = ("u", "x")


class Normalizer:
    """Maps data to the space the flow runs in and back.

    ``"minmax"`` is for pixels, which zoo already scales to [-1, 1]: identity on the way in, a clamp
    to [-1, 1] on the way out.  ``"mean_std"`` is for latents: ``(x - mean) / std`` per channel in,
    ``x * std + mean`` out.

    Raises:
        ValueError: an unknown mode, or mean_std without equally long, non-empty mean and std.
    """

    def __init__(self, mode: str = "minmax", mean: tuple[float, ...] = (), std: tuple[float, ...] = ()):
        if mode not in NORMALIZERS:
            raise ValueError(f"unknown normalizer {mode!r}; choose one of {list(NORMALIZERS)}")
        if mode == "mean_std" and (not mean or len(mean) != len(std)):
            raise ValueError(f"the mean_std normalizer needs one mean and one std per channel, got mean={mean} "
                             f"std={std}")
        self.mode = mode
        self.mean = torch.tensor(mean, dtype=torch.float64)
        self.std = torch.tensor(std, dtype=torch.float64)

    def __repr__(self) -> str:
        return f"Normalizer({self.mode!r}, mean={self.mean.tolist()}, std={self.std.tolist()})"

    def _per_channel(self, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2 or x.shape[1] != len(values):
            raise ValueError(f"the mean_std normalizer has {len(values)} channels, data shaped "
                             f"{tuple(x.shape)} has {x.shape[1] if x.ndim >= 2 else 'none'} (dimension 1)")
        return values.to(device=x.device, dtype=x.dtype).view(1, -1, *([1] * (x.ndim - 2)))

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """Data ``[N, C, ...]`` -> flow space."""
        if self.mode == "minmax":
            return x
        return (x - self._per_channel(self.mean, x)) / self._per_channel(self.std, x)

    def unnorm(self, x: torch.Tensor) -> torch.Tensor:
        """Flow space ``[N, C, ...]`` -> data."""
        if self.mode == "minmax":
            return x.clamp(-1, 1)
        return x * self._per_channel(self.std, x) + self._per_channel(self.mean, x)


def select_condition(dropped: torch.Tensor, model_kwargs: dict, uncond_kwargs: dict) -> dict:
    """``model_kwargs`` with each example where ``dropped`` (``[N]`` bool) taken from ``uncond_kwargs``.

    Works for any conditioning tensors whose first dimension is the batch (labels ``[N]``, text
    embeddings ``[N, L, D]``, ...).  Keys absent from ``uncond_kwargs`` pass through unchanged.

    Raises:
        ValueError: an ``uncond_kwargs`` key that ``model_kwargs`` lacks, or tensors of other shapes.
    """
    selected = dict(model_kwargs)
    for key, uncond in uncond_kwargs.items():
        if key not in model_kwargs:
            raise ValueError(f"uncond_kwargs has {key!r} but model_kwargs does not (keys: {sorted(model_kwargs)})")
        cond = model_kwargs[key]
        if not (isinstance(cond, torch.Tensor) and isinstance(uncond, torch.Tensor)) or cond.shape != uncond.shape:
            raise ValueError(f"model_kwargs[{key!r}] and uncond_kwargs[{key!r}] must be tensors of one shape, got "
                             f"{getattr(cond, 'shape', type(cond))} and {getattr(uncond, 'shape', type(uncond))}")
        selected[key] = torch.where(_per_example(dropped.to(cond.device), cond.ndim), uncond, cond)
    return selected


@dataclasses.dataclass
class MeanFlowConfig:
    """Settings of the ``"meanflow"`` objective; defaults follow the paper's ImageNet ablations."""

    time_sampling: str = "logit_normal"
    logit_mean: float = -0.4
    logit_std: float = 1.0
    equal_fraction: float = 0.75  # share of the batch trained with r = t (plain flow matching)
    adaptive_gamma: float = 0.0  # loss weight 1 / (|delta|^2 + c)^p with p = 1 - gamma
    adaptive_c: float = 1e-3
    cfg_drop_prob: float = 0.1  # probability of replacing an example's condition by the null one
    omega: float = 1.0  # guidance scale folded into training; 1 disables it
    omega_max: float = 0.0  # if > omega, each example draws omega uniformly from [omega, omega_max]
    kappa: float = 0.0  # share of the model's own u(z, t, t | c) in the guided target (learned scale omega/(1-kappa))
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # t range where omega and kappa apply
    normalizer: str = "minmax"
    norm_mean: tuple[float, ...] = ()  # per channel, mean_std only
    norm_std: tuple[float, ...] = ()  # per channel, mean_std only
    jvp: str = "forward"  # forward-mode torch.func.jvp, or double_backward (torch.autograd.functional.jvp)
    prediction: str = "u"  # what the network outputs: u (the paper) or x (u = (z - x) / max(t, x_pred_t_min))
    x_pred_t_min: float = 0.05  # floor of t in the division of the x parameterisation
    steps: int = 1  # sampling steps when sample() gets steps=None

    CHOICES: ClassVar[dict[str, tuple]] = {"time_sampling": TIME_SAMPLINGS, "normalizer": NORMALIZERS,
                                           "jvp": JVP_MODES, "prediction": PREDICTIONS}

    def __post_init__(self):
        for key, allowed in self.CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}: {getattr(self, key)!r} is not allowed; choose one of {list(allowed)}")
        for key in ("logit_mean", "logit_std", "adaptive_gamma", "adaptive_c", "omega", "omega_max"):
            if not math.isfinite(getattr(self, key)):
                raise ConfigError(f"{key}: must be a finite number, got {getattr(self, key)}")
        if self.logit_std <= 0:
            raise ConfigError(f"logit_std: must be positive, got {self.logit_std}")
        if not 0 <= self.equal_fraction <= 1:
            raise ConfigError(f"equal_fraction: must lie in [0, 1] (the share of examples with r = t), "
                              f"got {self.equal_fraction}")
        if self.adaptive_gamma > 1:
            raise ConfigError(f"adaptive_gamma: must be at most 1 (the weight power p = 1 - gamma is then >= 0), "
                              f"got {self.adaptive_gamma}")
        if self.adaptive_c <= 0:
            raise ConfigError(f"adaptive_c: must be positive (it keeps the weight finite at zero error), "
                              f"got {self.adaptive_c}")
        if not 0 <= self.cfg_drop_prob <= 1:
            raise ConfigError(f"cfg_drop_prob: must lie in [0, 1], got {self.cfg_drop_prob}")
        if self.omega <= 0:
            raise ConfigError(f"omega: must be positive (1 disables guidance in training), got {self.omega}")
        if not (math.isfinite(self.kappa) and 0 <= self.kappa < 1):
            raise ConfigError(f"kappa: must lie in [0, 1) (the learned guidance is omega / (1 - kappa)), "
                              f"got {self.kappa}")
        interval = tuple(self.guidance_interval)
        if len(interval) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in interval) \
                or not 0 <= interval[0] < interval[1] <= 1:
            raise ConfigError(f"guidance_interval: must be [t_start, t_end] with 0 <= t_start < t_end <= 1, "
                              f"got {list(interval)}")
        self.guidance_interval = (float(interval[0]), float(interval[1]))
        if self.omega_max != 0 and self.omega_max < self.omega:
            raise ConfigError(f"omega_max: must be 0 (omega fixed) or at least omega={self.omega}, "
                              f"got {self.omega_max}")
        if self.normalizer == "mean_std":
            if not self.norm_mean or len(self.norm_mean) != len(self.norm_std):
                raise ConfigError(f"normalizer mean_std needs norm_mean and norm_std with one value per channel, "
                                  f"got norm_mean={list(self.norm_mean)} norm_std={list(self.norm_std)}")
            if any(s <= 0 for s in self.norm_std):
                raise ConfigError(f"norm_std: every value must be positive, got {list(self.norm_std)}")
        elif self.norm_mean or self.norm_std:
            raise ConfigError("norm_mean and norm_std apply to normalizer mean_std only; remove them or set "
                              "normalizer: mean_std")
        if self.steps < 1:
            raise ConfigError(f"steps: must be at least 1, got {self.steps}")
        if not (math.isfinite(self.x_pred_t_min) and 0 < self.x_pred_t_min <= 1):
            raise ConfigError(f"x_pred_t_min: must lie in (0, 1], got {self.x_pred_t_min}")

    @property
    def guided(self) -> bool:
        """Whether training folds guidance in (omega != 1, a range of omegas, or kappa > 0)."""
        return self.omega != 1 or self.omega_max > self.omega or self.kappa > 0


@register_objective("meanflow", config=MeanFlowConfig,
                    description="MeanFlow: average-velocity regression via a JVP, one-step sampling")
class MeanFlowObjective:
    """MeanFlow loss and few-step sampler of a :class:`MeanFlowConfig`.

    Attributes:
        config: the :class:`MeanFlowConfig`.
        normalizer: the :class:`Normalizer` of the config.
        predicts_variance: always False.
        SAMPLERS: the sampler names :meth:`sample` accepts (None means the same).
    """

    predicts_variance = False
    SAMPLERS: ClassVar[tuple[str, ...]] = ("meanflow",)

    def __init__(self, config: MeanFlowConfig | None = None):
        self.config = config if config is not None else MeanFlowConfig()
        self.normalizer = Normalizer(self.config.normalizer, self.config.norm_mean, self.config.norm_std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalizer.norm(x)

    def unnorm(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalizer.unnorm(x)

    # ----------------------------------------------------------------- random draws

    def sample_t_r(self, n: int, *, generator: torch.Generator | None = None,
                   device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Training intervals: ``(t, r)``, each ``[n]`` float32, with ``0 <= r <= t < 1``.

        Two times are drawn per example from the configured density; t is the larger, r the smaller.
        Then ``equal_fraction * n`` examples (rounded half up), chosen by a random permutation, get ``r = t``.
        """
        cfg = self.config
        times_N2 = sample_time((n, 2), time_sampling=cfg.time_sampling, logit_mean=cfg.logit_mean,
                               logit_std=cfg.logit_std, generator=generator, device=device)
        t, r = times_N2.max(dim=1).values, times_N2.min(dim=1).values
        num_equal = int(cfg.equal_fraction * n + 0.5)
        if num_equal > 0:
            perm = torch.randperm(n, generator=generator,
                                  device=generator.device if generator is not None else "cpu").to(t.device)
            equal = torch.zeros(n, dtype=torch.bool, device=t.device)
            equal[perm[:num_equal]] = True
            r = torch.where(equal, t, r)
        return t, r

    def sample_omega(self, n: int, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Guidance scales ``[n]``: ``omega``, or uniform on [omega, omega_max] when omega_max > omega."""
        cfg = self.config
        device = torch.device("cpu") if device is None else torch.device(device)
        if cfg.omega_max <= cfg.omega:
            return torch.full((n,), cfg.omega, device=device)
        unit = torch.rand(n, generator=generator,
                          device=generator.device if generator is not None else device).to(device)
        return cfg.omega + (cfg.omega_max - cfg.omega) * unit

    def _draw_dropped(self, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
        unit = torch.rand(n, generator=generator, device=generator.device if generator is not None else device)
        return (unit < self.config.cfg_drop_prob).to(device)

    def average_velocity(self, model: Callable) -> Callable:
        """The network as ``u(z, t, r)``: ``model`` itself with ``prediction: u``; with ``prediction: x``
        the network's output is read as a clean image x and ``u = (z - x) / max(t, x_pred_t_min)``.

        At r = 0 the x parameterisation is exact (``z_t - t u(z_t, t, 0) = z_0``), so one-step sampling
        returns the network's output itself: the network need not carry the noise through its layers to
        cancel it, which a u-predicting network in pixel space does imperfectly (grainy samples).
        """
        if self.config.prediction == "u":
            return model
        t_min = self.config.x_pred_t_min

        def from_x(z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, **kwargs) -> torch.Tensor:
            x = check_prediction(model(z, t, r, **kwargs), z, "meanflow")
            return (z - x) / _per_example(t.clamp(min=t_min), z.ndim)

        return from_x

    # ----------------------------------------------------------------- pieces of the loss

    @staticmethod
    def guided_velocity(model: Callable, z: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor,
                        omega: torch.Tensor, uncond_kwargs: dict, *, model_kwargs: dict | None = None,
                        dropped: torch.Tensor | None = None, kappa: torch.Tensor | None = None) -> torch.Tensor:
        """The paper's eq. 19: ``omega * v + (1 - omega) * u(z, t, t | null)``, and plain v where ``dropped``;
        with ``kappa``, ``omega * v + kappa * u(z, t, t | c) + (1 - omega - kappa) * u(z, t, t | null)``.

        Args:
            z, velocity: ``[N, C, ...]`` point on the path and its conditional velocity ``eps - x``.
            t: ``[N]`` times; the model's calls use r = t (an instantaneous velocity).
            omega: ``[N]`` guidance scales.
            uncond_kwargs: the null condition, overriding ``model_kwargs`` in the unconditional call.
            dropped: ``[N]`` bool, examples trained without a condition, which keep their plain v.
            kappa: ``[N]`` shares of the conditional prediction; None (or all zero) skips that call.

        The model's predictions are constants of the target: computed without gradients.
        """
        model_kwargs = model_kwargs or {}
        omega_N1 = _per_example(omega.to(device=z.device, dtype=z.dtype), z.ndim)
        with torch.no_grad():
            u_uncond = check_prediction(model(z, t, t, **{**model_kwargs, **uncond_kwargs}), z, "meanflow")
            guided = omega_N1 * velocity + (1 - omega_N1) * u_uncond
            if kappa is not None and bool((kappa != 0).any()):
                kappa_N1 = _per_example(kappa.to(device=z.device, dtype=z.dtype), z.ndim)
                u_cond = check_prediction(model(z, t, t, **model_kwargs), z, "meanflow")
                guided = guided + kappa_N1 * (u_cond - u_uncond)
        if dropped is None:
            return guided
        return torch.where(_per_example(dropped.to(z.device), z.ndim), velocity, guided)

    def prediction_and_target(self, model: Callable, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                              velocity: torch.Tensor, model_kwargs: dict | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u, u_tgt)``: the prediction ``u(z, t, r)`` (with its graph) and the detached target.

        ``u_tgt = velocity - (t - r) * du/dt`` with ``du/dt`` the JVP of the network along
        ``(velocity, 1, 0)`` with respect to ``(z, t, r)``.  ``jvp="forward"`` computes du/dt with
        forward-mode ``torch.func.jvp`` under ``no_grad`` (no autograd graph is kept for it: taking u
        from the same call would record the tangent's graph through every parameter, which at the
        seed's MNIST size needs more than 24 GB); ``"double_backward"`` uses
        ``torch.autograd.functional.jvp`` like the seed. Either way u then comes from an ordinary
        forward pass with its graph, and the JVP is evaluated only on examples with r != t. The JVP
        runs attention on the math kernel: the fused kernels implement neither forward-mode AD nor a
        second derivative.
        """
        model_kwargs = model_kwargs or {}
        # Where r = t the target is the velocity itself ((t - r) * du/dt = 0): the JVP, the costly
        # part of a step, runs only on the examples with r != t (a quarter of them by default).
        dudt = torch.zeros_like(z)
        index = (t != r).nonzero().flatten()
        if index.numel():
            sub_kwargs = {k: v[index] if torch.is_tensor(v) and v.shape[:1] == t.shape else v
                          for k, v in model_kwargs.items()}

            def average_velocity(z_, t_, r_):
                return model(z_, t_, r_, **sub_kwargs)

            primals = (z[index], t[index], r[index])
            tangents = (velocity[index], torch.ones_like(primals[1]), torch.zeros_like(primals[2]))
            with sdpa_kernel([SDPBackend.MATH]):
                if self.config.jvp == "forward":
                    with torch.no_grad():
                        _, dudt_sub = torch.func.jvp(average_velocity, primals, tangents)
                else:
                    _, dudt_sub = torch.autograd.functional.jvp(average_velocity, primals, tangents)
            dudt = dudt.index_copy(0, index, dudt_sub.to(dudt.dtype))
        u = model(z, t, r, **model_kwargs)
        u = check_prediction(u, z, "meanflow")
        u_tgt = velocity - _per_example(t - r, z.ndim) * dudt
        return u, u_tgt.detach()

    def adaptive_weight(self, delta_sq: torch.Tensor) -> torch.Tensor:
        """``1 / (delta_sq + c)^p``, ``p = 1 - adaptive_gamma``, detached; ``delta_sq`` is ``[N]``."""
        power = 1.0 - self.config.adaptive_gamma
        return 1.0 / (delta_sq.detach() + self.config.adaptive_c) ** power

    # ----------------------------------------------------------------- loss and sampling

    def loss(self, model: Callable, x_start: torch.Tensor, model_kwargs: dict | None = None, *,
             uncond_kwargs: dict | None = None,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Batch-mean MeanFlow loss of data ``x_start`` ``[N, C, ...]`` (normalised here).

        Random draws, from ``generator`` when given, in this order: (t, r) by :meth:`sample_t_r`
        (two times per example, then the permutation choosing r = t), the noise, and, only when
        ``uncond_kwargs`` is given, the dropped examples (if ``cfg_drop_prob > 0``) and omega (if it
        is a range).  Without ``uncond_kwargs`` there is neither label dropout nor guidance.

        Args:
            model: ``model(z, t, r, **model_kwargs) -> u``.
            model_kwargs: the condition, e.g. ``{"y": labels}``.
            uncond_kwargs: the null condition of the same shapes, e.g. ``{"y": null_labels}``.

        Returns:
            dict of 0-dim tensors: ``loss`` (adaptively weighted, to backpropagate), ``mse`` (the raw
            mean squared error, detached), ``weight`` (mean adaptive weight) and ``r_neq_t`` (share of
            the batch with r != t).
        """
        cfg = self.config
        model = self.average_velocity(model)
        model_kwargs = dict(model_kwargs or {})
        x = self.norm(x_start)
        n = x.shape[0]
        t, r = self.sample_t_r(n, generator=generator, device=x.device)
        t, r = t.to(x.dtype), r.to(x.dtype)
        eps = randn(x.shape, like=x, generator=generator)
        t_N1 = _per_example(t, x.ndim)
        z = (1 - t_N1) * x + t_N1 * eps
        velocity = eps - x
        if uncond_kwargs is not None:
            dropped = None
            if cfg.cfg_drop_prob > 0:
                dropped = self._draw_dropped(n, generator, x.device)
                model_kwargs = select_condition(dropped, model_kwargs, uncond_kwargs)
            if cfg.guided:
                omega = self.sample_omega(n, generator=generator, device=x.device)
                t_start, t_end = cfg.guidance_interval
                inside = (t >= t_start) & (t <= t_end)
                omega = torch.where(inside, omega.to(t.dtype), torch.ones_like(t))
                kappa = torch.where(inside, torch.full_like(t, cfg.kappa), torch.zeros_like(t)) if cfg.kappa else None
                velocity = self.guided_velocity(model, z, t, velocity, omega, uncond_kwargs,
                                                model_kwargs=model_kwargs, dropped=dropped, kappa=kappa)
        u, u_tgt = self.prediction_and_target(model, z, t, r, velocity, model_kwargs)
        delta_sq = mean_flat((u - u_tgt) ** 2)  # [N]
        weight = self.adaptive_weight(delta_sq)
        return {
            "loss": (weight * delta_sq).mean(),
            "mse": delta_sq.detach().mean(),
            "weight": weight.mean(),
            "r_neq_t": (t != r).to(x.dtype).mean(),
        }

    @torch.no_grad()
    def sample(self, model: Callable, noise: torch.Tensor, *, steps: int | None = None,
               model_kwargs: dict | None = None, clip_denoised: bool = False, progress: bool = False,
               generator: torch.Generator | None = None, sampler: str | None = None, eta: float = 0.0,
               temperature: float = 1.0) -> torch.Tensor:
        """Map ``noise`` (t = 1) to data with ``steps`` average-velocity jumps; returns unnormalised samples.

        On the uniform grid ``1 = t_0 > ... > t_k = 0``: ``z <- z - (t_i - t_{i+1}) u(z, t_i, t_{i+1})``;
        one step is ``eps - u(eps, 1, 0)``.  Guidance was folded in at training: one call per step.

        Args:
            steps: number of jumps (>= 1); None for the config's.
            clip_denoised: clamp the unnormalised result to [-1, 1] (``minmax`` always does).
            sampler: None or ``"meanflow"``; eta and temperature must stay 0 and 1 (no noise is added);
                generator is unused.  They exist for a common sampler signature.

        Raises:
            ValueError: another sampler, eta != 0, temperature != 1, or bad steps.
        """
        del generator  # deterministic given the noise
        if sampler is not None and sampler not in self.SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r} for the meanflow objective; use 'meanflow' (or None)")
        if eta != 0:
            raise ValueError(f"eta={eta}: the meanflow sampler adds no noise; leave eta at 0")
        if temperature != 1:
            raise ValueError(f"temperature={temperature}: the meanflow sampler adds no noise; leave temperature at 1")
        steps = self.config.steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer of at least 1, got {steps!r}")
        model_kwargs = model_kwargs or {}
        model = self.average_velocity(model)
        times = [1.0 - i / steps for i in range(steps)] + [0.0]
        z = noise
        for i in _steps_bar(steps, progress):
            t = torch.full((z.shape[0],), times[i], device=z.device, dtype=z.dtype)
            r = torch.full((z.shape[0],), times[i + 1], device=z.device, dtype=z.dtype)
            u = check_prediction(model(z, t, r, **model_kwargs), z, "meanflow")
            z = z - (times[i] - times[i + 1]) * u
        x = self.unnorm(z)
        return x.clamp(-1, 1) if clip_denoised else x
