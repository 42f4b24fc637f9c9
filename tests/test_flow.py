"""Tests of the "flow" objective: expected values come from the interpolant written out by hand and
from closed-form solutions of the sampling ODE, not from the objective's own helpers."""

from __future__ import annotations

import math

import pytest
import torch

from zoo.config import ConfigError
from zoo.diffusion import FlowConfig, FlowObjective
from zoo.registry import create_objective


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Recorder:
    """A velocity model that remembers its inputs and returns a fixed multiple of x."""

    def __init__(self, scale: float = 0.5):
        self.scale, self.calls = scale, []

    def __call__(self, x, t, **kwargs):
        self.calls.append((x.clone(), t.clone(), kwargs))
        return self.scale * x


# ----------------------------------------------------------------------------- config and registry


def test_registered_with_defaults():
    obj = create_objective("flow")
    assert isinstance(obj, FlowObjective) and obj.predicts_variance is False
    assert obj.config == FlowConfig(time_sampling="uniform", time_scale=1000.0, sampler="euler", steps=50)


@pytest.mark.parametrize("overrides, match", [
    ({"time_sampling": "lognormal"}, "uniform.*logit_normal"),
    ({"sampler": "rk4"}, "euler.*heun"),
    ({"steps": 0}, "steps"),
    ({"logit_std": 0.0}, "logit_std"),
    ({"time_scale": -1.0}, "time_scale"),
])
def test_config_rejects_bad_values(overrides, match):
    with pytest.raises(ConfigError, match=match):
        create_objective("flow", **overrides)


# ----------------------------------------------------------------------------- time sampling


def test_uniform_times_lie_in_unit_interval_with_mean_one_half():
    t = FlowObjective(FlowConfig()).sample_t(20000, generator=seeded(0))
    assert t.shape == (20000,) and t.dtype == torch.float32
    assert 0 <= t.min() and t.max() < 1
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)  # std of the mean ~ 0.002


def test_logit_normal_times_have_the_configured_logit_moments():
    obj = FlowObjective(FlowConfig(time_sampling="logit_normal", logit_mean=-0.5, logit_std=0.8))
    t = obj.sample_t(20000, generator=seeded(1)).double()
    assert 0 < t.min() and t.max() < 1
    logits = torch.log(t / (1 - t))
    assert logits.mean().item() == pytest.approx(-0.5, abs=0.03)
    assert logits.std().item() == pytest.approx(0.8, abs=0.03)


def test_time_sampling_is_reproducible_from_a_generator():
    obj = FlowObjective(FlowConfig(time_sampling="logit_normal"))
    torch.testing.assert_close(obj.sample_t(8, generator=seeded(3)), obj.sample_t(8, generator=seeded(3)))


# ----------------------------------------------------------------------------- loss


def test_loss_feeds_the_interpolant_and_regresses_on_eps_minus_x0():
    obj = create_objective("flow")
    x0 = torch.randn(4, 2, 3, 3, generator=seeded(0))
    model = Recorder(scale=0.5)
    out = obj.loss(model, x0, {"y": torch.arange(4)}, generator=seeded(7))

    g = seeded(7)  # the documented draw order: t, then eps
    t = torch.rand(4, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    (seen_x, seen_t, seen_kwargs), = model.calls
    torch.testing.assert_close(seen_x, x_t)
    torch.testing.assert_close(seen_t, t * 1000)
    assert torch.equal(seen_kwargs["y"], torch.arange(4))
    expected = ((0.5 * x_t - (eps - x0)) ** 2).mean()  # equal-sized examples: the mean of the per-example means
    assert set(out) == {"loss", "mse"} and out["loss"].ndim == 0
    torch.testing.assert_close(out["loss"], expected)
    torch.testing.assert_close(out["mse"], expected)


def test_loss_is_zero_for_the_exact_velocity():
    obj = create_objective("flow")
    x0 = torch.randn(3, 1, 4, 4, generator=seeded(0))
    g = seeded(5)
    torch.rand(3, generator=g)  # t comes first
    eps = torch.randn(x0.shape, generator=g)
    out = obj.loss(lambda x, t: eps - x0, x0, generator=seeded(5))
    assert out["loss"].item() == 0.0


def test_loss_rejects_a_learned_variance_output():
    obj = create_objective("flow")
    x0 = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="learn_sigma=False"):
        obj.loss(lambda x, t: torch.cat([x, x], 1), x0)


def test_loss_gradient_reaches_the_model():
    obj = create_objective("flow", time_sampling="logit_normal")
    net = torch.nn.Conv2d(2, 2, 1)
    out = obj.loss(lambda x, t: net(x), torch.randn(3, 2, 4, 4, generator=seeded(0)), generator=seeded(1))
    out["loss"].backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- sampling


def straight_field(target: torch.Tensor, time_scale: float = 1000.0):
    """Velocity of the straight paths x_t = (1 - t) target + t eps: v = (x_t - target) / t."""
    return lambda x, t: (x - target) / (t / time_scale).view(-1, 1, 1, 1)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_straight_paths_are_integrated_exactly(sampler):
    obj = create_objective("flow")
    target = torch.rand(2, 1, 3, 3, generator=seeded(0)) * 2 - 1
    noise = torch.randn(2, 1, 3, 3, generator=seeded(1))
    out = obj.sample(straight_field(target), noise, sampler=sampler, steps=3)
    torch.testing.assert_close(out, target, atol=1e-5, rtol=1e-5)


def test_euler_on_v_equals_x_shrinks_by_one_minus_h_per_step():
    obj = create_objective("flow")
    noise = torch.randn(2, 1, 2, 2, generator=seeded(0), dtype=torch.float64)
    out = obj.sample(lambda x, t: x, noise, sampler="euler", steps=4)
    torch.testing.assert_close(out, noise * (1 - 1 / 4) ** 4)


def test_heun_is_second_order_with_an_euler_last_step():
    obj = create_objective("flow")
    noise = torch.randn(2, 1, 2, 2, generator=seeded(0), dtype=torch.float64)
    out = obj.sample(lambda x, t: x, noise, sampler="heun", steps=4)
    h = 1 / 4
    torch.testing.assert_close(out, noise * (1 - h + h * h / 2) ** 3 * (1 - h))


def test_heun_is_closer_than_euler_to_the_exponential_solution():
    obj = create_objective("flow")
    noise = torch.randn(2, 1, 2, 2, generator=seeded(0), dtype=torch.float64)
    exact = noise * math.exp(-1)  # dx/dt = x run from t = 1 back to t = 0
    euler = obj.sample(lambda x, t: x, noise, sampler="euler", steps=10)
    heun = obj.sample(lambda x, t: x, noise, sampler="heun", steps=10)
    assert (heun - exact).abs().max() < 0.1 * (euler - exact).abs().max()


def test_model_sees_the_uniform_grid_in_network_time():
    obj = create_objective("flow", time_scale=100.0)
    model = Recorder(scale=0.0)
    obj.sample(model, torch.zeros(1, 1, 2, 2), sampler="euler", steps=4)
    assert [c[1].item() for c in model.calls] == pytest.approx([100.0, 75.0, 50.0, 25.0])


@pytest.mark.parametrize("sampler, steps, calls", [("euler", 5, 5), ("heun", 5, 9), ("heun", 1, 1)])
def test_function_evaluations_are_counted(sampler, steps, calls):
    obj = create_objective("flow")
    model = Recorder(scale=0.1)
    obj.sample(model, torch.zeros(1, 1, 2, 2), sampler=sampler, steps=steps)
    assert len(model.calls) == calls == obj.num_function_evals(sampler, steps)


def test_sampler_and_steps_default_to_the_config():
    obj = create_objective("flow", sampler="heun", steps=3)
    model = Recorder(scale=0.1)
    obj.sample(model, torch.zeros(1, 1, 2, 2))
    assert len(model.calls) == 5 == obj.num_function_evals()


def test_clip_denoised_steers_to_the_clipped_x0():
    obj = create_objective("flow")
    target = torch.full((1, 1, 2, 2), 3.0)  # outside [-1, 1]
    noise = torch.randn(1, 1, 2, 2, generator=seeded(0))
    unclipped = obj.sample(straight_field(target), noise, steps=4)
    clipped = obj.sample(straight_field(target), noise, steps=4, clip_denoised=True)
    torch.testing.assert_close(unclipped, target)
    torch.testing.assert_close(clipped, torch.ones_like(target))


def test_sampling_is_deterministic_and_ignores_the_generator():
    obj = create_objective("flow")
    noise = torch.randn(2, 1, 3, 3, generator=seeded(0))
    model = lambda x, t: torch.sin(x) * (t.view(-1, 1, 1, 1) / 1000)  # noqa: E731
    a = obj.sample(model, noise, sampler="heun", steps=6, generator=seeded(1))
    b = obj.sample(model, noise, sampler="heun", steps=6, generator=seeded(2))
    assert a.shape == noise.shape and a.dtype == noise.dtype
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, match", [
    ({"eta": 0.5}, "eta"),
    ({"temperature": 0.9}, "temperature"),
    ({"sampler": "ddim"}, "euler.*heun"),
    ({"steps": 0}, "steps"),
])
def test_sample_rejects_bad_arguments(kwargs, match):
    obj = create_objective("flow")
    with pytest.raises(ValueError, match=match):
        obj.sample(lambda x, t: x, torch.zeros(1, 1, 2, 2), **kwargs)
