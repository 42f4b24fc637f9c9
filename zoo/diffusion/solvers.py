"""Fast ODE solvers for the Gaussian backend: DPM-Solver++(2M) and UniPC (bh2), multistep, order 2.

Both integrate the probability-flow ODE in the log-SNR ``lambda = log(alpha / sigma)`` with the
network's **data prediction** ``x0(x_t, t)`` (eps, x0 and v models alike; a learned-variance model's
variance channels are dropped and its mean's eps used, as diffusers' DiT pipeline does). One network
evaluation per step; the last step lands on sigma = 0, so ``steps`` evaluations give a clean sample.

The conventions are diffusers' (``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
solver_order=2)`` and ``UniPCMultistepScheduler(solver_type="bh2", solver_order=2)`` with their
defaults: ``timestep_spacing="linspace"``, ``lower_order_final=True``, ``final_sigmas_type="zero"``),
and tests/test_solvers.py checks both against those schedulers on the same model and noise.

- DPM-Solver++(2M) (Lu et al., 2022): a first-order step (DDIM) first and last, otherwise
  ``x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) (D0 + D1 / 2)`` with
  ``D1 = (D0 - D_prev) / r``, ``r = h_prev / h``.
- UniPC (Zhao et al., 2023): the same predictor family (``B(h) = e^{-h} - 1``, bh2), plus a
  corrector that reuses the next step's network evaluation to refine the sample it was made at, so
  it gains an order at no extra evaluation.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

SOLVERS = ("dpm++2m", "unipc")


def solver_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """``steps`` original timesteps from ``T - 1`` down, evenly spaced and rounded, without 0
    (diffusers' ``"linspace"`` spacing): ``linspace(0, T - 1, steps + 1)`` reversed, last dropped."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer for the fast solvers, got {steps!r}")
    if steps > num_train_timesteps:
        raise ValueError(f"steps {steps} exceeds the {num_train_timesteps} timesteps of the schedule")
    grid = np.linspace(0, num_train_timesteps - 1, steps + 1).round()[::-1][:-1]
    return [int(t) for t in grid]


class _Schedule:
    """alpha_t, sigma_t and lambda_t at the solver's timesteps, then (0, 1, +inf) at the end."""

    def __init__(self, alphas_cumprod: np.ndarray, timesteps: list[int]):
        # diffusers keeps sigma = sqrt((1 - ab) / ab) as float32 and derives alpha and sigma from it;
        # doing the same keeps the two within float32 rounding of each other.
        sigmas = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
        sigma = np.append(np.interp(timesteps, np.arange(len(sigmas)), sigmas), 0.0).astype(np.float32)
        sigma = torch.from_numpy(sigma)
        self.alpha = 1.0 / torch.sqrt(sigma ** 2 + 1)
        self.sigma = sigma * self.alpha
        self.lam = torch.log(self.alpha) - torch.log(self.sigma)  # +inf at the final sigma = 0

    def at(self, i: int):
        return self.alpha[i], self.sigma[i], self.lam[i]


def solve(data_prediction: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor, *,
          alphas_cumprod: np.ndarray, steps: int, solver: str = "dpm++2m", progress: bool = False) -> torch.Tensor:
    """Integrate from ``noise`` (x_T) to a sample with ``steps`` evaluations of
    ``data_prediction(x_t, t) -> x0`` (``t``: ``[N]`` original timestep indices).

    Raises:
        ValueError: unknown solver or a bad number of steps.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {list(SOLVERS)}")
    timesteps = solver_timesteps(len(alphas_cumprod), steps)
    schedule = _Schedule(np.asarray(alphas_cumprod, dtype=np.float64), timesteps)
    x = noise
    history: list[torch.Tensor] = []  # data predictions, newest last (at most two kept)
    last_x, last_order = None, 1
    indices = range(len(timesteps))
    if progress:
        from zoo.progress import progress_bar

        indices = progress_bar(indices, desc="steps", unit="step", leave=False)
    for i in indices:
        t = torch.full((x.shape[0],), timesteps[i], device=x.device, dtype=torch.long)
        m = data_prediction(x, t)
        if solver == "unipc" and last_x is not None:
            x = _unipc_correct(schedule, i, last_x, history, m, last_order)
        history = (history + [m])[-2:]
        final = i == len(timesteps) - 1
        if solver == "dpm++2m":
            order = 1 if (i == 0 or final) else 2
            x = _dpm_solver_pp(schedule, i, x, history, order)
        else:
            order = min(2, len(timesteps) - i, len(history))
            last_x, last_order = x, order
            x = _unipc_predict(schedule, i, x, history, order)
    return x


def _dpm_solver_pp(schedule: _Schedule, i: int, x: torch.Tensor, history: list[torch.Tensor], order: int):
    """One DPM-Solver++ step from timestep i to i + 1 (order 1 = DDIM, 2 = multistep midpoint)."""
    alpha_t, sigma_t, lam_t = schedule.at(i + 1)
    _, sigma_s, lam_s = schedule.at(i)
    h = lam_t - lam_s
    phi = alpha_t * torch.expm1(-h)  # alpha_t (e^{-h} - 1)
    d0 = history[-1]
    if order == 1:
        return (sigma_t / sigma_s) * x - phi * d0
    r = (lam_s - schedule.lam[i - 1]) / h
    d1 = (d0 - history[-2]) / r
    return (sigma_t / sigma_s) * x - phi * d0 - 0.5 * phi * d1


def _unipc_coefficients(h: torch.Tensor, order: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(h phi_1, B(h), b_1..b_order) of UniPC-bh2 for data prediction (hh = -h)."""
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    b = []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, b


def _unipc_predict(schedule: _Schedule, i: int, x: torch.Tensor, history: list[torch.Tensor], order: int):
    """UniP: step from timestep i to i + 1 with the data predictions ``history`` (newest last)."""
    alpha_t, sigma_t, lam_t = schedule.at(i + 1)
    _, sigma_s, lam_s = schedule.at(i)
    h = lam_t - lam_s
    h_phi_1, b_h, _ = _unipc_coefficients(h, order)
    m0 = history[-1]
    out = sigma_t / sigma_s * x - alpha_t * h_phi_1 * m0
    if order == 2:
        r = (schedule.lam[i - 1] - lam_s) / h
        out = out - alpha_t * b_h * 0.5 * (history[-2] - m0) / r
    return out


def _unipc_correct(schedule: _Schedule, i: int, last_x: torch.Tensor, history: list[torch.Tensor],
                   model_t: torch.Tensor, order: int):
    """UniC: redo the step from timestep i - 1 (``last_x``) to i with the new prediction ``model_t``."""
    alpha_t, sigma_t, lam_t = schedule.at(i)
    _, sigma_s, lam_s = schedule.at(i - 1)
    h = lam_t - lam_s
    h_phi_1, b_h, b = _unipc_coefficients(h, order)
    m0 = history[-1]
    out = sigma_t / sigma_s * last_x - alpha_t * h_phi_1 * m0
    d1_t = model_t - m0
    if order == 1:
        return out - alpha_t * b_h * 0.5 * d1_t
    r = (schedule.lam[i - 2] - lam_s) / h
    d1 = (history[-2] - m0) / r
    rhos = torch.linalg.solve(torch.stack([torch.stack([torch.ones(()), torch.ones(())]),
                                           torch.stack([r, torch.ones(())])]), torch.stack(b))
    return out - alpha_t * b_h * (rhos[0] * d1 + rhos[1] * d1_t)
