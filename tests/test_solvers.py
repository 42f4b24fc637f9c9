"""The fast solvers (DPM-Solver++(2M), UniPC) against diffusers' schedulers on the same model and noise.

diffusers is a test dependency only: zoo's solvers are its own few lines on the shared Gaussian
backend, and these tests pin them to diffusers' ``DPMSolverMultistepScheduler`` and
``UniPCMultistepScheduler`` (default spacing, order 2, final sigma 0). Measured max difference of
the final samples, relative to |x| + 1: 8.5e-6 for an eps model on the linear schedule (whose
untrained samples reach |x| ~ 540), 4e-7 for a v model on the cosine schedule: float32 rounding.
"""

import numpy as np
import pytest
import torch

import zoo
from zoo.diffusion import GaussianConfig, GaussianObjective
from zoo.diffusion.solvers import solver_timesteps

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' own numpy-2 notice


def tiny_dit(learn_sigma=True):
    torch.manual_seed(0)
    model = zoo.create_model("dit-s/2", input_size=8, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                             num_classes=10, learn_sigma=learn_sigma, cfg_channels="all").eval()
    with torch.no_grad():  # leave the zero init so that the output depends on every weight
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def reference(scheduler_cls, objective, model, noise, y, steps, prediction_type, **options):
    betas = objective.original_betas.astype(np.float32)
    scheduler = scheduler_cls(num_train_timesteps=len(betas), trained_betas=betas, prediction_type=prediction_type,
                              solver_order=2, **options)
    scheduler.set_timesteps(steps)
    x = noise.clone()
    channels = noise.shape[1]
    for t in scheduler.timesteps:
        with torch.no_grad():
            out = model(x, torch.full((len(x),), int(t)), y)[:, :channels]  # the mean's output, as DiTPipeline
        x = scheduler.step(out, t, x).prev_sample
    return x


CASES = [
    ("dpm++2m", "DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++")),
    ("unipc", "UniPCMultistepScheduler", dict(solver_type="bh2")),
]


@pytest.mark.parametrize("sampler, scheduler, options", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("schedule, predict_v", [("linear", False), ("cosine", True)], ids=["eps-linear", "v-cosine"])
@pytest.mark.parametrize("steps", [5, 12])
def test_the_solver_matches_diffusers_on_a_dit(sampler, scheduler, options, schedule, predict_v, steps):
    objective = GaussianObjective(GaussianConfig(noise_schedule=schedule, predict_v=predict_v))
    model = tiny_dit()
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        ours = objective.sample(model.forward, noise, sampler=sampler, steps=steps, model_kwargs=dict(y=y))
    theirs = reference(getattr(diffusers, scheduler), objective, model, noise, y, steps,
                       "v_prediction" if predict_v else "epsilon", **options)
    assert ours.abs().max() > 0.1  # a real sample, not a degenerate one
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)  # an untrained DiT reaches |x| ~ 100s


@pytest.mark.parametrize("sampler", ["dpm++2m", "unipc"])
def test_a_model_that_knows_the_data_lands_on_it(sampler):
    # Data = a single point x*: the exact x0-prediction is x* everywhere, and the ODE's solution is x*.
    target = torch.linspace(-1, 1, 16).view(1, 1, 4, 4)
    objective = GaussianObjective(GaussianConfig(learn_sigma=False))
    ab = torch.from_numpy(np.cumprod(1 - objective.original_betas)).float()

    def eps_model(x, t):  # the eps that makes x0 = x*
        a, s = ab[t].sqrt().view(-1, 1, 1, 1), (1 - ab[t]).sqrt().view(-1, 1, 1, 1)
        return (x - a * target) / s

    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = objective.sample(eps_model, noise, sampler=sampler, steps=7)
    torch.testing.assert_close(out, target.expand_as(out), rtol=0, atol=1e-5)


def test_the_timesteps_are_diffusers_linspace_spacing():
    assert solver_timesteps(1000, 4) == [999, 749, 500, 250]
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000)
    sched.set_timesteps(10)
    assert solver_timesteps(1000, 10) == sched.timesteps.tolist()


def test_stochastic_options_are_refused_by_the_deterministic_solvers():
    objective = GaussianObjective(GaussianConfig(learn_sigma=False))
    with pytest.raises(ValueError, match="deterministic probability-flow ODE"):
        objective.sample(lambda x, t: x, torch.zeros(1, 1, 2, 2), sampler="unipc", steps=5, temperature=0.9)
    with pytest.raises(ValueError, match="positive integer"):
        objective.sample(lambda x, t: x, torch.zeros(1, 1, 2, 2), sampler="dpm++2m", steps="ddim5")


def test_mars_per_token_head_and_the_var_sr_refiner_sample_with_the_solvers():
    from tests.test_mar import tiny_mar

    model = tiny_mar().eval()
    labels = torch.tensor([1, 2])
    for sampler in ("dpm++2m", "unipc"):
        a = model.sample(labels, num_iter=2, num_sampling_steps="8", sampler=sampler,
                         generator=torch.Generator().manual_seed(0))
        b = model.sample(labels, num_iter=2, num_sampling_steps="8", sampler=sampler,
                         generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(a).all() and torch.equal(a, b)
    z = torch.randn(6, model.diffloss.net.cond_embed.in_features)
    tokens = model.diffloss.sample(z, sampler="unipc", num_sampling_steps=6, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (6, model.diffloss.in_channels)
    # An ODE solver adds no noise after the start: temperature scales the starting noise.
    cold = model.diffloss.sample(z, temperature=0.5, sampler="dpm++2m", num_sampling_steps=6,
                                 generator=torch.Generator().manual_seed(0))
    start = torch.randn(6, model.diffloss.in_channels, generator=torch.Generator().manual_seed(0)) * 0.5
    by_hand = model.diffloss.objective.sample(model.diffloss.net.forward, start, sampler="dpm++2m", steps=6,
                                              model_kwargs=dict(c=z))
    torch.testing.assert_close(cold, by_hand)


def test_zoo_sample_help_lists_the_solvers(capsys):
    from zoo.cli.sample import build_parser

    help_text = build_parser().format_help()
    assert "dpm++2m" in help_text and "unipc" in help_text
