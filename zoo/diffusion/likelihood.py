"""Gaussian divergences and likelihoods used by the variational bound of a diffusion model.

All functions are elementwise and broadcast their arguments; results are in nats.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "normal_kl",
    "approx_standard_normal_cdf",
    "continuous_gaussian_log_likelihood",
    "discretized_gaussian_log_likelihood",
]

# Smallest probability fed to log(): keeps a bin that received no mass finite (about -27.6 nats).
_MIN_PROB = 1e-12


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    Any argument may be a Python float or a tensor; they broadcast together. At least one must be a
    tensor (it fixes the dtype and device of the result).

    Raises:
        TypeError: none of the four arguments is a tensor.
    """
    ref = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if ref is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    # torch.exp() does not accept Python floats, so the log-variances are made tensors.
    logvar1 = logvar1 if isinstance(logvar1, torch.Tensor) else torch.tensor(logvar1).to(ref)
    logvar2 = logvar2 if isinstance(logvar2, torch.Tensor) else torch.tensor(logvar2).to(ref)
    return 0.5 * (
        logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) of the standard normal via the tanh approximation (max abs error about 2e-4).

    The approximation rather than erf() is kept so that likelihoods match the published ADM/DiT
    numbers bit for bit.
    """
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def continuous_gaussian_log_likelihood(x: torch.Tensor, *, means: torch.Tensor,
                                       log_scales: torch.Tensor) -> torch.Tensor:
    """Log density of ``x`` under N(means, exp(log_scales)**2), elementwise, in nats."""
    normalized = (x - means) * torch.exp(-log_scales)
    return -0.5 * normalized.pow(2) - log_scales - 0.5 * math.log(2.0 * math.pi)


def discretized_gaussian_log_likelihood(x: torch.Tensor, *, means: torch.Tensor,
                                        log_scales: torch.Tensor) -> torch.Tensor:
    """Log probability of 8-bit data ``x`` under a Gaussian integrated over each pixel's bin.

    Args:
        x: targets that were uint8 values rescaled to [-1, 1] (bins of width 2/255 centred on them).
        means, log_scales: Gaussian mean and log standard deviation, same shape as ``x``.

    Returns:
        Tensor like ``x`` of log probabilities in nats. The lowest bin extends to -inf and the
        highest to +inf, so the probabilities of the 256 bins sum to one.

    Raises:
        ValueError: the three shapes differ.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, means {tuple(means.shape)}, "
                         f"log_scales {tuple(log_scales.shape)}")
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_upper = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_upper = torch.log(cdf_upper.clamp(min=_MIN_PROB))
    log_survival_lower = torch.log((1.0 - cdf_lower).clamp(min=_MIN_PROB))
    log_bin = torch.log((cdf_upper - cdf_lower).clamp(min=_MIN_PROB))
    # 0.999 sits between the edge value (+-1) and its neighbour (+-253/255), robust to rounding.
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_survival_lower, log_bin))
