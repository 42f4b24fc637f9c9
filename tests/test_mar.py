"""MAR: official names and sizes, masking, the MAE encoder/decoder, the DiffLoss head on the shared
Gaussian objective, seeded sampling with the CFG schedules, official checkpoints, recipes."""

from __future__ import annotations

import argparse
import copy
import math

import pytest
import torch

import zoo
from zoo.config import ConfigError
from zoo.diffusion import GaussianConfig, GaussianObjective, SpacedDiffusion, get_named_beta_schedule
from zoo.generators.mar import (
    MAR,
    MARConfig,
    cfg_at_step,
    mask_by_order,
    next_mask_len,
    truncated_normal_mask_ratio,
)
from zoo.nn.diffloss import DiffLoss, SimpleMLPAdaLN

# 16 px images, stride 2 latents of 3 channels, 2x2 patches: L = 16 tokens of width 12.
TINY = dict(img_size=16, vae_stride=2, patch_size=2, vae_embed_dim=3, class_num=10, buffer_size=2,
            encoder_embed_dim=32, decoder_embed_dim=24, encoder_depth=2, decoder_depth=1, encoder_num_heads=2,
            decoder_num_heads=2, diffloss_d=2, diffloss_w=32, num_sampling_steps="5", diffusion_batch_mul=2)


def tiny_mar(**overrides) -> MAR:
    torch.manual_seed(0)
    return zoo.create_model("mar-t", **{**TINY, **overrides})


def randomize(model, std=0.1):
    """Move the zero-initialised layers (adaLN, head output) so that every path carries signal."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def latents(batch=2, seed=0):
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ names and sizes

def test_parameter_names_and_shapes_are_the_official_ones():
    shapes = {k: tuple(v.shape) for k, v in tiny_mar().state_dict().items()}
    expected = {
        "class_emb.weight": (10, 32), "fake_latent": (1, 32), "z_proj.weight": (32, 12), "z_proj_ln.weight": (32,),
        "encoder_pos_embed_learned": (1, 18, 32), "encoder_blocks.1.attn.qkv.weight": (96, 32),
        "encoder_blocks.0.mlp.fc2.weight": (32, 128), "encoder_blocks.0.norm1.bias": (32,),
        "encoder_norm.weight": (32,), "decoder_embed.weight": (24, 32), "mask_token": (1, 1, 24),
        "decoder_pos_embed_learned": (1, 18, 24), "decoder_blocks.0.attn.proj.bias": (24,),
        "decoder_norm.bias": (24,), "diffusion_pos_embed_learned": (1, 16, 24),
        "diffloss.net.time_embed.mlp.0.weight": (32, 256), "diffloss.net.cond_embed.weight": (32, 24),
        "diffloss.net.input_proj.weight": (32, 12), "diffloss.net.res_blocks.1.in_ln.weight": (32,),
        "diffloss.net.res_blocks.0.mlp.2.weight": (32, 32), "diffloss.net.res_blocks.0.adaLN_modulation.1.weight":
            (96, 32), "diffloss.net.final_layer.linear.weight": (24, 32),
        "diffloss.net.final_layer.adaLN_modulation.1.bias": (64,),
    }
    assert {k: shapes.get(k) for k in expected} == expected
    assert "diffloss.net.final_layer.norm_final.weight" not in shapes  # no affine, as the release


def test_released_sizes_have_the_release_parameter_counts():
    with torch.device("meta"):
        model = zoo.create_model("mar-b")
    assert sum(p.numel() for p in model.parameters()) == 207_924_768  # README: 208M
    assert model.encoder_blocks[0].norm1.eps == 1e-6 and MARConfig().norm_eps == 1e-5
    assert len(model.diffloss.net.res_blocks) == 6 and model.diffloss.net.model_channels == 1024


# ------------------------------------------------------------------------------------------ tokens and masks

def test_patchify_puts_a_patch_per_token_channel_major_and_unpatchify_inverts_it():
    model = tiny_mar()
    x = latents()
    tokens = model.patchify(x)
    assert tokens.shape == (2, 16, 12)
    assert torch.equal(tokens[0, 1], x[0, :, 0:2, 2:4].reshape(-1))  # second token: top row, second patch
    assert torch.equal(model.unpatchify(tokens), x)


def test_mask_ratio_follows_the_truncated_normal_between_min_and_one():
    generator = torch.Generator().manual_seed(0)
    draws = torch.tensor([truncated_normal_mask_ratio(0.7, generator) for _ in range(4000)])
    assert draws.min() >= 0.7 and draws.max() <= 1.0
    a = (0.7 - 1.0) / 0.25  # mean of N(1, 0.25²) truncated to [0.7, 1]
    phi = lambda v: math.exp(-v * v / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    mean = 1 + 0.25 * (phi(a) - phi(0)) / (0.5 - 0.5 * (1 + math.erf(a / math.sqrt(2))))
    assert abs(draws.mean().item() - mean) < 0.006  # ≈ 0.867


def test_random_masking_masks_the_first_ceil_L_ratio_positions_of_each_order():
    model = tiny_mar()
    orders = model.sample_orders(3, torch.Generator().manual_seed(1))
    assert torch.equal(orders.sort(dim=1).values, torch.arange(16).expand(3, 16))
    mask = model.random_masking(torch.zeros(3, 16, 12), orders, mask_ratio=0.7)
    assert mask.sum(dim=1).tolist() == [12.0] * 3  # ceil(16 * 0.7)
    for row in range(3):
        assert mask[row, orders[row, :12]].all() and not mask[row, orders[row, 12:]].any()


def test_encoder_sees_only_the_class_buffer_and_the_visible_tokens():
    model = randomize(tiny_mar()).eval()
    tokens = model.patchify(latents())
    mask = mask_by_order(10, model.sample_orders(2, torch.Generator().manual_seed(2))).float()
    class_embedding = model.class_emb(torch.tensor([3, 4]))
    out = model.forward_mae_encoder(tokens, mask, class_embedding)
    assert out.shape == (2, 2 + 6, 32)  # buffer + visible tokens
    masked_changed, visible_changed = tokens.clone(), tokens.clone()
    masked_changed[mask.bool()] += 5.0
    visible_changed[~mask.bool()] += 5.0
    assert torch.equal(model.forward_mae_encoder(masked_changed, mask, class_embedding), out)
    assert not torch.allclose(model.forward_mae_encoder(visible_changed, mask, class_embedding), out)
    conditions = model.forward_mae_decoder(out, mask)
    assert conditions.shape == (2, 16, 24)


# ------------------------------------------------------------------------------------------ the diffusion head

def test_head_trains_through_the_shared_gaussian_objective():
    model = tiny_mar()
    head = model.diffloss
    assert isinstance(head.train_diffusion, GaussianObjective) and model.objective is head.train_diffusion
    assert head.train_diffusion.num_timesteps == 1000
    assert head.train_diffusion.betas == pytest.approx(get_named_beta_schedule("cosine", 1000))
    assert isinstance(head.gen_diffusion, SpacedDiffusion) and len(head.gen_diffusion.timestep_map) == 5
    assert head.net.out_channels == 24  # eps and the learned-range variance
    objective = GaussianObjective(GaussianConfig(noise_schedule="cosine", learn_sigma=False))
    fixed = zoo.create_model("mar-t", **TINY, objective=objective)
    assert fixed.diffloss.objective is objective and fixed.diffloss.net.out_channels == 12


def test_head_outputs_zeros_at_initialisation():
    net = SimpleMLPAdaLN(in_channels=4, model_channels=16, out_channels=8, z_channels=6, num_res_blocks=2)
    out = net(torch.randn(5, 4), torch.randint(0, 1000, (5,)), torch.randn(5, 6))
    assert torch.equal(out, torch.zeros(5, 8))


def test_forward_with_cfg_guides_eps_and_passes_the_variance_through():
    net = randomize(SimpleMLPAdaLN(in_channels=4, model_channels=16, out_channels=8, z_channels=6, num_res_blocks=1))
    x, t, c = torch.randn(3, 4), torch.randint(0, 1000, (6,)), torch.randn(6, 6)
    guided = net.forward_with_cfg(torch.cat([x, x]), t, c, 3.0)
    raw = net(torch.cat([x, x]), t, c)
    cond, uncond = raw[:3, :4], raw[3:, :4]
    assert torch.allclose(guided[:3, :4], uncond + 3.0 * (cond - uncond), atol=1e-6)
    assert torch.equal(guided[3:, :4], guided[:3, :4]) and torch.equal(guided[:, 4:], raw[:, 4:])


def test_diffloss_averages_only_over_masked_tokens():
    head = randomize(DiffLoss(target_channels=4, z_channels=6, depth=1, width=16))
    target, z = torch.randn(8, 4), torch.randn(8, 6)
    mask = torch.tensor([1.0, 1, 0, 0, 1, 0, 1, 0])
    t, noise = torch.randint(0, 1000, (8,)), torch.randn(8, 4)
    loss = head(target, z, mask, t=t, noise=noise)
    changed = target.clone()
    changed[mask == 0] += 10.0
    assert torch.equal(head(changed, z, mask, t=t, noise=noise), loss)
    per_token = head.objective.training_losses(head.net, target, t, dict(c=z), noise=noise)["loss"]
    assert loss.item() == pytest.approx(per_token[mask == 1].mean().item(), rel=1e-6)


def test_head_runs_only_on_masked_tokens_with_the_release_draws_and_gradients():
    """The release evaluates the head on every token and zeroes the visible ones' loss; zoo skips them.
    Same timesteps and noise stream (drawn for every token), same loss and gradients."""
    head = randomize(DiffLoss(target_channels=4, z_channels=6, depth=2, width=16))
    target, z = torch.randn(12, 4), torch.randn(12, 6, requires_grad=True)
    mask = (torch.rand(12) < 0.6).float()
    rows = []
    head.net.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    torch.manual_seed(3)
    loss = head(target, z, mask)
    assert rows == [int(mask.sum())]
    (grad_z, *grad_w) = torch.autograd.grad(loss, [z, *head.parameters()])
    torch.manual_seed(3)  # the release: t, then eps for all tokens, the net on all of them
    t = torch.randint(0, head.objective.num_timesteps, (12,))
    eps = torch.randn(12, 4)
    per_token = head.objective.training_losses(head.net, target, t, dict(c=z), noise=eps)["loss"]
    reference = (per_token * mask).sum() / mask.sum()
    (ref_z, *ref_w) = torch.autograd.grad(reference, [z, *head.parameters()])
    assert torch.allclose(loss, reference, rtol=1e-6, atol=0)
    assert torch.allclose(grad_z, ref_z, atol=1e-7) and (grad_z[mask == 0] == 0).all()
    for a, b in zip(grad_w, ref_w):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)


def test_loss_is_finite_and_decreases_on_a_fixed_batch():
    model = tiny_mar(attn_dropout=0.0, proj_dropout=0.0, label_drop_prob=0.0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, labels = latents(4, seed=3), torch.tensor([0, 1, 2, 3])
    losses = []
    for _ in range(15):
        torch.manual_seed(0)  # the same orders, mask, timesteps and noise every step
        loss = model.loss(x, labels)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    x, labels = latents(2, seed=4), torch.tensor([5, 6])
    results = []
    for flag in (False, True):
        model = randomize(tiny_mar(grad_checkpointing=flag, attn_dropout=0.0, proj_dropout=0.0)).train()
        torch.manual_seed(0)
        loss = model.loss(x, labels)["loss"]
        loss.backward()
        results.append((loss.detach(), model.z_proj.weight.grad, model.diffloss.net.input_proj.weight.grad))
    for plain, checkpointed in zip(*results):
        assert torch.allclose(plain, checkpointed, atol=1e-6)


def test_loss_refuses_latents_of_the_wrong_shape():
    with pytest.raises(ValueError, match="3 channels and stride 2"):
        tiny_mar().loss(torch.randn(2, 4, 8, 8), torch.tensor([0, 1]))


def test_no_weight_decay_follows_the_release():
    model = tiny_mar()
    no_decay = model.no_weight_decay()
    assert {n for n, _ in model.named_parameters() if n.startswith("diffloss.")} <= no_decay
    assert "encoder_blocks.0.attn.qkv.bias" in no_decay and "encoder_norm.weight" in no_decay
    assert not {"class_emb.weight", "fake_latent", "mask_token", "encoder_pos_embed_learned",
                "encoder_blocks.0.attn.qkv.weight"} & no_decay


# ------------------------------------------------------------------------------------------ sampling

def test_cosine_unmasking_schedule_and_linear_cfg_use_the_next_steps_mask():
    lens, masked = [], 16
    for step in range(4):
        masked = next_mask_len(step, 4, 16, masked)
        lens.append(masked)
    assert lens == [14, 11, 6, 1]  # floor(16·cos(π/2·k/4)), at least one left
    assert [cfg_at_step(3.0, "linear", m, 16) for m in lens] == [1.25, 1.625, 2.25, 1 + 2.0 * 15 / 16]
    assert cfg_at_step(3.0, "constant", 11, 16) == 3.0
    with pytest.raises(ValueError, match="cfg_schedule"):
        cfg_at_step(3.0, "cosine", 11, 16)


def test_sampling_is_deterministic_for_a_seed_and_fills_every_token():
    model = randomize(tiny_mar()).eval()
    labels = torch.tensor([1, 7])

    def draw(seed, **kw):
        return model.sample(labels, generator=torch.Generator().manual_seed(seed), num_iter=3, **kw)

    out = draw(0, cfg_scale=2.0)
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()
    assert torch.equal(out, draw(0, cfg_scale=2.0))
    assert not torch.equal(out, draw(1, cfg_scale=2.0))
    assert not torch.equal(out, draw(0, cfg_scale=2.0, cfg_schedule="constant"))
    assert torch.equal(draw(0, cfg_scale=1.0, temperature=0.5), draw(0, cfg_scale=1.0, temperature=0.5))
    assert (model.patchify(draw(0)).abs().sum(dim=-1) > 0).all()  # no token left at its zero start


def test_sample_tokens_keeps_the_official_call():
    model = randomize(tiny_mar()).eval()
    torch.manual_seed(0)
    a = model.sample_tokens(2, num_iter=2, cfg=1.5, cfg_schedule="linear", labels=torch.tensor([0, 1]))
    torch.manual_seed(0)
    b = model.sample_tokens(2, 2, 1.5, "linear", torch.tensor([0, 1]), 1.0, False)
    assert a.shape == (2, 3, 8, 8) and torch.equal(a, b)


# ------------------------------------------------------------------------------------------ official checkpoints

def official_state_dict(model: MAR, offset: float) -> dict[str, torch.Tensor]:
    """A state dict under the official names (as LTH14/mar writes them), values shifted by ``offset``."""
    return {name: tensor + offset for name, tensor in model.state_dict().items()}


def test_training_checkpoints_load_model_ema_by_default(tmp_path):
    source = tiny_mar()
    raw, ema = official_state_dict(source, 0.0), official_state_dict(source, 1.0)
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": raw, "model_ema": ema, "optimizer": {"state": {}, "param_groups": []}, "epoch": 7,
                "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="mar_base")}, path)
    model = tiny_mar(diffloss_w=32)
    assert torch.equal(model.load_official(path).fake_latent, ema["fake_latent"])
    assert torch.equal(model.load_official(path, ema=False).fake_latent, raw["fake_latent"])


def test_safetensors_weights_load_and_mismatches_are_named(tmp_path):
    from safetensors.torch import save_file

    state = official_state_dict(tiny_mar(), 0.5)
    save_file(state, str(tmp_path / "mar-tiny.safetensors"))
    model = tiny_mar().load_official(tmp_path / "mar-tiny.safetensors")
    assert torch.equal(model.mask_token, state["mask_token"])
    with pytest.raises(ValueError, match=r"z_proj.weight has shape \(32, 8\), this MAR's is \(32, 12\)"):
        tiny_mar().load_official({**state, "z_proj.weight": torch.zeros(32, 8)})
    with pytest.raises(ValueError, match="missing \\['fake_latent'\\]"):
        tiny_mar().load_official({k: v for k, v in state.items() if k != "fake_latent"})


# ------------------------------------------------------------------------------------------ config and recipes

def test_config_refuses_sizes_that_do_not_tile():
    with pytest.raises(ConfigError, match="not divisible by vae_stride"):
        MARConfig(img_size=20, vae_stride=16)
    with pytest.raises(ConfigError, match="num_sampling_steps"):
        MARConfig(num_sampling_steps="ddim7x")


RECIPE = {
    "model": {"name": "mar-t", "img_size": 8, "vae_stride": 1, "patch_size": 2, "vae_embed_dim": 1, "class_num": 10,
              "buffer_size": 2},
    "tokenizer": {"name": "pixel", "channels": 1},
    "objective": {"name": "gaussian", "noise_schedule": "cosine"},
    "data": {"name": "digits", "image_size": 8},
}


def test_a_recipe_objective_feeds_the_head():
    from zoo.recipe import recipe_from_dict

    recipe = recipe_from_dict(copy.deepcopy(RECIPE), source="mar.yaml")
    objective = recipe.objective.build()
    model = recipe.model.build(objective=objective)
    assert model.diffloss.train_diffusion is objective


@pytest.mark.parametrize("section, key, value, message", [
    ("model", "vae_embed_dim", 4, "set model.vae_embed_dim=1"),
    ("model", "vae_stride", 2, "set model.vae_stride=1"),
    ("model", "img_size", 16, "set model.img_size=8"),
    ("model", "class_num", 1000, "set model.class_num=10"),
    ("objective", "noise_schedule", "linear", "cosine schedule"),
])
def test_recipes_that_do_not_fit_are_refused(section, key, value, message):
    from zoo.recipe import recipe_from_dict

    bad = copy.deepcopy(RECIPE)
    bad[section][key] = value
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict(bad, source="mar.yaml")


def test_recipes_with_a_non_gaussian_objective_are_refused():
    from zoo.recipe import recipe_from_dict

    bad = {**copy.deepcopy(RECIPE), "objective": {"name": "flow"}}
    with pytest.raises(ConfigError, match="'flow' does not work with generator 'mar-t'"):
        recipe_from_dict(bad, source="mar.yaml")


def test_a_recipe_without_objective_gets_the_release_head_objective():
    from zoo.recipe import recipe_from_dict

    raw = copy.deepcopy(RECIPE)
    del raw["objective"]
    recipe = recipe_from_dict(raw, source="mar.yaml")
    assert recipe.objective.config.noise_schedule == "cosine" and recipe.objective.config.learn_sigma


def test_clip_denoised_keeps_an_untrained_head_in_pixel_range():
    # At initialisation the head predicts eps = 0, so each step's x0 estimate is x_t / sqrt(alpha_bar):
    # unclipped (the release, for latent tokens) it explodes; clipped (for pixel tokens) it stays in range.
    torch.manual_seed(0)
    head = DiffLoss(target_channels=4, z_channels=6, depth=1, width=16, num_sampling_steps="10")
    z = torch.randn(8, 6)
    raw = head.sample(z, generator=torch.Generator().manual_seed(0))
    clipped = head.sample(z, generator=torch.Generator().manual_seed(0), clip_denoised=True)
    assert raw.abs().max() > 10 and clipped.abs().max() <= 1.0 + 1e-5


def test_zoo_sample_drives_mar_with_steps_as_unmasking_iterations(tmp_path, capsys):
    from zoo.cli.sample import main as sample
    from zoo.recipe import recipe_from_dict
    from zoo.train.trainer import Trainer

    raw = copy.deepcopy(RECIPE)
    raw["train"] = {"batch_size": 8, "max_steps": 1, "log_every": 1, "tensorboard": False}
    raw["sample"] = {"num": 4, "batch_size": 4, "num_iter": 2}
    run = tmp_path / "run"
    Trainer(recipe_from_dict(raw, source="mar.yaml"), run, progress=False).fit()
    out = tmp_path / "mar.png"
    assert sample([str(run), "--num", "3", "--steps", "2", "--diffusion-steps", "ddim3", "--cfg-scale", "1.5",
                   "--cfg-schedule", "constant", "--temperature", "0.9", "--out", str(out)]) == 0 and out.is_file()
    assert sample([str(run), "--steps", "2", "--num-iter", "3", "--out", str(out)]) == 2
    assert "disagree" in capsys.readouterr().err


def test_more_unmasking_iterations_than_tokens_skip_the_empty_ones():
    model = tiny_mar().eval()  # 16 tokens
    labels = torch.tensor([1, 2])
    many = model.sample(labels, num_iter=64, cfg_scale=2.0, num_sampling_steps="5",
                        generator=torch.Generator().manual_seed(0))
    assert many.shape == (2, 3, 8, 8) and torch.isfinite(many).all()
