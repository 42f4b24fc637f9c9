"""Discrete-time Gaussian diffusion (DDPM / improved DDPM / ADM / DiT), with v-prediction.

Notation: ``T`` = ``num_timesteps``, timestep indices ``t`` run over ``0 .. T-1`` (index 0 is the
first noising step), ``ab_t`` = alphas_cumprod[t] = prod_{s<=t} (1 - beta_s).

Forward process: ``x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps`` with eps ~ N(0, I).

The model may predict eps (``EPSILON``), x_0 (``START_X``), x_{t-1} (``PREVIOUS_X``) or the velocity
``v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0`` (``VELOCITY``). With learned variance it also outputs,
stacked on the channel axis, a value in [-1, 1] interpolating the log-variance between the
posterior variance and beta_t (``LEARNED_RANGE``), or the log-variance itself (``LEARNED``).

All schedule tables are float64 numpy arrays; values are looked up per sample and cast to float32,
so the maths matches the published ADM/DiT code exactly.

Every method that draws noise takes a keyword-only ``generator`` (a ``torch.Generator``); with a
fixed generator the result is deterministic. The generator may live on another device than the
data (a CPU generator with CUDA tensors): noise is drawn on the generator's device and moved.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

from zoo.diffusion.likelihood import discretized_gaussian_log_likelihood, normal_kl

__all__ = [
    "ModelMeanType",
    "ModelVarType",
    "LossType",
    "SCHEDULE_NAMES",
    "GaussianDiffusion",
    "betas_for_alpha_bar",
    "get_named_beta_schedule",
    "mean_flat",
    "randn",
]


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first (batch): shape ``[N, ...] -> [N]``."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


class ModelMeanType(enum.Enum):
    """What the network's (first C channels of) output predicts."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise eps
    VELOCITY = enum.auto()  # v = sqrt(ab) eps - sqrt(1 - ab) x_0


class ModelVarType(enum.Enum):
    """Where the variance of p(x_{t-1} | x_t) comes from."""

    LEARNED = enum.auto()  # the network outputs the log-variance
    FIXED_SMALL = enum.auto()  # the posterior variance beta~_t (lower bound)
    FIXED_LARGE = enum.auto()  # beta_t (upper bound)
    LEARNED_RANGE = enum.auto()  # the network interpolates between the two bounds (log space)


class LossType(enum.Enum):
    """Training objective."""

    MSE = enum.auto()  # MSE on the mean prediction (+ VB term for a learned variance)
    RESCALED_MSE = enum.auto()  # as MSE, with the VB term scaled by T / 1000
    KL = enum.auto()  # the variational bound term of one timestep
    RESCALED_KL = enum.auto()  # as KL, times T, to estimate the full bound

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


# Names accepted by get_named_beta_schedule; "squaredcos_cap_v2" is the diffusers name of "cosine".
SCHEDULE_NAMES = ("linear", "cosine", "squaredcos_cap_v2")


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
    """Betas that discretise a continuous ``alpha_bar(s)`` on s in [0, 1] into ``T`` steps.

    ``beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta)``. The cap keeps the last
    steps away from beta = 1, where the reverse process would divide by zero.
    """
    betas = [
        min(1.0 - alpha_bar((i + 1) / num_diffusion_timesteps) / alpha_bar(i / num_diffusion_timesteps), max_beta)
        for i in range(num_diffusion_timesteps)
    ]
    return np.asarray(betas, dtype=np.float64)


def _cosine_alpha_bar(s: float) -> float:
    # Nichol & Dhariwal (2021), offset 0.008 so that beta_0 is not vanishingly small.
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """The float64 array of ``num_diffusion_timesteps`` betas of a named schedule.

    - ``"linear"``: Ho et al., betas from 1e-4 to 0.02 at 1000 steps; both ends are scaled by
      ``1000 / T`` so that other step counts describe roughly the same process.
    - ``"cosine"`` (alias ``"squaredcos_cap_v2"``): ab(s) = cos^2((s + 0.008) / 1.008 * pi / 2),
      betas capped at 0.999.

    Raises:
        ValueError: unknown name or a step count below 1.
    """
    if int(num_diffusion_timesteps) != num_diffusion_timesteps or num_diffusion_timesteps < 1:
        raise ValueError(f"num_diffusion_timesteps must be a positive integer, got {num_diffusion_timesteps!r}")
    num_diffusion_timesteps = int(num_diffusion_timesteps)
    if schedule_name == "linear":
        scale = 1000.0 / num_diffusion_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name in ("cosine", "squaredcos_cap_v2"):
        return betas_for_alpha_bar(num_diffusion_timesteps, _cosine_alpha_bar)
    raise ValueError(f"unknown beta schedule {schedule_name!r}; choose one of {list(SCHEDULE_NAMES)}")


def _extract_into_tensor(arr: np.ndarray, timesteps: torch.Tensor, broadcast_shape) -> torch.Tensor:
    """``arr[timesteps]`` as float32 on ``timesteps.device``, shaped ``[N, 1, ...]`` then broadcast.

    Casting before the lookup gives the same values as the reference (lookup in float64, then cast)
    and also works on devices without float64 (MPS).
    """
    res = torch.from_numpy(np.ascontiguousarray(arr)).to(dtype=torch.float32, device=timesteps.device)[timesteps]
    res = res.reshape(res.shape + (1,) * (len(broadcast_shape) - res.ndim))
    return res.expand(broadcast_shape)


def randn(shape, *, like: torch.Tensor | None = None, device=None, dtype=None,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise of ``shape`` on ``like``'s (or ``device``'s) device and dtype.

    With a generator the noise is drawn on the generator's device (a CPU generator cannot fill a
    CUDA tensor) and then moved, so a given seed gives the same numbers wherever the data lives.
    """
    if like is not None:
        device = like.device if device is None else device
        dtype = like.dtype if dtype is None else dtype
    device = torch.device("cpu") if device is None else torch.device(device)
    dtype = torch.float32 if dtype is None else dtype
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    noise = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype)
    return noise.to(device)


def _batch_mask(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """1.0 where t != 0, else 0.0, shaped ``[N, 1, ...]``: the last step adds no noise."""
    return (t != 0).float().view(-1, *([1] * (ndim - 1)))


def _model_device(model, noise: torch.Tensor | None, device) -> torch.device:
    """Where sampling runs: ``device``, else the module's parameters, else ``noise``, else CPU."""
    if device is not None:
        return torch.device(device)
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "__self__", None)
    if isinstance(module, torch.nn.Module):
        param = next(iter(module.parameters()), None)
        if param is not None:
            return param.device
    if noise is not None:
        return noise.device
    return torch.device("cpu")


def _split_learned(model_output: torch.Tensor, x: torch.Tensor):
    """Split a ``[N, 2C, ...]`` output into (mean part, variance part), checking the shape."""
    B, C = x.shape[:2]
    expected = (B, 2 * C, *x.shape[2:])
    if tuple(model_output.shape) != expected:
        raise ValueError(f"a learned-variance model must output shape {expected} (twice the input channels), "
                         f"got {tuple(model_output.shape)}")
    return torch.split(model_output, C, dim=1)


class GaussianDiffusion:
    """Training losses and samplers of a Gaussian diffusion with a fixed beta schedule.

    Args:
        betas: 1-D array of the T betas, each in (0, 1].
        model_mean_type: a :class:`ModelMeanType`.
        model_var_type: a :class:`ModelVarType`.
        loss_type: a :class:`LossType`.

    Models are called as ``model(x_t, t, **model_kwargs)`` with ``t`` a ``[N]`` integer tensor of
    timestep indices; they return ``[N, C, ...]`` (``[N, 2C, ...]`` for learned variance), or a tuple
    ``(output, extra)`` whose ``extra`` is passed through by :meth:`p_mean_variance`.

    Raises:
        ValueError: betas not 1-D or outside (0, 1].
    """

    def __init__(self, *, betas, model_mean_type: ModelMeanType, model_var_type: ModelVarType,
                 loss_type: LossType):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0, so its log is taken from t = 1 there. A one-step
        # process has no t = 1; beta_0 (the FIXED_LARGE value) stands in.
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    # ------------------------------------------------------------------ forward process

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0), each shaped like ``x_start``."""
        mean = _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = _extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = _extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None, *,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = sqrt(ab_t) x_0 + sqrt(1 - ab_t) noise.

        Args:
            x_start: ``[N, ...]`` clean data.
            t: ``[N]`` integer timestep indices in [0, T).
            noise: the eps to use (same shape as ``x_start``); drawn from ``generator`` if None.

        Raises:
            ValueError: ``noise`` has another shape than ``x_start``.
        """
        if noise is None:
            noise = randn(x_start.shape, like=x_start, generator=generator)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (_extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0), shaped like ``x_t``."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start shape {tuple(x_start.shape)} != x_t shape {tuple(x_t.shape)}")
        mean = (_extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + _extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        variance = _extract_into_tensor(self.posterior_variance, t, x_t.shape)
        log_variance = _extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ parameterisations

    def _predict_xstart_from_eps(self, x_t, t, eps):
        if x_t.shape != eps.shape:
            raise ValueError(f"x_t shape {tuple(x_t.shape)} != eps shape {tuple(eps.shape)}")
        return (_extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((_extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart)
                / _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape))

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        # Invert the posterior mean: xprev = coef1 * x_0 + coef2 * x_t.
        return ((xprev - _extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t)
                / _extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape))

    def _predict_xstart_from_v(self, x_t, t, v):
        """x_0 = sqrt(ab) x_t - sqrt(1 - ab) v."""
        if x_t.shape != v.shape:
            raise ValueError(f"x_t shape {tuple(x_t.shape)} != v shape {tuple(v.shape)}")
        return (_extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
                - _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v)

    def _predict_v(self, x_start, t, noise):
        """The v-prediction target v = sqrt(ab) eps - sqrt(1 - ab) x_0."""
        return (_extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * noise
                - _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * x_start)

    # ------------------------------------------------------------------ reverse process

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Apply the model to get p(x_{t-1} | x_t) and its prediction of x_0.

        Args:
            model: callable ``model(x, t, **model_kwargs)``.
            x: ``[N, C, ...]`` the sample at timestep ``t``.
            t: ``[N]`` integer timestep indices.
            clip_denoised: clamp the x_0 prediction to [-1, 1] (pixel-space data).
            denoised_fn: optional map applied to the x_0 prediction before clipping.
            model_kwargs: extra keyword arguments for the model (conditioning).

        Returns:
            dict with ``mean``, ``variance``, ``log_variance``, ``pred_xstart`` (all shaped like
            ``x``) and ``extra`` (second element of a tuple output, else None).

        Raises:
            ValueError: ``t`` is not ``[N]`` or the output has the wrong number of channels.
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        B = x.shape[0]
        if tuple(t.shape) != (B,):
            raise ValueError(f"t must have shape ({B},), got {tuple(t.shape)}")
        model_output = model(x, t, **model_kwargs)
        extra = None
        if isinstance(model_output, tuple):
            model_output, extra = model_output

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            model_output, var_values = _split_learned(model_output, x)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = var_values
            else:
                min_log = _extract_into_tensor(self.posterior_log_variance_clipped, t, x.shape)
                max_log = _extract_into_tensor(np.log(self.betas), t, x.shape)
                # The network's value in [-1, 1] maps to [min_log, max_log]; a bounded range is far
                # easier to learn than the raw log-variance.
                frac = (var_values + 1) / 2
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                # beta_0 is tiny; using the t = 1 posterior variance there gives a better decoder NLL.
                first = self.posterior_variance[1] if self.num_timesteps > 1 else self.betas[0]
                variance = np.append(first, self.betas[1:])
                log_variance = np.log(variance)
            elif self.model_var_type == ModelVarType.FIXED_SMALL:
                variance, log_variance = self.posterior_variance, self.posterior_log_variance_clipped
            else:
                raise ValueError(f"unsupported model_var_type {self.model_var_type}")
            model_variance = _extract_into_tensor(variance, t, x.shape)
            model_log_variance = _extract_into_tensor(log_variance, t, x.shape)

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x, t, model_output))
            model_mean = model_output
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            elif self.model_mean_type == ModelMeanType.EPSILON:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x, t, model_output))
            elif self.model_mean_type == ModelMeanType.VELOCITY:
                pred_xstart = process_xstart(self._predict_xstart_from_v(x, t, model_output))
            else:
                raise ValueError(f"unsupported model_mean_type {self.model_mean_type}")
            model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)

        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
            "extra": extra,
        }

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Classifier guidance on the mean (Sohl-Dickstein et al.): mean + variance * grad log p(y|x)."""
        model_kwargs = {} if model_kwargs is None else model_kwargs
        gradient = cond_fn(x, t, **model_kwargs)
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Classifier guidance on the score (Song et al.): shift eps by -sqrt(1 - ab) * grad."""
        model_kwargs = {} if model_kwargs is None else model_kwargs
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, t, **model_kwargs)
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(out["pred_xstart"], x, t)
        return out

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, *,
                 temperature: float = 1.0, generator: torch.Generator | None = None):
        """One ancestral step: x_{t-1} = mean + temperature * sigma_t * z (no noise where t == 0).

        ``temperature`` scales only the added noise (MAR); 0 returns the mean. Arguments otherwise as
        in :meth:`p_mean_variance`; ``cond_fn`` is optional classifier guidance on the mean.

        Returns:
            dict with ``sample`` (x_{t-1}) and ``pred_xstart``.
        """
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        noise = randn(x.shape, like=x, generator=generator)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + _batch_mask(t, x.ndim) * torch.exp(0.5 * out["log_variance"]) * noise * temperature
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _start(self, model, shape, noise, device, generator):
        """Starting tensor and device of a sampling loop."""
        if not isinstance(shape, (tuple, list, torch.Size)):
            raise ValueError(f"shape must be a tuple or list, got {shape!r}")
        device = _model_device(model, noise, device)
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} != requested shape {tuple(shape)}")
            return noise.to(device), device
        return randn(shape, device=device, generator=generator), device

    def _indices(self, progress: bool):
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from zoo.progress import progress_bar

            indices = progress_bar(indices, desc="steps", unit="step", leave=False)
        return indices

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                      model_kwargs=None, device=None, progress=False, *, temperature: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral sampling from x_T to x_0; returns the final ``[N, ...]`` samples (no grad).

        Args:
            model: the network (callable as in :meth:`p_mean_variance`).
            shape: sample shape ``(N, C, ...)``.
            noise: the starting x_T; drawn from ``generator`` if None.
            device: where to sample; default the module's parameter device, else ``noise``'s, else CPU.
            progress: show a tqdm bar.
            temperature: scale of the per-step noise (not of the starting noise).
            generator: source of all random draws.
        """
        final = None
        for step in self.p_sample_loop_progressive(
                model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
                model_kwargs=model_kwargs, device=device, progress=progress, temperature=temperature,
                generator=generator):
            final = step
        return final["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                  cond_fn=None, model_kwargs=None, device=None, progress=False, *,
                                  temperature: float = 1.0,
                                  generator: torch.Generator | None = None) -> Iterator[dict]:
        """As :meth:`p_sample_loop`, yielding each step's :meth:`p_sample` dict (from t = T-1 down to 0)."""
        img, device = self._start(model, shape, noise, device, generator)
        for i in self._indices(progress):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = self.p_sample(model, img, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                    cond_fn=cond_fn, model_kwargs=model_kwargs, temperature=temperature,
                                    generator=generator)
                yield out
                img = out["sample"]

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
                    eta=0.0, *, generator: torch.Generator | None = None):
        """One DDIM step (Song et al. 2021, eq. 12) from timestep t to the previous kept timestep.

        x_{t-1} = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z, with
        sigma = eta * sqrt((1 - ab_prev) / (1 - ab)) * sqrt(1 - ab / ab_prev); eta = 0 is deterministic,
        eta = 1 matches ancestral sampling's variance.

        Returns:
            dict with ``sample`` and ``pred_xstart``.
        """
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        # Re-derive eps from x0 so that every parameterisation (and clipping) is handled alike.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = _extract_into_tensor(self.alphas_cumprod_prev, t, x.shape)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = randn(x.shape, like=x, generator=generator)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        sample = mean_pred + _batch_mask(t, x.ndim) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None,
                            model_kwargs=None, eta=0.0):
        """One step of the deterministic DDIM ODE run forwards: x_t -> x_{t+1} (inversion).

        Raises:
            ValueError: ``eta`` is not 0 (only the deterministic path can be reversed).
        """
        if eta != 0.0:
            raise ValueError("ddim_reverse_sample needs eta=0: only the deterministic DDIM path is reversible")
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = _extract_into_tensor(self.alphas_cumprod_next, t, x.shape)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                         model_kwargs=None, device=None, progress=False, eta=0.0, *,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """DDIM sampling from x_T to x_0; arguments as in :meth:`p_sample_loop` plus ``eta``."""
        final = None
        for step in self.ddim_sample_loop_progressive(
                model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
                model_kwargs=model_kwargs, device=device, progress=progress, eta=eta, generator=generator):
            final = step
        return final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                     cond_fn=None, model_kwargs=None, device=None, progress=False, eta=0.0, *,
                                     generator: torch.Generator | None = None) -> Iterator[dict]:
        """As :meth:`ddim_sample_loop`, yielding each step's :meth:`ddim_sample` dict."""
        img, device = self._start(model, shape, noise, device, generator)
        for i in self._indices(progress):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = self.ddim_sample(model, img, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                       cond_fn=cond_fn, model_kwargs=model_kwargs, eta=eta, generator=generator)
                yield out
                img = out["sample"]

    # ------------------------------------------------------------------ losses and bounds

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """One term of the variational bound, in bits per dimension.

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the discretised decoder NLL
        -log p(x_0 | x_1) for t == 0.

        Returns:
            dict with ``output`` (``[N]``) and ``pred_xstart``.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"],
                                                           log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None, *,
                        generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per-sample training losses at timesteps ``t``.

        Args:
            model: callable ``model(x_t, t, **model_kwargs)``.
            x_start: ``[N, C, ...]`` clean data.
            t: ``[N]`` integer timesteps in [0, T).
            noise: the eps used to make x_t; drawn from ``generator`` if None.

        Returns:
            dict of ``[N]`` tensors: ``loss``; for MSE losses also ``mse`` and, with learned
            variance, ``vb`` (the bound term, trained through the variance only: the mean part of
            the output is detached there so that the bound cannot pull on the mean prediction).
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        if noise is None:
            noise = randn(x_start.shape, like=x_start, generator=generator)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms: dict[str, torch.Tensor] = {}

        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False,
                                               model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
        elif self.loss_type in (LossType.MSE, LossType.RESCALED_MSE):
            model_output = model(x_t, t, **model_kwargs)
            if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
                model_output, var_values = _split_learned(model_output, x_t)
                frozen = torch.cat([model_output.detach(), var_values], dim=1)
                terms["vb"] = self._vb_terms_bpd(lambda *args, r=frozen: r, x_start, x_t, t,
                                                 clip_denoised=False)["output"]
                if self.loss_type == LossType.RESCALED_MSE:
                    # The original implementation summed over 1000 steps; without 1/1000 the bound
                    # term dominates the MSE.
                    terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
            if self.model_mean_type == ModelMeanType.PREVIOUS_X:
                target = self.q_posterior_mean_variance(x_start, x_t, t)[0]
            elif self.model_mean_type == ModelMeanType.START_X:
                target = x_start
            elif self.model_mean_type == ModelMeanType.EPSILON:
                target = noise
            elif self.model_mean_type == ModelMeanType.VELOCITY:
                target = self._predict_v(x_start, t, noise)
            else:
                raise ValueError(f"unsupported model_mean_type {self.model_mean_type}")
            if model_output.shape != target.shape:
                raise ValueError(f"model output shape {tuple(model_output.shape)} != target shape "
                                 f"{tuple(target.shape)}")
            terms["mse"] = mean_flat((target - model_output) ** 2)
            terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        else:
            raise ValueError(f"unsupported loss_type {self.loss_type}")
        return terms

    def _prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension, ``[N]``; constant in the model."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(qt_mean, qt_log_variance, 0.0, 0.0)) / math.log(2.0)

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None, *,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The full variational bound in bits per dimension (T model calls).

        Returns:
            dict with ``total_bpd`` and ``prior_bpd`` (``[N]``), and ``vb``, ``xstart_mse``, ``mse``
            (``[N, T]``, columns ordered from t = T-1 down to 0).
        """
        vb, xstart_mse, mse = [], [], []
        for i in list(range(self.num_timesteps))[::-1]:
            t = torch.full((x_start.shape[0],), i, device=x_start.device, dtype=torch.long)
            noise = randn(x_start.shape, like=x_start, generator=generator)
            x_t = self.q_sample(x_start, t, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=clip_denoised,
                                         model_kwargs=model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb_t = torch.stack(vb, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        return {
            "total_bpd": vb_t.sum(dim=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb_t,
            "xstart_mse": torch.stack(xstart_mse, dim=1),
            "mse": torch.stack(mse, dim=1),
        }
