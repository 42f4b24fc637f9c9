"""MFDiT (MeanFlow's DiT) and the flow objective inside DiT recipes."""

import copy

import pytest
import torch

import zoo
from zoo.config import ConfigError
from zoo.recipe import recipe_from_dict

TINY = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)

# The seed implementation's parameter names (haidog-yaqub/MeanFlow models/dit.py, forward(x, t, r, y)).
SEED_KEYS_OUTSIDE_BLOCKS = {
    "pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
    "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
    "r_embedder.mlp.0.weight", "r_embedder.mlp.0.bias", "r_embedder.mlp.2.weight", "r_embedder.mlp.2.bias",
    "y_embedder.embedding.weight", "final_layer.norm_final.g", "final_layer.linear.weight",
    "final_layer.linear.bias", "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
}
SEED_BLOCK_KEYS = {
    "norm1.g", "attn.qkv.weight", "attn.qkv.bias", "attn.q_norm.g", "attn.k_norm.g", "attn.proj.weight",
    "attn.proj.bias", "norm2.g", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    "adaLN_modulation.1.weight", "adaLN_modulation.1.bias",
}


def randomized(model, scale=0.05):
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def test_state_dict_has_exactly_the_seed_parameter_names():
    model = zoo.create_model("mfdit-s/2", **TINY)
    expected = SEED_KEYS_OUTSIDE_BLOCKS | {f"blocks.{i}.{k}" for i in range(2) for k in SEED_BLOCK_KEYS}
    assert set(model.state_dict()) == expected
    assert model.y_embedder.table.num_embeddings == 11  # the null class is always there
    assert model.pos_embed.requires_grad  # trainable, initialised to the sin-cos table


def test_registered_sizes_follow_dit():
    from zoo.registry import get_entry

    cfg = get_entry("generator", "mfdit-b/2").make_config()
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (12, 768, 12, 2)
    assert zoo.list_models("mfdit-*") == ["mfdit-b/2", "mfdit-l/2", "mfdit-s/2", "mfdit-xl/2"]


def test_forward_depends_on_both_times_and_starts_at_zero():
    model = zoo.create_model("mfdit-s/2", **TINY).eval()
    x = torch.randn(2, 1, 8, 8)
    y = torch.tensor([1, 10])
    assert torch.count_nonzero(model(x, torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.2]), y)) == 0  # adaLN-Zero
    model = randomized(model)
    t = torch.tensor([0.9, 0.9])
    a = model(x, t, torch.tensor([0.1, 0.1]), y)
    b = model(x, t, torch.tensor([0.5, 0.5]), y)
    c = model(x, torch.tensor([0.7, 0.7]), torch.tensor([0.1, 0.1]), y)
    assert a.shape == (2, 1, 8, 8) and not torch.allclose(a, b) and not torch.allclose(a, c)


def test_final_layer_applies_the_seeds_swapped_modulation():
    from zoo.generators.dit import FinalLayer

    layer = randomized(FinalLayer(8, 1, 2, norm="rmsnorm", swap_shift_scale=True))
    x, c = torch.randn(2, 3, 8), torch.randn(2, 8)
    shift, scale = layer.adaLN_modulation(c).chunk(2, dim=1)
    normed = layer.norm_final(x)
    expected = layer.linear(normed * (1 + shift.unsqueeze(1)) + scale.unsqueeze(1))
    torch.testing.assert_close(layer(x, c), expected)


def test_scaled_rmsnorm_is_unit_rms_times_gain():
    from zoo.nn import ScaledRMSNorm

    norm = ScaledRMSNorm(16)
    with torch.no_grad():
        norm.g.fill_(2.0)
    out = norm(torch.randn(4, 16) * 7)
    torch.testing.assert_close(out.pow(2).mean(-1).sqrt(), torch.full((4,), 2.0))


def test_one_step_sampling_is_noise_minus_u_and_deterministic():
    model = randomized(zoo.create_model("mfdit-s/2", **TINY))
    labels = torch.tensor([2, 5])
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = model.sample(labels, steps=1, noise=noise)
    expected = (noise - model(noise, torch.ones(2), torch.zeros(2), labels)).clamp(-1, 1)
    torch.testing.assert_close(out, expected)
    a = model.sample(labels, generator=torch.Generator().manual_seed(1))
    b = model.sample(labels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_meanflow_loss_backpropagates_through_the_generator():
    model = randomized(zoo.create_model("mfdit-s/2", **TINY)).train()
    terms = model.loss(torch.randn(4, 1, 8, 8).clamp(-1, 1), torch.tensor([0, 1, 2, 3]))
    assert {"loss", "mse"} <= set(terms)
    terms["loss"].backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def meanflow_recipe(tiny_recipe_dict):
    raw = copy.deepcopy(tiny_recipe_dict)
    raw["model"] = {"name": "mfdit-s/2", **TINY}
    raw["objective"] = {"name": "meanflow", "omega": 2.0}
    raw["sample"] = {"steps": 1, "num": 10, "batch_size": 10}
    return raw


def test_recipe_refuses_meanflow_with_a_generator_that_has_no_r_input(tiny_recipe_dict):
    raw = meanflow_recipe(tiny_recipe_dict)
    raw["model"] = tiny_recipe_dict["model"]
    with pytest.raises(ConfigError, match=r"objective\.name: 'meanflow' does not work with generator 'dit-s/2'; "
                                          r"allowed: gaussian, flow"):
        recipe_from_dict(raw, "r.yaml")


def test_recipe_refuses_gaussian_with_mfdit(tiny_recipe_dict):
    raw = meanflow_recipe(tiny_recipe_dict)
    raw["objective"] = {"name": "gaussian", "learn_sigma": False}
    with pytest.raises(ConfigError, match="allowed: meanflow"):
        recipe_from_dict(raw, "r.yaml")


def test_recipe_refuses_flow_with_learned_sigma_and_a_diffusion_sampler(tiny_recipe_dict):
    raw = copy.deepcopy(tiny_recipe_dict)
    raw["objective"] = {"name": "flow"}
    raw["sample"]["sampler"] = "euler"
    with pytest.raises(ConfigError, match=r"model\.learn_sigma: the 'flow' objective predicts no variance"):
        recipe_from_dict(raw, "r.yaml")
    raw["model"]["learn_sigma"] = False
    raw["sample"]["sampler"] = "ddpm"
    with pytest.raises(ConfigError, match=r"sample\.sampler: 'ddpm' does not work with objective 'flow'; "
                                          r"allowed: euler, heun"):
        recipe_from_dict(raw, "r.yaml")


def test_meanflow_and_flow_recipes_train_and_sample_end_to_end(tiny_recipe_dict, tmp_path):
    import json

    from zoo.hub.model_dir import load_model_dir
    from zoo.train import Trainer

    flow = copy.deepcopy(tiny_recipe_dict)
    flow["model"]["learn_sigma"] = False
    flow["objective"] = {"name": "flow", "time_sampling": "logit_normal"}
    flow["sample"].update(sampler="heun", steps=3)
    for name, raw in (("meanflow", meanflow_recipe(tiny_recipe_dict)), ("flow", flow)):
        run = tmp_path / name
        Trainer(recipe_from_dict(raw, name), run, progress=False, cpu=True).fit()
        logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        assert "mse" in logged and logged["step"] == 6
        pipe = load_model_dir(run)
        images = pipe.generate(torch.arange(4), seed=0)
        assert images.shape == (4, 1, 8, 8) and images.abs().max() <= 1
