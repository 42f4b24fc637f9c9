"""Tests of zoo.diffusion: expected numbers are derived from closed forms in float64 numpy here,
not by calling the helper under test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zoo.config import ConfigError
from zoo.diffusion import (
    GaussianConfig,
    GaussianDiffusion,
    SpacedDiffusion,
    create_diffusion,
    get_named_beta_schedule,
    mean_flat,
    space_timesteps,
)
from zoo.diffusion.gaussian import LossType, ModelMeanType, ModelVarType
from zoo.diffusion.likelihood import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl
from zoo.registry import create_objective

# ----------------------------------------------------------------------------- helpers


def hand_linear_betas(T: int = 1000) -> np.ndarray:
    """Ho et al.'s linear schedule written out: 1e-4 .. 0.02 at T = 1000, both ends scaled by 1000/T."""
    lo, hi = 1e-4 * 1000 / T, 0.02 * 1000 / T
    return np.array([lo + (hi - lo) * i / (T - 1) for i in range(T)], dtype=np.float64)


def hand_alphas_cumprod(T: int = 1000) -> np.ndarray:
    ab, out = 1.0, []
    for b in hand_linear_betas(T):
        ab *= 1.0 - b
        out.append(ab)
    return np.array(out)


def make(mean=ModelMeanType.EPSILON, var=ModelVarType.FIXED_LARGE, loss=LossType.MSE, T=1000):
    return GaussianDiffusion(betas=get_named_beta_schedule("linear", T), model_mean_type=mean,
                             model_var_type=var, loss_type=loss)


def bcast(values, ndim=4) -> torch.Tensor:
    """Per-sample float64 values shaped [N, 1, 1, 1]."""
    return torch.tensor(np.asarray(values, dtype=np.float64)).view(-1, *([1] * (ndim - 1)))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close(a: torch.Tensor, b: torch.Tensor, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------- schedules


def test_linear_schedule_endpoints_at_1000_steps():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4, rel=1e-12)
    assert betas[-1] == pytest.approx(0.02, rel=1e-12)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)


def test_linear_schedule_is_scaled_for_fewer_steps():
    betas = get_named_beta_schedule("linear", 250)
    assert betas[0] == pytest.approx(4e-4, rel=1e-12)
    assert betas[-1] == pytest.approx(0.08, rel=1e-12)


def test_cosine_alpha_bar_matches_cos_squared():
    T = 1000

    def f(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    ab = np.cumprod(1.0 - get_named_beta_schedule("cosine", T))
    expected = np.array([f((i + 1) / T) / f(0.0) for i in range(T)])
    # The last step is capped, so only the uncapped prefix follows the formula.
    np.testing.assert_allclose(ab[:-1], expected[:-1], rtol=1e-9)


def test_cosine_betas_are_capped_at_0_999_and_alias_matches():
    betas = get_named_beta_schedule("cosine", 1000)
    assert betas.max() == pytest.approx(0.999) and betas[-1] == pytest.approx(0.999)
    np.testing.assert_array_equal(betas, get_named_beta_schedule("squaredcos_cap_v2", 1000))


def test_unknown_schedule_names_the_allowed_ones():
    with pytest.raises(ValueError, match="linear"):
        get_named_beta_schedule("quadratic", 10)


# ----------------------------------------------------------------------------- forward process


def test_q_sample_matches_closed_form():
    d = make()
    ab = hand_alphas_cumprod()
    t = torch.tensor([0, 10, 500, 999])
    x0, eps = torch.randn(4, 2, 3, 3, generator=seeded(1)), torch.randn(4, 2, 3, 3, generator=seeded(2))
    expected = bcast(np.sqrt(ab[t])) * x0.double() + bcast(np.sqrt(1 - ab[t])) * eps.double()
    close(d.q_sample(x0, t, noise=eps), expected)


def test_q_sample_draws_noise_from_generator():
    d = make()
    x0, t = torch.randn(2, 1, 4, 4), torch.tensor([100, 900])
    a = d.q_sample(x0, t, generator=seeded(5))
    b = d.q_sample(x0, t, noise=torch.randn(x0.shape, generator=seeded(5)))
    torch.testing.assert_close(a, b)


def test_q_mean_variance_matches_closed_form():
    d = make()
    ab = hand_alphas_cumprod()
    t = torch.tensor([3, 700])
    x0 = torch.randn(2, 1, 2, 2, generator=seeded(0))
    mean, var, logvar = d.q_mean_variance(x0, t)
    close(mean, bcast(np.sqrt(ab[t])) * x0.double())
    close(var, bcast(1 - ab[t]).expand(x0.shape))
    close(logvar, bcast(np.log(1 - ab[t])).expand(x0.shape))


def test_posterior_matches_bayes_rule():
    """q(x_{t-1}|x_t,x_0) ∝ N(x_{t-1}; sqrt(ab_{t-1}) x_0, 1-ab_{t-1}) · N(x_t; sqrt(a_t) x_{t-1}, b_t)."""
    d = make()
    betas, ab = hand_linear_betas(), hand_alphas_cumprod()
    t = np.array([1, 5, 500, 999])
    ab_prev = ab[t - 1]
    precision = 1 / (1 - ab_prev) + (1 - betas[t]) / betas[t]
    var = 1 / precision
    x0, xt = torch.randn(4, 2, 2, 2, generator=seeded(3)), torch.randn(4, 2, 2, 2, generator=seeded(4))
    mean = bcast(var) * (bcast(np.sqrt(ab_prev) / (1 - ab_prev)) * x0.double()
                         + bcast(np.sqrt(1 - betas[t]) / betas[t]) * xt.double())
    got_mean, got_var, got_logvar = d.q_posterior_mean_variance(x0, xt, torch.from_numpy(t))
    close(got_mean, mean)
    close(got_var, bcast(var).expand(x0.shape), rtol=1e-5, atol=0)
    close(got_logvar, bcast(np.log(var)).expand(x0.shape))


def test_posterior_log_variance_clipped_first_entry_uses_t1():
    d = make()
    betas, ab = hand_linear_betas(), hand_alphas_cumprod()
    var1 = betas[1] * (1 - ab[0]) / (1 - ab[1])
    assert d.posterior_variance[0] == 0.0
    assert d.posterior_log_variance_clipped[0] == pytest.approx(math.log(var1), rel=1e-12)
    assert d.posterior_log_variance_clipped[1] == pytest.approx(math.log(var1), rel=1e-12)


# ----------------------------------------------------------------------------- variances


def _posterior_var(t):
    betas, ab = hand_linear_betas(), hand_alphas_cumprod()
    ab_prev = np.append(1.0, ab[:-1])
    return betas[t] * (1 - ab_prev[t]) / (1 - ab[t])


@pytest.mark.parametrize("frac_value, which", [(-1.0, "posterior"), (1.0, "beta"), (0.0, "middle")])
def test_learned_range_interpolates_log_variance(frac_value, which):
    d = make(var=ModelVarType.LEARNED_RANGE)
    betas = hand_linear_betas()
    t = np.array([0, 3, 700])
    x = torch.randn(3, 2, 2, 2, generator=seeded(0))
    out = d.p_mean_variance(lambda x, t: torch.cat([torch.zeros_like(x), torch.full_like(x, frac_value)], 1),
                            x, torch.from_numpy(t))
    low = np.log(np.where(t == 0, _posterior_var(1), _posterior_var(t)))
    high = np.log(betas[t])
    expected = {"posterior": low, "beta": high, "middle": 0.5 * (low + high)}[which]
    close(out["log_variance"], bcast(expected).expand(x.shape))
    close(out["variance"], bcast(np.exp(expected)).expand(x.shape), rtol=1e-5, atol=0)


def test_fixed_large_uses_beta_except_at_t0():
    d = make(var=ModelVarType.FIXED_LARGE)
    betas = hand_linear_betas()
    x = torch.zeros(3, 1, 2, 2)
    out = d.p_mean_variance(lambda x, t: torch.zeros_like(x), x, torch.tensor([0, 1, 999]))
    expected = np.array([_posterior_var(1), betas[1], betas[999]])
    close(out["variance"], bcast(expected).expand(x.shape), rtol=1e-6, atol=0)


def test_fixed_small_uses_posterior_variance():
    d = make(var=ModelVarType.FIXED_SMALL)
    x = torch.zeros(2, 1, 2, 2)
    out = d.p_mean_variance(lambda x, t: torch.zeros_like(x), x, torch.tensor([1, 500]))
    close(out["variance"], bcast(_posterior_var(np.array([1, 500]))).expand(x.shape), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- parameterisations


def test_eps_and_xstart_round_trip():
    d = make()
    ab = hand_alphas_cumprod()
    t = torch.tensor([0, 250, 999])
    x0, eps = torch.randn(3, 2, 3, 3, generator=seeded(0)), torch.randn(3, 2, 3, 3, generator=seeded(1))
    xt = (bcast(np.sqrt(ab[t])) * x0.double() + bcast(np.sqrt(1 - ab[t])) * eps.double()).float()
    close(d._predict_xstart_from_eps(xt, t, eps), x0, atol=1e-3, rtol=1e-4)  # 1/sqrt(ab) ~ 80 at t=999
    close(d._predict_eps_from_xstart(xt, t, x0), eps, atol=1e-4, rtol=1e-4)


def test_v_prediction_training_target():
    d = make(mean=ModelMeanType.VELOCITY)
    ab = hand_alphas_cumprod()
    t = torch.tensor([10, 600])
    x0, eps = torch.randn(2, 2, 3, 3, generator=seeded(0)), torch.randn(2, 2, 3, 3, generator=seeded(1))
    v = bcast(np.sqrt(ab[t])) * eps.double() - bcast(np.sqrt(1 - ab[t])) * x0.double()
    terms = d.training_losses(lambda x, t: torch.zeros_like(x), x0, t, noise=eps)
    close(terms["mse"], (v ** 2).mean(dim=(1, 2, 3)))


def test_v_prediction_recovers_x0():
    d = make(mean=ModelMeanType.VELOCITY)
    ab = hand_alphas_cumprod()
    t = torch.tensor([0, 400, 999])
    x0, eps = torch.randn(3, 2, 3, 3, generator=seeded(0)), torch.randn(3, 2, 3, 3, generator=seeded(1))
    xt = (bcast(np.sqrt(ab[t])) * x0.double() + bcast(np.sqrt(1 - ab[t])) * eps.double()).float()
    v = (bcast(np.sqrt(ab[t])) * eps.double() - bcast(np.sqrt(1 - ab[t])) * x0.double()).float()
    out = d.p_mean_variance(lambda x, t: v, xt, t, clip_denoised=False)
    close(out["pred_xstart"], x0, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- training losses


def test_training_mse_is_noise_regression_for_eps_model():
    d = make()
    ab = hand_alphas_cumprod()
    t = torch.tensor([5, 995])
    x0, eps = torch.randn(2, 3, 4, 4, generator=seeded(0)), torch.randn(2, 3, 4, 4, generator=seeded(1))
    xt = bcast(np.sqrt(ab[t])) * x0.double() + bcast(np.sqrt(1 - ab[t])) * eps.double()
    expected = ((eps.double() - (0.5 * xt + 0.1)) ** 2).mean(dim=(1, 2, 3))
    terms = d.training_losses(lambda x, t: 0.5 * x + 0.1, x0, t, noise=eps)
    assert set(terms) == {"loss", "mse"}
    close(terms["mse"], expected)
    close(terms["loss"], expected)


def test_training_mse_targets_x0_for_xstart_model():
    d = make(mean=ModelMeanType.START_X)
    x0, eps = torch.randn(2, 1, 3, 3, generator=seeded(0)), torch.randn(2, 1, 3, 3, generator=seeded(1))
    terms = d.training_losses(lambda x, t: torch.zeros_like(x), x0, torch.tensor([1, 2]), noise=eps)
    close(terms["mse"], (x0.double() ** 2).mean(dim=(1, 2, 3)))


def test_learned_sigma_vb_is_detached_from_mean():
    d = make(var=ModelVarType.LEARNED_RANGE)
    x0, eps = torch.randn(2, 2, 3, 3, generator=seeded(0)), torch.randn(2, 2, 3, 3, generator=seeded(1))
    output = (0.1 * torch.randn(2, 4, 3, 3, generator=seeded(2))).requires_grad_(True)
    terms = d.training_losses(lambda x, t: output, x0, torch.tensor([0, 300]), noise=eps)
    assert set(terms) == {"loss", "mse", "vb"}
    close(terms["loss"], terms["mse"] + terms["vb"])
    terms["vb"].sum().backward()
    assert torch.all(output.grad[:, :2] == 0)
    assert output.grad[:, 2:].abs().sum() > 0


def test_kl_loss_vanishes_for_oracle_model_with_posterior_variance():
    d = make(var=ModelVarType.FIXED_SMALL, loss=LossType.RESCALED_KL)
    x0, eps = torch.randn(2, 1, 4, 4, generator=seeded(0)), torch.randn(2, 1, 4, 4, generator=seeded(1))
    terms = d.training_losses(lambda x, t: eps, x0, torch.tensor([10, 800]), noise=eps)
    assert set(terms) == {"loss"}
    assert terms["loss"].abs().max() < 1e-3


def test_prior_bpd_matches_analytic_kl():
    d = make()
    ab_T = hand_alphas_cumprod()[-1]
    x0 = torch.randn(2, 1, 3, 3, generator=seeded(0)).double()
    kl = 0.5 * (-1 - math.log(1 - ab_T) + (1 - ab_T) + ab_T * x0 ** 2)
    close(d._prior_bpd(x0.float()), kl.mean(dim=(1, 2, 3)) / math.log(2), atol=1e-6, rtol=1e-4)


def test_mean_flat_averages_non_batch_dims():
    x = torch.arange(12.0).view(2, 2, 3)
    torch.testing.assert_close(mean_flat(x), torch.tensor([2.5, 8.5]))


# ----------------------------------------------------------------------------- likelihood


def test_normal_kl_of_identical_gaussians_is_zero():
    m, lv = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(normal_kl(m, lv, m, lv), torch.zeros(5), atol=1e-7, rtol=0)


def test_normal_kl_matches_numerical_integration():
    m1, s1, m2, s2 = 0.3, 0.7, -0.4, 1.6
    x = np.linspace(-15, 15, 200001)
    p = np.exp(-0.5 * ((x - m1) / s1) ** 2) / (s1 * math.sqrt(2 * math.pi))
    q = np.exp(-0.5 * ((x - m2) / s2) ** 2) / (s2 * math.sqrt(2 * math.pi))
    expected = float(np.sum(p * np.log(p / q)) * (x[1] - x[0]))
    got = normal_kl(torch.tensor(m1, dtype=torch.float64), 2 * math.log(s1), m2, 2 * math.log(s2))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_approx_cdf_is_close_to_erf():
    x = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    exact = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    assert (approx_standard_normal_cdf(x) - exact).abs().max() < 3e-4


def test_discretized_likelihood_sums_to_one_over_bins():
    bins = torch.tensor([2 * k / 255 - 1 for k in range(256)], dtype=torch.float64)
    means = torch.full_like(bins, 0.2)
    log_scales = torch.full_like(bins, math.log(0.3))
    probs = discretized_gaussian_log_likelihood(bins, means=means, log_scales=log_scales).exp()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)
    # The most likely bin is the one holding the mean.
    assert abs(bins[probs.argmax()].item() - 0.2) <= 1 / 255


# ----------------------------------------------------------------------------- respacing


def test_space_timesteps_ddim50_uses_stride_20():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))


def test_space_timesteps_sections_on_300_steps():
    expected = {s * 100 + 11 * k for s in range(3) for k in range(10)}
    assert space_timesteps(300, "10,10,10") == expected
    assert space_timesteps(300, [10, 10, 10]) == expected


def test_space_timesteps_single_section_keeps_both_ends():
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250 and min(steps) == 0 and max(steps) == 999


def test_space_timesteps_impossible_split_message():
    with pytest.raises(ValueError, match="cannot divide section of 5 steps into 10"):
        space_timesteps(10, "5,10")


def test_space_timesteps_impossible_ddim_count():
    with pytest.raises(ValueError, match="exactly 6 steps"):
        space_timesteps(10, "ddim6")


def test_spaced_diffusion_keeps_base_alphas_cumprod():
    kept = sorted(space_timesteps(1000, "ddim50"))
    sd = SpacedDiffusion(kept, betas=hand_linear_betas(), model_mean_type=ModelMeanType.EPSILON,
                         model_var_type=ModelVarType.FIXED_LARGE, loss_type=LossType.MSE)
    assert sd.num_timesteps == 50 and sd.timestep_map == kept
    np.testing.assert_allclose(sd.alphas_cumprod, hand_alphas_cumprod()[kept], rtol=1e-12)


def test_spaced_diffusion_calls_model_with_original_timesteps():
    sd = create_diffusion("ddim10", diffusion_steps=100, learn_sigma=False)
    seen = []

    def model(x, t):
        seen.append(t.tolist())
        return torch.zeros_like(x)

    x = torch.zeros(3, 1, 2, 2)
    sd.p_mean_variance(model, x, torch.tensor([0, 3, 9]))
    sd.training_losses(model, x, torch.tensor([1, 2, 8]), noise=torch.zeros_like(x))
    assert seen == [[0, 30, 90], [10, 20, 80]]


# ----------------------------------------------------------------------------- samplers


def test_ddim_step_with_eta0_matches_eq12():
    d = make()
    ab = hand_alphas_cumprod()
    ab_prev = np.append(1.0, ab[:-1])
    t = np.array([500, 20])
    x = torch.randn(2, 2, 3, 3, generator=seeded(0))
    eps = 0.3 * x.double()
    x0 = (x.double() - bcast(np.sqrt(1 - ab[t])) * eps) / bcast(np.sqrt(ab[t]))
    expected = bcast(np.sqrt(ab_prev[t])) * x0 + bcast(np.sqrt(1 - ab_prev[t])) * eps
    a = d.ddim_sample(lambda x, t: 0.3 * x, x, torch.from_numpy(t), clip_denoised=False, generator=seeded(1))
    b = d.ddim_sample(lambda x, t: 0.3 * x, x, torch.from_numpy(t), clip_denoised=False, generator=seeded(2))
    close(a["sample"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["sample"], b["sample"])


def test_ddim_with_oracle_noise_model_recovers_x0():
    d = create_diffusion("ddim10", learn_sigma=False)
    ab = torch.from_numpy(hand_alphas_cumprod())
    x0 = torch.rand(2, 2, 4, 4, generator=seeded(0)) * 2 - 1

    def oracle(x, t):  # t are original timesteps: the true eps of x w.r.t. x0
        a = ab[t].view(-1, 1, 1, 1)
        return ((x.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()).float()

    out = d.ddim_sample_loop(oracle, x0.shape, noise=torch.randn(x0.shape, generator=seeded(1)),
                             clip_denoised=False)
    close(out, x0, atol=1e-4, rtol=1e-4)


def test_p_sample_adds_no_noise_at_t0():
    d = make()
    x = torch.randn(2, 1, 3, 3, generator=seeded(0))
    t = torch.tensor([0, 5])
    mean = d.p_mean_variance(lambda x, t: 0.1 * x, x, t)["mean"]
    s1 = d.p_sample(lambda x, t: 0.1 * x, x, t, generator=seeded(1))["sample"]
    s2 = d.p_sample(lambda x, t: 0.1 * x, x, t, generator=seeded(2))["sample"]
    torch.testing.assert_close(s1[0], mean[0])
    torch.testing.assert_close(s2[0], mean[0])
    assert not torch.allclose(s1[1], mean[1])


def test_p_sample_temperature_zero_gives_mean():
    d = make()
    x, t = torch.randn(2, 1, 3, 3, generator=seeded(0)), torch.tensor([300, 900])
    mean = d.p_mean_variance(lambda x, t: 0.1 * x, x, t)["mean"]
    out = d.p_sample(lambda x, t: 0.1 * x, x, t, temperature=0.0, generator=seeded(1))
    torch.testing.assert_close(out["sample"], mean)


def test_p_sample_temperature_scales_only_the_noise():
    d = make()
    x, t = torch.randn(2, 1, 3, 3, generator=seeded(0)), torch.tensor([300, 900])
    mean = d.p_mean_variance(lambda x, t: 0.1 * x, x, t)["mean"]
    full = d.p_sample(lambda x, t: 0.1 * x, x, t, generator=seeded(1))["sample"]
    half = d.p_sample(lambda x, t: 0.1 * x, x, t, temperature=0.5, generator=seeded(1))["sample"]
    betas = hand_linear_betas()
    noise = torch.randn(x.shape, generator=seeded(1))
    close(full - mean, bcast(np.sqrt(betas[[300, 900]])) * noise.double())  # FIXED_LARGE sigma
    close(half - mean, 0.5 * (full - mean))


class _TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 1)

    def forward(self, x, t):
        return self.conv(x)


def test_p_sample_loop_is_deterministic_with_generator():
    d = create_diffusion("5", learn_sigma=False)
    net = _TinyNet()
    a, b, c = (d.p_sample_loop(net, (2, 2, 3, 3), generator=seeded(s)) for s in (0, 0, 1))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_sampling_loop_starts_from_given_noise():
    d = create_diffusion("3", learn_sigma=False)
    noise = torch.randn(1, 2, 3, 3, generator=seeded(0))
    steps = list(d.ddim_sample_loop_progressive(lambda x, t: torch.zeros_like(x), noise.shape, noise=noise,
                                                     clip_denoised=False))
    # With eps = 0, the first DDIM step only rescales x_T by sqrt(ab_prev / ab).
    ab = hand_alphas_cumprod()[d.timestep_map]
    close(steps[0]["sample"], noise.double() * math.sqrt(ab[1] / ab[2]))
    assert len(steps) == 3


# ----------------------------------------------------------------------------- factory and objective


@pytest.mark.parametrize("kwargs, mean, var, loss", [
    ({}, ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE, LossType.MSE),
    ({"learn_sigma": False}, ModelMeanType.EPSILON, ModelVarType.FIXED_LARGE, LossType.MSE),
    ({"learn_sigma": False, "sigma_small": True}, ModelMeanType.EPSILON, ModelVarType.FIXED_SMALL, LossType.MSE),
    ({"predict_xstart": True}, ModelMeanType.START_X, ModelVarType.LEARNED_RANGE, LossType.MSE),
    ({"predict_v": True}, ModelMeanType.VELOCITY, ModelVarType.LEARNED_RANGE, LossType.MSE),
    ({"use_kl": True}, ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE, LossType.RESCALED_KL),
    ({"rescale_learned_sigmas": True}, ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE, LossType.RESCALED_MSE),
])
def test_create_diffusion_maps_flags_like_dit(kwargs, mean, var, loss):
    d = create_diffusion("", **kwargs)
    assert (d.model_mean_type, d.model_var_type, d.loss_type, d.num_timesteps) == (mean, var, loss, 1000)


def test_create_diffusion_rejects_two_parameterisations():
    with pytest.raises(ValueError, match="predict_xstart"):
        create_diffusion("", predict_xstart=True, predict_v=True)


def test_gaussian_config_defaults_follow_dit():
    c = GaussianConfig()
    assert (c.timestep_respacing, c.noise_schedule, c.use_kl, c.sigma_small, c.predict_xstart, c.predict_v,
            c.learn_sigma, c.rescale_learned_sigmas, c.diffusion_steps) == \
        ("", "linear", False, False, False, False, True, False, 1000)


def test_objective_is_a_training_diffusion():
    obj = create_objective("gaussian", timestep_respacing="", learn_sigma=False)
    assert isinstance(obj.diffusion, SpacedDiffusion) and obj.num_timesteps == 1000
    assert obj.model_var_type == ModelVarType.FIXED_LARGE
    for name in ("q_sample", "training_losses", "p_mean_variance", "p_sample", "ddim_sample",
                 "p_sample_loop", "ddim_sample_loop"):
        assert callable(getattr(obj, name))


def test_objective_loss_draws_t_then_noise_from_generator():
    obj = create_objective("gaussian", learn_sigma=False)
    x0 = torch.randn(4, 2, 3, 3, generator=seeded(0))
    model = lambda x, t: 0.5 * x  # noqa: E731
    g = seeded(7)
    t = torch.randint(0, 1000, (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    expected = obj.training_losses(model, x0, t, noise=noise)["loss"].mean()
    got = obj.loss(model, x0, generator=seeded(7))
    assert set(got) == {"loss", "mse"} and got["loss"].ndim == 0
    torch.testing.assert_close(got["loss"], expected)
    torch.testing.assert_close(obj.loss(model, x0, generator=seeded(7))["loss"], got["loss"])


def test_objective_loss_with_learned_sigma_reports_vb():
    obj = create_objective("gaussian")
    x0 = torch.randn(2, 2, 3, 3, generator=seeded(0))
    out = obj.loss(lambda x, t: torch.cat([x, torch.zeros_like(x)], 1), x0, generator=seeded(0))
    assert set(out) == {"loss", "mse", "vb"} and all(v.ndim == 0 for v in out.values())
    torch.testing.assert_close(out["loss"], out["mse"] + out["vb"])


def test_objective_sampling_diffusion_respaces_the_same_schedule():
    obj = create_objective("gaussian", learn_sigma=False)
    d10 = obj.sampling_diffusion(10)
    assert d10 is obj.sampling_diffusion(10)
    assert d10.timestep_map == sorted(space_timesteps(1000, "10"))
    assert obj.sampling_diffusion("ddim20").timestep_map == list(range(0, 1000, 50))
    assert obj.sampling_diffusion(None).num_timesteps == 1000
    np.testing.assert_allclose(d10.alphas_cumprod, hand_alphas_cumprod()[d10.timestep_map], rtol=1e-12)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_objective_sample_shape_and_determinism(sampler):
    obj = create_objective("gaussian", learn_sigma=False)
    noise = torch.randn(2, 2, 4, 4, generator=seeded(0))
    model = lambda x, t: 0.1 * x  # noqa: E731
    kw = dict(sampler=sampler, steps=8, eta=0.5 if sampler == "ddim" else 0.0)
    a = obj.sample(model, noise, generator=seeded(1), **kw)
    b = obj.sample(model, noise, generator=seeded(1), **kw)
    c = obj.sample(model, noise, generator=seeded(2), **kw)
    assert a.shape == noise.shape
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_objective_sample_rejects_unknown_sampler():
    obj = create_objective("gaussian", learn_sigma=False)
    with pytest.raises(ValueError, match="ddpm.*ddim"):
        obj.sample(lambda x, t: x, torch.zeros(1, 1, 2, 2), sampler="euler")


def test_objective_rejects_unknown_schedule_with_allowed_values():
    with pytest.raises(ConfigError, match="linear.*cosine"):
        create_objective("gaussian", noise_schedule="bogus")


def test_objective_rejects_two_parameterisations():
    with pytest.raises(ConfigError, match="predict_v"):
        create_objective("gaussian", predict_xstart=True, predict_v=True)
