"""Tests of the "meanflow" objective: the JVP against finite differences, the target and weights
against hand-written formulas, sampling against average velocities known in closed form."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from zoo.config import ConfigError
from zoo.diffusion import MeanFlowConfig, MeanFlowObjective
from zoo.diffusion.meanflow import Normalizer, select_condition
from zoo.registry import create_model, create_objective


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def col(values: torch.Tensor) -> torch.Tensor:
    """[N] -> [N, 1, 1, 1]."""
    return values.view(-1, 1, 1, 1)


class TinyMeanFlowNet(nn.Module):
    """A smooth u(z, t, r | y): an MLP on the flattened z and both times, plus a label embedding."""

    def __init__(self, shape=(2, 3, 3), hidden: int = 16, num_classes: int = 4):
        super().__init__()
        dim = math.prod(shape)
        self.inp = nn.Linear(dim + 2, hidden)
        self.label = nn.Embedding(num_classes + 1, hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, z, t, r, y=None):
        h = self.inp(torch.cat([z.flatten(1), t[:, None], r[:, None]], dim=1))
        if y is not None:
            h = h + self.label(y)
        return self.out(torch.tanh(h)).view_as(z)


class LinearField(nn.Module):
    """u = a z + b t + c r with scalar parameters, so du/dt along (v, 1, 0) is a v + b."""

    def __init__(self, a=0.7, b=-0.3, c=0.4):
        super().__init__()
        self.a, self.b, self.c = (nn.Parameter(torch.tensor(v, dtype=torch.float64)) for v in (a, b, c))

    def forward(self, z, t, r, **kwargs):
        return self.a * z + self.b * col(t) + self.c * col(r)


def batch(n=4, shape=(2, 3, 3), seed=0):
    """A double-precision (z, t, r, v) with r < t everywhere."""
    g = seeded(seed)
    z = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    v = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.5 + 0.5
    r = t * torch.rand(n, generator=g, dtype=torch.float64)
    return z, t, r, v


def objective(**overrides) -> MeanFlowObjective:
    return create_objective("meanflow", **overrides)


# ----------------------------------------------------------------------------- config and normaliser


def test_registered_with_defaults():
    obj = create_objective("meanflow")
    assert isinstance(obj, MeanFlowObjective) and obj.predicts_variance is False
    assert obj.config == MeanFlowConfig(time_sampling="logit_normal", logit_mean=-0.4, logit_std=1.0,
                                        equal_fraction=0.75, adaptive_gamma=0.0, adaptive_c=1e-3,
                                        cfg_drop_prob=0.1, omega=1.0, omega_max=0.0, normalizer="minmax",
                                        jvp="forward", steps=1)


@pytest.mark.parametrize("overrides, match", [
    ({"normalizer": "mean_std"}, "norm_mean.*norm_std"),
    ({"normalizer": "mean_std", "norm_mean": [0.0, 0.0], "norm_std": [1.0]}, "one value per channel"),
    ({"normalizer": "mean_std", "norm_mean": [0.0], "norm_std": [0.0]}, "norm_std"),
    ({"norm_mean": [0.5]}, "mean_std only"),
    ({"equal_fraction": 1.5}, "equal_fraction"),
    ({"equal_fraction": -0.1}, "equal_fraction"),
    ({"omega": 2.0, "omega_max": 1.5}, "omega_max"),
    ({"adaptive_gamma": 1.5}, "adaptive_gamma"),
    ({"adaptive_c": 0.0}, "adaptive_c"),
    ({"cfg_drop_prob": 1.2}, "cfg_drop_prob"),
    ({"jvp": "reverse"}, "forward.*double_backward"),
    ({"time_sampling": "beta"}, "uniform.*logit_normal"),
    ({"steps": 0}, "steps"),
    ({"kappa": 1.0}, r"kappa: must lie in \[0, 1\)"),
    ({"kappa": -0.1}, "kappa"),
    ({"guidance_interval": [0.8, 0.2]}, "guidance_interval"),
    ({"guidance_interval": [0.0, 1.5]}, "guidance_interval"),
    ({"guidance_interval": [0.5]}, "guidance_interval"),
    ({"prediction": "v"}, r"prediction: 'v' is not allowed; choose one of \['u', 'x'\]"),
    ({"x_pred_t_min": 0.0}, "x_pred_t_min"),
])
def test_config_rejects_bad_values(overrides, match):
    with pytest.raises(ConfigError, match=match):
        create_objective("meanflow", **overrides)


def test_mean_std_normaliser_standardises_per_channel_and_round_trips():
    obj = objective(normalizer="mean_std", norm_mean=[0.5, -1.0], norm_std=[2.0, 0.25])
    x = torch.randn(3, 2, 4, 4, generator=seeded(0), dtype=torch.float64)
    normed = obj.norm(x)
    torch.testing.assert_close(normed[:, 0], (x[:, 0] - 0.5) / 2.0)
    torch.testing.assert_close(normed[:, 1], (x[:, 1] + 1.0) / 0.25)
    torch.testing.assert_close(obj.unnorm(normed), x)


def test_minmax_normaliser_is_identity_in_and_clamps_out():
    obj = objective()
    x = torch.tensor([-3.0, -0.5, 0.0, 0.9, 2.0]).view(1, 1, 1, 5)
    assert torch.equal(obj.norm(x), x)
    assert torch.equal(obj.unnorm(x), torch.tensor([-1.0, -0.5, 0.0, 0.9, 1.0]).view(1, 1, 1, 5))


def test_normaliser_names_a_channel_mismatch():
    with pytest.raises(ValueError, match="2 channels.*3"):
        Normalizer("mean_std", (0.0, 0.0), (1.0, 1.0)).norm(torch.zeros(1, 3, 2, 2))


# ----------------------------------------------------------------------------- random draws


def test_t_and_r_are_the_ordered_pair_with_r_equal_t_on_the_configured_share():
    obj = objective(time_sampling="uniform", equal_fraction=0.75)
    t, r = obj.sample_t_r(8, generator=seeded(3))
    g = seeded(3)  # by hand: two uniforms per example, then the permutation picking r = t
    pairs = torch.rand(8, 2, generator=g)
    equal = torch.randperm(8, generator=g)[:6]
    expected_r = pairs.min(1).values.clone()
    expected_r[equal] = pairs.max(1).values[equal]
    torch.testing.assert_close(t, pairs.max(1).values)
    torch.testing.assert_close(r, expected_r)
    assert (r <= t).all() and int((r == t).sum()) == 6


@pytest.mark.parametrize("fraction, equal", [(0.0, 0), (1.0, 10), (0.25, 3)])
def test_equal_fraction_sets_how_many_examples_have_r_equal_t(fraction, equal):
    t, r = objective(equal_fraction=fraction).sample_t_r(10, generator=seeded(0))
    assert int((r == t).sum()) == equal


def test_logit_normal_times_follow_the_max_and_min_of_two_draws():
    obj = objective(equal_fraction=0.0, logit_mean=-0.4, logit_std=1.0)
    t, r = obj.sample_t_r(20000, generator=seeded(1))
    assert 0 < r.min() and t.max() < 1
    # E[max(X1, X2)] = mu + sigma / sqrt(pi) for iid normals: check it on the logits.
    logit_t = torch.log(t.double() / (1 - t.double()))
    logit_r = torch.log(r.double() / (1 - r.double()))
    assert logit_t.mean().item() == pytest.approx(-0.4 + 1 / math.sqrt(math.pi), abs=0.03)
    assert logit_r.mean().item() == pytest.approx(-0.4 - 1 / math.sqrt(math.pi), abs=0.03)


def test_omega_is_fixed_or_drawn_from_its_range():
    assert torch.equal(objective(omega=2.5).sample_omega(4), torch.full((4,), 2.5))
    omega = objective(omega=1.0, omega_max=3.0).sample_omega(5000, generator=seeded(0))
    assert 1.0 <= omega.min() and omega.max() <= 3.0
    assert omega.mean().item() == pytest.approx(2.0, abs=0.05)


def test_select_condition_swaps_whole_examples_of_any_shape():
    dropped = torch.tensor([True, False, True])
    cond = {"y": torch.tensor([1, 2, 3]), "ctx": torch.ones(3, 2, 4), "scale": 0.5}
    uncond = {"y": torch.full((3,), 9), "ctx": torch.zeros(3, 2, 4)}
    out = select_condition(dropped, cond, uncond)
    assert out["y"].tolist() == [9, 2, 9]
    assert out["ctx"][:, 0, 0].tolist() == [0.0, 1.0, 0.0]
    assert out["scale"] == 0.5


def test_select_condition_names_a_missing_key():
    with pytest.raises(ValueError, match="'y'"):
        select_condition(torch.tensor([True]), {}, {"y": torch.zeros(1)})


# ----------------------------------------------------------------------------- target and JVP


@pytest.mark.parametrize("jvp", ["forward", "double_backward"])
def test_jvp_matches_a_central_difference_along_v_one_zero(jvp):
    torch.manual_seed(0)
    net = TinyMeanFlowNet().double()
    z, t, r, v = batch()
    y = torch.tensor([0, 1, 2, 3])
    u, u_tgt = objective(jvp=jvp).prediction_and_target(net, z, t, r, v, {"y": y})
    h = 1e-6
    with torch.no_grad():
        dudt = (net(z + h * v, t + h, r, y) - net(z - h * v, t - h, r, y)) / (2 * h)
        torch.testing.assert_close(u, net(z, t, r, y))
    torch.testing.assert_close(u_tgt, v - col(t - r) * dudt, atol=1e-8, rtol=1e-7)


def test_forward_and_double_backward_jvp_agree_through_a_dit_with_attention():
    torch.manual_seed(0)
    dit = create_model("dit-s/2", input_size=8, in_channels=2, hidden_size=32, depth=1, num_heads=2,
                       num_classes=4, learn_sigma=False).double().eval()
    with torch.no_grad():  # DiT starts with zeroed output layers (adaLN-Zero): give it a non-trivial function
        for p in dit.parameters():
            p.normal_(0.0, 0.2)
    model = lambda z, t, r, y: dit(z, 1000 * t + 0.5 * r, y)  # noqa: E731  (r enters, so its zero tangent matters)
    z, t, r, v = batch(n=2, shape=(2, 8, 8))
    y = torch.tensor([1, 3])
    u_fwd, tgt_fwd = objective(jvp="forward").prediction_and_target(model, z, t, r, v, {"y": y})
    u_dbl, tgt_dbl = objective(jvp="double_backward").prediction_and_target(model, z, t, r, v, {"y": y})
    torch.testing.assert_close(u_fwd, u_dbl)
    torch.testing.assert_close(tgt_fwd, tgt_dbl)
    assert not torch.allclose(tgt_fwd, v)  # the JVP term is not negligible


def test_target_is_the_flow_matching_velocity_when_r_equals_t():
    torch.manual_seed(0)
    net = TinyMeanFlowNet().double()
    z, t, _, v = batch()
    u, u_tgt = objective().prediction_and_target(net, z, t, t.clone(), v)
    assert torch.equal(u_tgt, v)
    assert u.requires_grad and not u_tgt.requires_grad


def test_target_of_a_linear_field_matches_its_analytic_derivative():
    field = LinearField()
    z, t, r, v = batch()
    _, u_tgt = objective().prediction_and_target(field, z, t, r, v)
    with torch.no_grad():
        expected = v - col(t - r) * (field.a * v + field.b)
    torch.testing.assert_close(u_tgt, expected)


# ----------------------------------------------------------------------------- loss


def hand_draws(obj, x, seed):
    """(t, r, eps, z, v) as the loss draws them from ``seeded(seed)``."""
    g = seeded(seed)
    t, r = obj.sample_t_r(x.shape[0], generator=g)
    t, r = t.to(x.dtype), r.to(x.dtype)
    eps = torch.randn(x.shape, generator=g, dtype=x.dtype)
    z = (1 - col(t)) * x + col(t) * eps
    return t, r, eps, z, eps - x, g


def test_adaptive_weight_is_one_over_error_plus_c_to_the_power_one_minus_gamma():
    delta_sq = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    weight = objective(adaptive_gamma=0.25, adaptive_c=0.01).adaptive_weight(delta_sq)
    torch.testing.assert_close(weight, torch.tensor([0.01 ** -0.75, 0.51 ** -0.75, 2.01 ** -0.75],
                                                    dtype=torch.float64))
    assert not weight.requires_grad


def test_loss_reports_the_weighted_loss_raw_mse_and_mean_weight():
    obj = objective(adaptive_gamma=0.0, adaptive_c=1e-3, equal_fraction=0.5)
    field = LinearField()
    x = torch.rand(6, 2, 3, 3, generator=seeded(0), dtype=torch.float64) * 2 - 1
    out = obj.loss(field, x, generator=seeded(4))
    t, r, eps, z, v, _ = hand_draws(obj, x, 4)
    with torch.no_grad():
        u_tgt = v - col(t - r) * (field.a * v + field.b)
        delta_sq = ((field(z, t, r) - u_tgt) ** 2).mean(dim=(1, 2, 3))
    weight = 1 / (delta_sq + 1e-3)
    assert set(out) == {"loss", "mse", "weight", "r_neq_t"}
    torch.testing.assert_close(out["mse"], delta_sq.mean())
    torch.testing.assert_close(out["weight"], weight.mean())
    torch.testing.assert_close(out["loss"], (weight * delta_sq).mean())
    assert out["r_neq_t"].item() == pytest.approx(0.5)


def test_loss_with_gamma_one_is_the_plain_mse():
    obj = objective(adaptive_gamma=1.0)
    out = obj.loss(LinearField(), torch.rand(4, 2, 3, 3, generator=seeded(0), dtype=torch.float64),
                   generator=seeded(1))
    assert out["weight"].item() == 1.0
    torch.testing.assert_close(out["loss"], out["mse"])


@pytest.mark.parametrize("jvp", ["forward", "double_backward"])
def test_gradient_flows_only_through_the_prediction(jvp):
    obj = objective(adaptive_gamma=0.5, adaptive_c=1e-2, equal_fraction=0.25, jvp=jvp)
    x = torch.rand(6, 2, 3, 3, generator=seeded(0), dtype=torch.float64) * 2 - 1
    field = LinearField()
    obj.loss(field, x, generator=seeded(2))["loss"].backward()

    hand = LinearField()
    t, r, eps, z, v, _ = hand_draws(obj, x, 2)
    with torch.no_grad():  # sg(u_tgt) from the analytic du/dt = a v + b
        u_tgt = v - col(t - r) * (hand.a * v + hand.b)
    delta_sq = ((hand(z, t, r) - u_tgt) ** 2).mean(dim=(1, 2, 3))
    weight = 1 / (delta_sq.detach() + 1e-2) ** 0.5
    (weight * delta_sq).mean().backward()
    for got, expected in zip(field.parameters(), hand.parameters()):
        torch.testing.assert_close(got.grad, expected.grad)


def test_single_pass_forward_jvp_gives_the_two_pass_parameter_gradients():
    torch.manual_seed(0)
    net = TinyMeanFlowNet().double()
    x = torch.rand(6, 2, 3, 3, generator=seeded(0), dtype=torch.float64) * 2 - 1
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    grads = {}
    for jvp in ("forward", "double_backward"):
        net.zero_grad()
        objective(jvp=jvp, equal_fraction=0.25, adaptive_gamma=0.5).loss(net, x, {"y": y}, generator=seeded(5))[
            "loss"].backward()
        grads[jvp] = [p.grad.clone() for p in net.parameters()]
    for a, b in zip(grads["forward"], grads["double_backward"]):
        torch.testing.assert_close(a, b)


class LabelledField(nn.Module):
    """u = z (y + 1) + t + 2 r, recording the labels of every call."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, z, t, r, y):
        self.seen.append(y.clone())
        return z * col(y.to(z.dtype) + 1) + col(t) + 2 * col(r)


def test_guided_velocity_folds_the_unconditional_average_velocity_at_r_equal_t():
    z, t, _, v = batch()
    omega = torch.full((4,), 2.0, dtype=torch.float64)
    dropped = torch.tensor([False, True, False, True])
    model = LabelledField()
    guided = MeanFlowObjective.guided_velocity(model, z, t, v, omega, {"y": torch.full((4,), 9)},
                                               model_kwargs={"y": torch.tensor([0, 1, 2, 3])}, dropped=dropped)
    u_uncond = z * 10 + col(t) + 2 * col(t)
    expected = 2.0 * v + (1 - 2.0) * u_uncond
    torch.testing.assert_close(guided[~dropped], expected[~dropped])
    torch.testing.assert_close(guided[dropped], v[dropped])
    assert model.seen[0].tolist() == [9, 9, 9, 9]


def test_kappa_mixes_in_the_conditional_average_velocity_at_r_equal_t():
    z, t, _, v = batch()
    omega = torch.full((4,), 0.75, dtype=torch.float64)
    kappa = torch.tensor([0.5, 0.5, 0.0, 0.5], dtype=torch.float64)
    model = LabelledField()
    labels = torch.tensor([0, 1, 2, 3])
    guided = MeanFlowObjective.guided_velocity(model, z, t, v, omega, {"y": torch.full((4,), 9)},
                                               model_kwargs={"y": labels}, kappa=kappa)
    u_uncond = z * 10 + 3 * col(t)
    u_cond = z * col(labels.double() + 1) + 3 * col(t)
    expected = 0.75 * v + col(kappa) * u_cond + (1 - 0.75 - col(kappa)) * u_uncond
    torch.testing.assert_close(guided, expected)
    assert [seen.tolist() for seen in model.seen] == [[9, 9, 9, 9], [0, 1, 2, 3]]


def test_guidance_applies_only_inside_its_interval_of_t():
    obj = objective(omega=3.0, kappa=0.5, guidance_interval=[0.0, 0.5], cfg_drop_prob=0.0, equal_fraction=1.0,
                    adaptive_gamma=1.0, time_sampling="uniform")
    x = torch.rand(64, 2, 3, 3, generator=seeded(0), dtype=torch.float64) * 2 - 1
    y = torch.arange(64) % 4
    out = obj.loss(LabelledField(), x, {"y": y}, uncond_kwargs={"y": torch.full((64,), 9)}, generator=seeded(6))
    t, r, eps, z, v, _ = hand_draws(obj, x, 6)
    inside = col((t <= 0.5).double())
    assert 0 < inside.sum() < 64
    u_uncond = z * 10 + 3 * col(t)
    u = z * col(y.double() + 1) + 3 * col(t)
    guided = 3.0 * v + 0.5 * u + (1 - 3.0 - 0.5) * u_uncond
    target = inside * guided + (1 - inside) * v
    torch.testing.assert_close(out["mse"], ((u - target) ** 2).mean())


def test_loss_regresses_on_the_guided_velocity_when_given_a_null_condition():
    obj = objective(omega=3.0, cfg_drop_prob=0.0, equal_fraction=1.0, adaptive_gamma=1.0)
    x = torch.rand(4, 2, 3, 3, generator=seeded(0), dtype=torch.float64) * 2 - 1
    y = torch.tensor([0, 1, 2, 3])
    out = obj.loss(LabelledField(), x, {"y": y}, uncond_kwargs={"y": torch.full((4,), 9)}, generator=seeded(6))
    t, r, eps, z, v, _ = hand_draws(obj, x, 6)
    guided = 3.0 * v - 2.0 * (z * 10 + 3 * col(t))  # r = t: the target is the guided velocity itself
    u = z * col(y.double() + 1) + 3 * col(t)
    torch.testing.assert_close(out["mse"], ((u - guided) ** 2).mean())


def test_dropped_examples_see_the_null_condition_and_keep_the_plain_velocity():
    obj = objective(omega=3.0, cfg_drop_prob=1.0, equal_fraction=1.0, adaptive_gamma=1.0)
    x = torch.rand(4, 2, 3, 3, generator=seeded(0), dtype=torch.float64) * 2 - 1
    model = LabelledField()
    out = obj.loss(model, x, {"y": torch.tensor([0, 1, 2, 3])}, uncond_kwargs={"y": torch.full((4,), 9)},
                   generator=seeded(6))
    t, r, eps, z, v, _ = hand_draws(obj, x, 6)
    assert all(seen.tolist() == [9, 9, 9, 9] for seen in model.seen)
    torch.testing.assert_close(out["mse"], ((z * 10 + 3 * col(t) - v) ** 2).mean())


def test_without_a_null_condition_labels_are_kept_and_no_guidance_is_applied():
    obj = objective(omega=3.0, cfg_drop_prob=1.0, equal_fraction=1.0, adaptive_gamma=1.0)
    x = torch.rand(4, 2, 3, 3, generator=seeded(0), dtype=torch.float64) * 2 - 1
    model = LabelledField()
    y = torch.tensor([0, 1, 2, 3])
    out = obj.loss(model, x, {"y": y}, generator=seeded(6))
    t, r, eps, z, v, _ = hand_draws(obj, x, 6)
    # r = t everywhere: no JVP is needed, one pass for u with the labels as given
    assert len(model.seen) == 1 and torch.equal(model.seen[0], y)
    torch.testing.assert_close(out["mse"], ((z * col(y.double() + 1) + 3 * col(t) - v) ** 2).mean())


# ----------------------------------------------------------------------------- sampling


def exact_average_velocity(z, t, r):
    """Average velocity of dz/ds = z over [r, t]: z(r) = z(t) e^{r - t}, so u = z (1 - e^{-(t - r)}) / (t - r)."""
    gap = col(t - r)
    return z * (1 - torch.exp(-gap)) / gap


def test_one_step_sample_is_noise_minus_u_at_t1_r0():
    obj = objective()
    noise = torch.randn(3, 2, 3, 3, generator=seeded(0))
    seen = []

    def model(z, t, r, y):
        seen.append((t.tolist(), r.tolist()))
        return 0.3 * z + col(y.float())

    y = torch.tensor([0, 1, 2])
    out = obj.sample(model, noise, model_kwargs={"y": y})
    assert out.shape == noise.shape
    assert seen == [([1.0] * 3, [0.0] * 3)]
    torch.testing.assert_close(out, (noise - (0.3 * noise + col(y.float()))).clamp(-1, 1))
    assert torch.equal(obj.sample(model, noise, model_kwargs={"y": y}), out)


def test_x_prediction_reads_the_output_as_an_image_and_divides_by_t_floored():
    obj = objective(prediction="x", x_pred_t_min=0.1)
    z = torch.randn(3, 2, 3, 3, generator=seeded(0), dtype=torch.float64)
    t = torch.tensor([0.9, 0.3, 0.02], dtype=torch.float64)
    r = torch.tensor([0.1, 0.3, 0.0], dtype=torch.float64)

    def image_net(z_, t_, r_, y):
        return 0.5 * z_ + col(t_ - r_) + col(y.double())

    y = torch.tensor([0, 1, 2])
    u = obj.average_velocity(image_net)(z, t, r, y=y)
    expected = (z - image_net(z, t, r, y)) / col(torch.tensor([0.9, 0.3, 0.1], dtype=torch.float64))
    torch.testing.assert_close(u, expected)
    assert objective().average_velocity(image_net) is image_net


def test_x_prediction_one_step_sample_is_the_networks_image():
    obj = objective(prediction="x")
    noise = torch.randn(3, 2, 3, 3, generator=seeded(0))

    def image_net(z, t, r, y):
        return 0.3 * z + col(y.float()) - 1

    y = torch.tensor([0, 1, 2])
    torch.testing.assert_close(obj.sample(image_net, noise, model_kwargs={"y": y}),
                               image_net(noise, None, None, y).clamp(-1, 1))


def test_x_prediction_loss_is_the_u_loss_of_the_converted_network():
    x = torch.rand(6, 2, 3, 3, generator=seeded(0), dtype=torch.float64) * 2 - 1
    net = TinyMeanFlowNet().double()
    obj_x = objective(prediction="x", equal_fraction=0.5, omega=1.5, kappa=0.3)
    obj_u = objective(equal_fraction=0.5, omega=1.5, kappa=0.3)
    kwargs = {"y": torch.tensor([0, 1, 2, 3, 0, 1])}
    uncond = {"y": torch.full((6,), 4)}
    out_x = obj_x.loss(net, x, kwargs, uncond_kwargs=uncond, generator=seeded(3))
    out_u = obj_u.loss(obj_x.average_velocity(net), x, kwargs, uncond_kwargs=uncond, generator=seeded(3))
    for key in ("loss", "mse", "weight"):
        torch.testing.assert_close(out_x[key], out_u[key])


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_k_step_sampling_with_the_exact_average_velocity_reaches_the_ode_solution(steps):
    obj = objective(normalizer="mean_std", norm_mean=[0.5], norm_std=[2.0])
    noise = torch.randn(2, 1, 3, 3, generator=seeded(0), dtype=torch.float64)
    out = obj.sample(exact_average_velocity, noise, steps=steps)
    torch.testing.assert_close(out, noise * math.exp(-1) * 2.0 + 0.5)


def test_k_step_sampling_walks_the_uniform_grid():
    obj = objective(steps=4)
    intervals = []

    def model(z, t, r):
        intervals.extend([t[0].item(), r[0].item()])
        return torch.zeros_like(z)

    obj.sample(model, torch.zeros(1, 1, 2, 2))
    assert intervals == pytest.approx([1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25, 0.0])  # (t, r) per step


def test_clip_denoised_clamps_latent_samples():
    obj = objective(normalizer="mean_std", norm_mean=[0.0], norm_std=[1.0])
    noise = torch.full((1, 1, 2, 2), 3.0)
    assert obj.sample(lambda z, t, r: torch.zeros_like(z), noise).max().item() == 3.0
    assert obj.sample(lambda z, t, r: torch.zeros_like(z), noise, clip_denoised=True).max().item() == 1.0


@pytest.mark.parametrize("kwargs, match", [
    ({"sampler": "euler"}, "meanflow"),
    ({"eta": 1.0}, "eta"),
    ({"temperature": 0.5}, "temperature"),
    ({"steps": 0}, "steps"),
])
def test_sample_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        objective().sample(lambda z, t, r: z, torch.zeros(1, 1, 2, 2), **kwargs)


def test_sample_accepts_the_meanflow_sampler_name():
    noise = torch.zeros(1, 1, 2, 2)
    out = objective().sample(lambda z, t, r: z - 0.5, noise, sampler="meanflow")
    torch.testing.assert_close(out, torch.full_like(noise, 0.5))


def test_the_jvp_runs_only_on_examples_with_r_not_t_and_matches_the_full_batch_jvp():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()
    calls = []

    def model(z, t, r, y):
        calls.append(len(z))
        flat = torch.cat([z.flatten(1), t[:, None], r[:, None] * y[:, None].double()], dim=1)
        return net(flat).view_as(z)

    obj = objective()
    z = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    v = torch.randn_like(z)
    t = torch.tensor([0.9, 0.5, 0.7, 0.3], dtype=torch.float64)
    r = torch.tensor([0.2, 0.5, 0.1, 0.3], dtype=torch.float64)  # r != t for examples 0 and 2
    y = torch.tensor([1, 2, 3, 4])
    u, u_tgt = obj.prediction_and_target(model, z, t, r, v, {"y": y})
    assert calls[0] == 2  # the JVP saw only the two examples with r != t
    _, dudt = torch.func.jvp(lambda z_, t_, r_: model(z_, t_, r_, y), (z, t, r),
                             (v, torch.ones_like(t), torch.zeros_like(r)))
    expected = v - col(t - r) * dudt
    torch.testing.assert_close(u_tgt, expected)
    torch.testing.assert_close(u_tgt[[1, 3]], v[[1, 3]])
