"""VAR: official names and sizes, block-causal training, KV-cached sampling, the loss, progressive training."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import zoo
import zoo.generators.var as var_module
from zoo.config import ConfigError
from zoo.tokenizers.msvq import MSVQConfig, MSVQTokenizer

PATCH_NUMS = (1, 2, 3)  # L = 14 tokens
TINY = dict(depth=2, embed_dim=32, num_heads=2, num_classes=10, patch_nums=PATCH_NUMS, vocab_size=16, Cvae=8,
            drop_path_rate=0.0)


def tiny_var(**overrides):
    torch.manual_seed(0)
    return zoo.create_model("var-d2", **{**TINY, **overrides})


def randomize(model, std=0.3):
    """Spread the weights so that logits differ visibly between tokens and classes."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def tiny_tokenizer():
    torch.manual_seed(0)
    return MSVQTokenizer(MSVQConfig(ch=32, ch_mult=(1, 2), vocab_size=16, z_channels=8, v_patch_nums=PATCH_NUMS))


def teacher_forcing_batch(tokenizer, batch=3, seed=2):
    """(gt_BL, x_BLCv_wo_first_l) as the trainer builds them from images."""
    torch.manual_seed(seed)
    idx_Bl = tokenizer.img_to_idxBl(torch.rand(batch, 3, 6, 6) * 2 - 1)
    return torch.cat(idx_Bl, dim=1), tokenizer.quantize.idxBl_to_var_input(idx_Bl)


def scale_slices():
    out, cur = [], 0
    for pn in PATCH_NUMS:
        out.append(slice(cur, cur + pn * pn))
        cur += pn * pn
    return out


# ------------------------------------------------------------------------------------------ registry


def test_release_sizes_are_registered_with_width_64_depth_and_depth_heads():
    from zoo.registry import get_entry

    for depth in (16, 20, 24, 30):
        cfg = get_entry("generator", f"var-d{depth}").make_config()
        assert (cfg.depth, cfg.width, cfg.heads) == (depth, 64 * depth, depth)
        assert cfg.drop_path == pytest.approx(0.1 * depth / 24)
        assert cfg.attn_l2_norm and not cfg.shared_aln and cfg.cond_drop_rate == 0.1
    assert {"var-d2", "var-d4", "var-d6", "var-d8"} <= set(zoo.list_models("var-*"))
    assert zoo.create_model("var-d2", **{**TINY, "embed_dim": 64, "num_heads": 4}).blocks[0].attn.num_heads == 4


def test_var_d16_and_d30_parameter_counts_match_the_release():
    # The paper's 310M and 2.0B: exact counts of the released var_d16.pth and var_d30.pth.
    with torch.device("meta"):
        assert sum(p.numel() for p in zoo.create_model("var-d16").parameters()) == 310_283_520
        assert sum(p.numel() for p in zoo.create_model("var-d30").parameters()) == 2_010_020_356


def test_state_dict_uses_the_official_names_and_persistent_buffers():
    state = tiny_var().state_dict()
    expected = {
        "word_embed.weight", "word_embed.bias", "class_emb.weight", "pos_start", "pos_1LC", "lvl_embed.weight",
        "lvl_1L", "attn_bias_for_masking",
        "blocks.0.attn.mat_qkv.weight", "blocks.0.attn.q_bias", "blocks.0.attn.v_bias", "blocks.0.attn.zero_k_bias",
        "blocks.0.attn.scale_mul_1H11", "blocks.0.attn.proj.weight", "blocks.1.attn.proj.bias",
        "blocks.1.ffn.fc1.weight", "blocks.1.ffn.fc2.bias", "blocks.0.ada_lin.1.weight", "blocks.1.ada_lin.1.bias",
        "head_nm.ada_lin.1.weight", "head_nm.ada_lin.1.bias", "head.weight", "head.bias",
    }
    assert expected <= set(state)
    assert len(state) == 12 + 2 * 13  # model-level tensors + 13 per block
    assert "blocks.0.attn.mat_qkv.bias" not in state and "loss_weight_1L" not in state
    assert state["class_emb.weight"].shape == (11, 32)  # the null class is row num_classes
    assert state["pos_1LC"].shape == (1, 14, 32) and state["lvl_1L"].tolist() == [[0, 1, 1, 1, 1] + [2] * 9]
    assert state["attn_bias_for_masking"].shape == (1, 1, 14, 14)
    assert state["attn_bias_for_masking"][0, 0, 1, 4] == 0 and state["attn_bias_for_masking"][0, 0, 4, 5] == -math.inf
    assert state["blocks.0.ada_lin.1.weight"].shape == (6 * 32, 32)


def test_shared_aln_variant_has_one_shared_projection_and_per_block_offsets():
    model = tiny_var(shared_aln=True)
    keys = set(model.state_dict())
    assert {"shared_ada_lin.1.weight", "shared_ada_lin.1.bias", "blocks.0.ada_gss", "blocks.1.ada_gss"} <= keys
    assert not any(k.startswith("blocks.0.ada_lin") for k in keys)
    assert model.blocks[0].ada_gss.shape == (1, 1, 6, 32)
    tokenizer = tiny_tokenizer()
    gt_BL, x = teacher_forcing_batch(tokenizer)
    assert model.eval()(torch.tensor([1, 2, 3]), x).shape == (3, 14, 16)


def test_init_scales_the_adaln_gates_down_to_1e_5_of_the_shifts():
    model = tiny_var()
    weight = model.blocks[0].ada_lin[1].weight.detach()
    gates, rest = weight[:2 * 32].abs().mean(), weight[2 * 32:].abs().mean()
    assert gates / rest == pytest.approx(1e-5 / 0.5, rel=0.3)
    assert torch.count_nonzero(model.blocks[0].ada_lin[1].bias) == 0
    assert torch.allclose(model.blocks[0].attn.scale_mul_1H11.exp(), torch.full((1, 2, 1, 1), 4.0))


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("overrides, message", [
    (dict(embed_dim=30, num_heads=4), "not divisible by num_heads"),
    (dict(patch_nums=(1, 3, 2)), "strictly increasing"),
    (dict(patch_nums=(4,)), "at least two"),
    (dict(pg=0.5, pg0=3), "pg0 must index"),
    (dict(label_smooth=1.0), "label_smooth"),
    (dict(cond_drop_rate=-0.1), "cond_drop_rate"),
    (dict(loss_weighting="per_token"), "loss_weighting"),
    (dict(pgwp=2.0), "pgwp"),
])
def test_invalid_configs_are_refused_with_the_key_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        zoo.create_model("var-d2", **{**TINY, **overrides})


def test_an_objective_is_refused():
    with pytest.raises(ConfigError, match="takes no objective"):
        zoo.create_model("var-d2", objective=zoo.registry.create_objective("flow"), **TINY)


# ------------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("patch_nums", [(1, 2, 3), (1, 2, 3, 4)])
def test_block_causal_mask_hides_later_scales(patch_nums):
    model = randomize(tiny_var(patch_nums=patch_nums)).eval()
    L = sum(pn * pn for pn in patch_nums)
    torch.manual_seed(3)
    x = torch.randn(2, L - 1, 8)
    labels = torch.tensor([1, 2])
    before = model(labels, x)
    end = 0
    for pn in patch_nums[:-1]:
        end += pn * pn  # scales up to this one occupy positions [0, end); x holds positions 1..L-1
        changed = x.clone()
        changed[:, end - 1:] += 1.0
        after = model(labels, changed)
        assert torch.equal(before[:, :end], after[:, :end]), f"positions before {end} saw later scales"
        assert not torch.allclose(before[:, end:], after[:, end:], atol=1e-3)


def test_chunked_attention_equals_one_masked_attention(monkeypatch):
    # Training attends scale by scale (skipping the masked triangle); the release runs one
    # attention with the additive block-causal mask over all positions.
    model = randomize(tiny_var(patch_nums=(1, 2, 3, 4))).eval()
    assert var_module.block_causal_chunks((1, 2, 3, 4), 3, group_below=7) == [(0, 5, True), (5, 14, False),
                                                                              (14, 30, False)]
    torch.manual_seed(3)
    x, labels = torch.randn(2, 29, 8), torch.tensor([1, 2])
    chunked = model(labels, x)
    monkeypatch.setattr(var_module, "block_causal_chunks", lambda patch_nums, last, group_below: [
        (0, sum(pn * pn for pn in patch_nums[:last + 1]), True)])
    assert torch.allclose(chunked, model(labels, x), atol=1e-5)


def test_labels_are_dropped_only_in_training_mode():
    model = randomize(tiny_var(cond_drop_rate=0.9))
    _, x = teacher_forcing_batch(tiny_tokenizer(), batch=1)
    x = x.expand(64, -1, -1)
    labels = torch.full((64,), 4)
    model.eval()
    with torch.no_grad():
        conditional = model(labels[:1], x[:1])
        null = model(torch.tensor([10]), x[:1])
        assert torch.allclose(model(labels, x), conditional.expand(64, -1, -1), atol=1e-4)
        model.train()
        torch.manual_seed(0)
        train = model(labels, x)
    is_null = torch.tensor([torch.allclose(row, null[0], atol=1e-4) for row in train])
    is_cond = torch.tensor([torch.allclose(row, conditional[0], atol=1e-4) for row in train])
    assert torch.all(is_null ^ is_cond)
    assert 0.75 < is_null.float().mean() < 0.99


# ------------------------------------------------------------------------------------------ loss


def test_loss_is_label_smoothed_cross_entropy_weighted_1_over_L():
    model = randomize(tiny_var(label_smooth=0.1)).eval()
    gt_BL, x = teacher_forcing_batch(tiny_tokenizer())
    labels = torch.tensor([1, 2, 3])
    terms = model.loss((gt_BL, x), labels)
    logp = model(labels, x).log_softmax(-1)
    by_hand = 0.0
    for b in range(3):
        for i in range(14):
            target = gt_BL[b, i]
            token = -(0.9 * logp[b, i, target] + 0.1 * logp[b, i].mean())
            by_hand += token / 14 / 3
    assert terms["loss"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    nll = -logp.gather(2, gt_BL.unsqueeze(2)).squeeze(2)
    assert terms["ce_mean"].item() == pytest.approx(nll.mean().item(), rel=1e-5)
    assert terms["ce_tail"].item() == pytest.approx(nll[:, 5:].mean().item(), rel=1e-5)
    accuracy = (logp.argmax(-1) == gt_BL).float().mean().item() * 100
    assert terms["acc_mean"].item() == pytest.approx(accuracy)
    assert all(t.ndim == 0 for t in terms.values()) and terms["loss"].requires_grad
    assert not terms["ce_mean"].requires_grad


def test_per_scale_weighting_averages_the_scale_means():
    uniform = randomize(tiny_var()).eval()
    per_scale = tiny_var(loss_weighting="per_scale").eval()
    per_scale.load_state_dict(uniform.state_dict())
    gt_BL, x = teacher_forcing_batch(tiny_tokenizer())
    labels = torch.tensor([1, 2, 3])
    nll = F.cross_entropy(uniform(labels, x).transpose(1, 2), gt_BL, reduction="none")  # (B, L)
    scale_means = torch.stack([nll[:, s].mean() for s in scale_slices()])
    assert per_scale.loss((gt_BL, x), labels)["loss"].item() == pytest.approx(scale_means.mean().item(), rel=1e-5)
    assert uniform.loss((gt_BL, x), labels)["loss"].item() == pytest.approx(nll.mean().item(), rel=1e-5)
    assert abs(scale_means.mean() - nll.mean()) > 1e-3  # the two weightings do differ here


# ------------------------------------------------------------------------------------------ progressive training


def test_progressive_training_trains_a_prefix_with_the_newest_scale_warmed_up():
    model = randomize(tiny_var()).eval()
    gt_BL, x = teacher_forcing_batch(tiny_tokenizer())
    labels = torch.tensor([1, 2, 3])
    full = model(labels, x)
    model.prog_si, model.prog_wp = 1, 0.25  # scales 0 and 1: positions 0..4, the newest is 1..4
    prefix = model(labels, x)
    assert prefix.shape == (3, 5, 16)
    assert torch.allclose(prefix, full[:, :5], atol=1e-6)
    nll = F.cross_entropy(prefix.transpose(1, 2), gt_BL[:, :5], reduction="none")
    weight = torch.tensor([1.0, 0.25, 0.25, 0.25, 0.25]) / 14
    assert model.loss((gt_BL, x), labels)["loss"].item() == pytest.approx((nll * weight).sum(1).mean().item(),
                                                                           rel=1e-5)


def test_prog_si_schedule_and_warm_up_follow_train_py():
    model = tiny_var(pg=0.5, pg0=0, wp=0.1, pgwp=0.05)  # 100 steps: stay at 0 until 10, climb until 50
    stages, warmups = {}, {}
    for step in range(100):
        model.set_step(step, 100)
        stages[step], warmups[step] = model.prog_si, model.prog_wp
    # progress = (step - 10) / 40; stage = round(2 * progress) with Python's round (0.5 -> 0, 1.5 -> 2)
    assert [s for s in range(100) if stages[s] == 0] == list(range(0, 21))
    assert [s for s in range(100) if stages[s] == 1] == list(range(21, 40))
    assert all(stages[s] == -1 for s in range(40, 100))  # the last scale: train everything
    assert all(warmups[s] == 1.0 for s in range(0, 21))  # no warm-up at the first stage
    assert [warmups[s] for s in range(21, 27)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    model.set_step(23, 100)  # a pure function of the step: resuming mid-stage gives the same state
    assert (model.prog_si, model.prog_wp) == (1, pytest.approx(0.6))


def test_set_step_without_progressive_training_trains_every_scale():
    model = tiny_var()
    model.set_step(0, 10)
    assert (model.prog_si, model.prog_wp) == (-1, 1.0)


# ------------------------------------------------------------------------------------------ sampling


def test_kv_cached_sampling_logits_equal_a_full_recompute(monkeypatch):
    model = randomize(tiny_var()).eval()
    tokenizer = tiny_tokenizer()
    model.attach_tokenizer(tokenizer)
    seen = []
    sampler = var_module.sample_with_top_k_top_p_

    def record(logits_BlV, **kwargs):
        seen.append(logits_BlV.clone())
        return sampler(logits_BlV, **kwargs)

    monkeypatch.setattr(var_module, "sample_with_top_k_top_p_", record)
    labels = torch.tensor([2, 7])
    cfg = 1.5
    _, idx_Bl = model.sample_tokens(labels, generator=torch.Generator().manual_seed(0), cfg_scale=cfg)
    x = tokenizer.quantize.idxBl_to_var_input(idx_Bl)
    with torch.no_grad():
        cond, uncond = model(labels, x), model(torch.full_like(labels, 10), x)
    for si, (where, cached) in enumerate(zip(scale_slices(), seen)):
        t = cfg * si / 2
        recomputed = (1 + t) * cond[:, where] - t * uncond[:, where]
        assert torch.allclose(cached, recomputed, atol=1e-5), f"scale {si}"


def test_top_k_1_is_greedy_and_seeded_sampling_is_deterministic():
    model = randomize(tiny_var()).eval().attach_tokenizer(tiny_tokenizer())
    labels = torch.tensor([2, 7, 7])

    def tokens(seed, **options):
        return torch.cat(model.sample_tokens(labels, generator=torch.Generator().manual_seed(seed), **options)[1], 1)

    greedy = tokens(0, top_k=1, cfg_scale=0.0)
    assert torch.equal(greedy, tokens(1, top_k=1, cfg_scale=0.0))
    x = model.tokenizer.quantize.idxBl_to_var_input(list(greedy.split([1, 4, 9], dim=1)))
    with torch.no_grad():
        assert torch.equal(model(labels, x).argmax(-1), greedy)
    sampled = tokens(5, top_k=8, top_p=0.9)
    assert torch.equal(sampled, tokens(5, top_k=8, top_p=0.9))
    assert not torch.equal(sampled, tokens(6, top_k=8, top_p=0.9))
    smooth = model.sample(labels, generator=torch.Generator().manual_seed(3), more_smooth=True)
    assert torch.equal(smooth, model.sample(labels, generator=torch.Generator().manual_seed(3), more_smooth=True))


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]))
    generator = torch.Generator().manual_seed(0)
    draws = {var_module.sample_with_top_k_top_p_(logits.clone(), top_k=2, generator=generator).item()
             for _ in range(200)}
    assert draws == {0, 1}
    draws = {var_module.sample_with_top_k_top_p_(logits.clone(), top_p=0.7, generator=generator).item()
             for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 >= 0.7; the tail (0.2 of the mass) is cut
    draws = {var_module.sample_with_top_k_top_p_(logits.clone(), top_p=0.4, generator=generator).item()
             for _ in range(50)}
    assert draws == {0}  # the most likely token alone holds 0.5 >= 0.4


def test_tokenizer_is_held_outside_the_state_and_shared_by_deepcopy():
    model = tiny_var()
    keys = set(model.state_dict())
    tokenizer = tiny_tokenizer()
    model.attach_tokenizer(tokenizer)
    assert set(model.state_dict()) == keys
    assert all(p is not q for p in model.parameters() for q in tokenizer.parameters())
    assert copy.deepcopy(model).tokenizer is tokenizer
    with pytest.raises(ValueError, match="does not fit"):
        model.attach_tokenizer(MSVQTokenizer(MSVQConfig(ch=32, ch_mult=(1, 2), vocab_size=32, z_channels=8,
                                                        v_patch_nums=PATCH_NUMS)))
    with pytest.raises(ValueError, match="attach_tokenizer"):
        tiny_var().sample(torch.tensor([1]))


def test_autoregressive_infer_cfg_returns_images_in_the_unit_range():
    model = randomize(tiny_var()).eval().attach_tokenizer(tiny_tokenizer())
    images = model.autoregressive_infer_cfg(2, None, g_seed=0, top_k=4)
    assert images.shape == (2, 3, 6, 6) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(images, model.autoregressive_infer_cfg(2, None, g_seed=0, top_k=4))


# ------------------------------------------------------------------------------------------ recipes and pipeline

RECIPE = {
    "model": {"name": "var-d2", "embed_dim": 32, "num_heads": 2, "num_classes": 10, "patch_nums": [1, 2, 4],
              "vocab_size": 64, "Cvae": 8},
    "tokenizer": {"name": "msvq", "ch": 32, "ch_mult": [1, 2], "vocab_size": 64, "z_channels": 8,
                  "v_patch_nums": [1, 2, 4], "image_channels": 1},
    "data": {"name": "digits", "image_size": 8},
}


@pytest.mark.parametrize("section, key, value, message", [
    ("model", "vocab_size", 32, "disagrees with tokenizer.vocab_size"),
    ("model", "patch_nums", [1, 2, 3], "disagrees with tokenizer.v_patch_nums"),
    ("model", "num_classes", 7, "dataset 'digits' has 10 classes; set model.num_classes=10"),
    ("data", "image_size", 16, "must equal data.image_size"),
])
def test_recipes_whose_tokenizer_or_data_disagree_are_refused(section, key, value, message):
    from zoo.recipe import recipe_from_dict

    assert recipe_from_dict(copy.deepcopy(RECIPE), source="var.yaml").objective is None
    bad = copy.deepcopy(RECIPE)
    bad[section][key] = value
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict(bad, source="var.yaml")


def test_pipeline_samples_images_through_the_attached_tokenizer():
    from zoo.pipeline import Pipeline
    from zoo.recipe import SampleConfig

    torch.manual_seed(0)
    tokenizer = MSVQTokenizer(MSVQConfig(ch=32, ch_mult=(1, 2), vocab_size=64, z_channels=8, v_patch_nums=(1, 2, 4),
                                         image_channels=1))
    model = zoo.create_model("var-d2", embed_dim=32, num_heads=2, num_classes=10, patch_nums=(1, 2, 4),
                             vocab_size=64, Cvae=8).eval().attach_tokenizer(tokenizer)
    pipeline = Pipeline(model, tokenizer, SampleConfig(cfg_scale=1.5, top_k=10, top_p=0.9), num_classes=10,
                        image_size=8)
    assert {"cfg_scale", "top_k", "top_p", "more_smooth"} <= pipeline.sampling_options()
    images = pipeline.generate(torch.tensor([0, 1, 2]), seed=0)
    assert images.shape == (3, 1, 8, 8) and images.abs().max() <= 1
    assert torch.equal(images, pipeline.generate(torch.tensor([0, 1, 2]), seed=0))
