"""VAR-SR: prefix and cross-attention conditioning, scale-aligned RoPE, image-based CFG, the refiner
on the last scale's residual, the KV-cached sampler against the teacher-forced forward, and the
official VARSR checkpoint layout."""

import pytest
import torch

from zoo.config import ConfigError
from zoo.generators.var_sr import mix_guidance, scale_aligned_rope, varsr_state_dict
from zoo.registry import create_model, create_tokenizer

PNS = (1, 2, 4)


def tiny_tokenizer():
    torch.manual_seed(0)
    return create_tokenizer("msvq", vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 1, 2), v_patch_nums=PNS,
                            test_mode=True)


def tiny_model(*, strong_stem: bool = False, **overrides):
    """A 2-block VAR-SR over 16-px images; ``strong_stem`` makes the LR features large enough to matter
    at initialisation (the release initialises the stem's convolutions with std 0.02)."""
    torch.manual_seed(0)
    fields = dict(depth=2, embed_dim=32, num_heads=2, patch_nums=PNS, vocab_size=16, Cvae=4,
                  stem_channels=(8, 8, 16), refiner_width=16, refiner_depth=1, refiner_steps="4", drop_path_rate=0.0)
    fields.update(overrides)
    model = create_model("var-sr", **fields)
    if strong_stem:
        with torch.no_grad():
            for conv in model.con_embedding.modules():
                if isinstance(conv, torch.nn.Conv2d):
                    torch.nn.init.normal_(conv.weight, std=0.5)
    return model


def test_prefix_mask_lets_every_scale_see_the_prefix_and_the_prefix_see_only_level_zero():
    model = tiny_model()
    P, T = model.num_prefix, model.T
    assert P == 16 and T == 16 + 1 + 4 + 16
    visible = model.attn_bias_for_masking[0, 0] == 0
    assert visible[:, :P + 1].all()  # every position sees the prefix and the start token
    assert not visible[:P + 1, P + 1:].any()  # the prefix and start token see no later scale
    scale1 = slice(P + 1, P + 5)
    assert visible[scale1, scale1].all() and not visible[scale1, P + 5:].any()


def test_logits_of_a_scale_ignore_finer_scales_and_follow_the_lr_image():
    model = tiny_model(strong_stem=True, init_adaln_gamma=1.0).eval()  # blocks that change their input from the start
    x = torch.randn(2, 4 + 16, 4)
    label = torch.zeros(2, dtype=torch.long)
    lr = torch.rand(2, 3, 4, 4) * 2 - 1
    logits = model(x, label, lr)
    changed = x.clone()
    changed[:, 4:] += 1.0  # the input of the last scale
    again = model(changed, label, lr)
    torch.testing.assert_close(again[:, :5], logits[:, :5])  # scales 0 and 1 do not see it
    other_lr = model(x, label, -lr)
    assert (other_lr[:, 0] - logits[:, 0]).abs().max() > 1e-6  # even the first scale sees the LR prefix


def test_cross_attention_mode_has_no_prefix_and_reads_the_lr_features():
    model = tiny_model(cond_mode="cross", strong_stem=True, init_adaln_gamma=1.0).eval()
    assert model.num_prefix == 0 and model.T == model.L
    assert len(model.cross_blocks) == 2
    x = torch.randn(2, 20, 4)
    label = torch.zeros(2, dtype=torch.long)
    lr = torch.rand(2, 3, 4, 4) * 2 - 1
    a, b = model(x, label, lr), model(x, label, -lr)
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-6  # later scales read the memory by cross-attention


def test_rope_phases_align_positions_across_scales():
    rope = scale_aligned_rope(16, (1, 2, 4), grid=32.0)  # (1 + 4 + 16, 8, 2)
    assert rope.shape == (21, 8, 2)
    first_of = {1: 0, 2: 1, 4: 5}

    def token(pn, i, j):
        return rope[first_of[pn] + i * pn + j]

    torch.testing.assert_close(token(1, 0, 0), token(4, 0, 0))  # the top-left corners coincide
    torch.testing.assert_close(token(2, 1, 1), token(4, 2, 2))  # (i, j)/pn is the same spot
    torch.testing.assert_close(token(2, 0, 1), token(4, 0, 2))
    assert not torch.allclose(token(4, 0, 1), token(4, 1, 0))  # rows and columns rotate different channels


def test_prefix_uses_the_last_scale_grid():
    model = tiny_model()
    P = model.num_prefix
    torch.testing.assert_close(model.rope_T2[:P], model.rope_T2[-P:])


def test_image_based_cfg_mixes_positive_and_low_quality_rows():
    positive, negative = torch.tensor([[[1.0, 3.0]]]), torch.tensor([[[2.0, 0.0]]])
    mixed = mix_guidance(torch.cat((positive, negative)), t=0.5)
    torch.testing.assert_close(mixed, torch.tensor([[[0.5, 4.5]]]))


def test_guided_sampling_uses_the_low_quality_class_as_negative(monkeypatch):
    model, tok = tiny_model(refiner=False).eval(), tiny_tokenizer()
    seen = []
    original = model._start

    def spy(lr_BlC, label_B):
        seen.append(label_B.clone())
        return original(lr_BlC, label_B)

    monkeypatch.setattr(model, "_start", spy)
    model.sample(torch.zeros(3, 3, 4, 4), tokenizer=tok, cfg_scale=2.0, top_k=1)
    assert seen[0].tolist() == [0, 0, 0, 1, 1, 1]


def test_greedy_cached_sampling_agrees_with_the_teacher_forced_forward():
    model, tok = tiny_model(refiner=False).eval(), tiny_tokenizer()
    lr = torch.rand(2, 3, 4, 4) * 2 - 1
    f_hat, idx_pyramid = model.sample_tokens(lr, tokenizer=tok, top_k=1, cfg_scale=0.0)
    x = tok.quantize.idxBl_to_var_input(idx_pyramid)
    logits = model(x, torch.zeros(2, dtype=torch.long), lr)
    assert torch.equal(logits.argmax(-1), torch.cat(idx_pyramid, dim=1))
    assert f_hat.shape == (2, 4, 4, 4)


def test_mean_tokens_add_the_expected_code_vector_of_every_scale():
    model, tok = tiny_model(refiner=False).eval(), tiny_tokenizer()
    lr = torch.rand(2, 3, 4, 4) * 2 - 1
    # With top_k=1 the predicted distribution is one-hot: the mean is the greedy token.
    greedy, greedy_idx = model.sample_tokens(lr, tokenizer=tok, top_k=1)
    mean_one, mean_idx = model.sample_tokens(lr, tokenizer=tok, top_k=1, mean_tokens=True)
    torch.testing.assert_close(mean_one, greedy)
    assert all(torch.equal(a, b) for a, b in zip(mean_idx, greedy_idx))
    # A head that predicts nothing (uniform over the codebook): every scale adds the codebook's mean.
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    f_hat = model.sample(lr, tokenizer=tok, mean_tokens=True, generator=torch.Generator().manual_seed(0))
    again = model.sample(lr, tokenizer=tok, mean_tokens=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(f_hat, again)  # no draws: the seed does not matter
    centre = tok.quantize.embedding.weight.mean(dim=0)
    ms_h = [centre.view(1, -1, 1, 1).expand(2, -1, pn, pn) for pn in PNS]
    torch.testing.assert_close(f_hat, tok.quantize.embed_to_fhat(ms_h, all_to_max_scale=True, last_one=True))


def test_training_inputs_give_the_residual_the_last_scale_quantises():
    model, tok = tiny_model(), tiny_tokenizer()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    gt_BL, x, rest = model.training_inputs(tok, images)
    assert gt_BL.shape == (2, 21) and x.shape == (2, 20, 4) and rest.shape == (2, 16, 4)
    # rest minus what the ground-truth last-scale tokens add is what the whole pyramid misses.
    f = tok.quant_conv(tok.encoder(images))
    left = rest - model.last_scale_embedding(gt_BL[:, -16:])
    missed = (f - tok.encode_raw(images)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(left, missed, atol=1e-5, rtol=1e-5)


def test_loss_adds_the_weighted_refiner_loss_and_trains_the_refiner():
    model, tok = tiny_model(refiner_weight=3.0), tiny_tokenizer()
    inputs = model.training_inputs(tok, torch.rand(2, 3, 16, 16) * 2 - 1)
    terms = model.loss(inputs, {"lr": torch.zeros(2, 3, 4, 4), "label": torch.tensor([0, 1])})
    torch.testing.assert_close(terms["loss"].detach(), terms["ce"] + 3.0 * terms["diffusion"])
    terms["loss"].backward()
    assert model.diffloss.net.final_layer.linear.weight.grad.abs().sum() > 0
    assert model.blocks[0].attn.mat_qkv.weight.grad.abs().sum() > 0  # the refiner's condition is not detached


def test_mean_token_weight_adds_the_squared_distance_of_the_expected_code_vector_to_the_true_one():
    model, tok = tiny_model(refiner=False, mean_token_weight=5.0), tiny_tokenizer()
    model.attach_tokenizer(tok)
    tok.quantize.embedding.weight.requires_grad_(True)
    inputs = model.training_inputs(tok, torch.rand(2, 3, 16, 16) * 2 - 1)
    cond = {"lr": torch.rand(2, 3, 4, 4) * 2 - 1, "label": torch.tensor([0, 0])}
    terms = model.loss(inputs, cond)
    logits_BLV, _, _ = model.forward_hidden(inputs[1], cond["label"], cond["lr"])
    codes_VC = tok.quantize.embedding.weight
    expected_BLC = logits_BLV.softmax(dim=-1) @ codes_VC
    by_hand = (expected_BLC - codes_VC[inputs[0]]).pow(2).sum(dim=-1).mean()  # uniform weights: a mean over tokens
    torch.testing.assert_close(terms["mean_token"], by_hand.detach())
    torch.testing.assert_close(terms["loss"].detach(), terms["ce"] + 5.0 * by_hand.detach())
    terms["loss"].backward()
    assert tok.quantize.embedding.weight.grad is None  # the codebook is the tokenizer's: a constant here


def test_kaiming_stem_init_lets_the_lr_image_through_at_initialisation():
    lr = torch.rand(8, 3, 4, 4) * 2 - 1
    release, kaiming = tiny_model(), tiny_model(stem_init="kaiming")
    with torch.no_grad():
        # Across patches: how much of the LR image the prefix tokens carry, next to the position table.
        carried = {name: model.lr_features(lr).std(dim=0).mean().item() for name, model in
                   (("release", release), ("kaiming", kaiming))}
    position = release.pos_start.std().item()
    assert carried["release"] < 1e-3 * position < carried["kaiming"]
    assert carried["kaiming"] > 0.1 * position
    for conv in release.con_embedding.modules():  # the release's init is unchanged by the option's existence
        if isinstance(conv, torch.nn.Conv2d):
            assert conv.weight.std().item() < 0.03


def test_refiner_changes_the_sampled_features():
    model, tok = tiny_model().eval(), tiny_tokenizer()
    with torch.no_grad():
        model.diffloss.net.final_layer.linear.bias.fill_(0.5)  # a head that predicts a non-zero residual
    lr = torch.zeros(1, 3, 4, 4)
    refined = model.sample(lr, tokenizer=tok, top_k=1, generator=torch.Generator().manual_seed(0))
    model.config.refiner = False
    plain = model.sample(lr, tokenizer=tok, top_k=1, generator=torch.Generator().manual_seed(0))
    assert (refined - plain).abs().max() > 1e-3


def test_residual_models_add_the_bicubic_upsample_back():
    model = tiny_model(residual_gain=4.0)
    lr = torch.full((1, 3, 4, 4), 0.25)
    out = model.finish_images(torch.full((1, 3, 16, 16), 0.4), lr)
    torch.testing.assert_close(out, torch.full((1, 3, 16, 16), 0.35))


def official_varsr_keys(depth, stem_widths, refiner_depth, attn_l2_norm=True):
    """Key names of qyp2000/VARSR ``VAR_RoPE.state_dict()``, written from its source."""
    keys = ["con_embedding.conv_in.weight", "con_embedding.conv_in.bias", "con_embedding.conv_out.weight",
            "con_embedding.conv_out.bias", "word_embed.weight", "word_embed.bias", "class_emb.weight", "pos_start",
            "lvl_embed.weight", "lvl_1L", "attn_bias_for_masking", "head_nm.ada_lin.1.weight", "head_nm.ada_lin.1.bias",
            "head.weight", "head.bias", "decoder_norm.weight", "decoder_norm.bias"]
    keys += [f"con_embedding.blocks.{i}.{p}" for i in range(2 * (len(stem_widths) - 1)) for p in ("weight", "bias")]
    for b in range(depth):
        keys += [f"blocks.{b}.{name}" for name in (
            "attn.mat_qkv.weight", "attn.q_bias", "attn.v_bias", "attn.zero_k_bias", "attn.proj.weight",
            "attn.proj.bias", "ffn.fc1.weight", "ffn.fc1.bias", "ffn.fc2.weight", "ffn.fc2.bias", "ada_lin.1.weight",
            "ada_lin.1.bias")]
        if attn_l2_norm:
            keys.append(f"blocks.{b}.attn.scale_mul_1H11")
    net = ["time_embed.mlp.0.weight", "time_embed.mlp.0.bias", "time_embed.mlp.2.weight", "time_embed.mlp.2.bias",
           "cond_embed.weight", "cond_embed.bias", "input_proj.weight", "input_proj.bias",
           "final_layer.linear.weight", "final_layer.linear.bias", "final_layer.adaLN_modulation.1.weight",
           "final_layer.adaLN_modulation.1.bias"]
    for r in range(refiner_depth):
        net += [f"res_blocks.{r}.{name}" for name in ("in_ln.weight", "in_ln.bias", "mlp.0.weight", "mlp.0.bias",
                                                      "mlp.2.weight", "mlp.2.bias", "adaLN_modulation.1.weight",
                                                      "adaLN_modulation.1.bias")]
    return set(keys) | {f"diffloss.net.{k}" for k in net}


def test_official_varsr_trainer_checkpoint_loads_strictly_and_gives_the_same_logits():
    model = tiny_model().eval()
    state = model.state_dict()
    assert set(state) == official_varsr_keys(depth=2, stem_widths=(8, 8, 16), refiner_depth=1)
    assert state["class_emb.weight"].shape == (2, 32)  # no extra null row: the negative is the last class
    assert state["pos_start"].shape == (1, 17, 32) and state["lvl_1L"].shape == (1, 37)
    torch.manual_seed(1)
    released = {k: (torch.randn_like(v) * 0.1 if v.is_floating_point() and "attn_bias" not in k else v.clone())
                for k, v in state.items()}
    checkpoint = {"trainer": {"var_wo_ddp": released, "vae_local": {}, "config": {}}, "args": None}
    other = tiny_model().eval()
    other.load_state_dict(varsr_state_dict(checkpoint), strict=True)
    x, lr = torch.randn(1, 20, 4), torch.rand(1, 3, 4, 4)
    label = torch.zeros(1, dtype=torch.long)
    model.load_state_dict(released, strict=True)
    torch.testing.assert_close(other(x, label, lr), model(x, label, lr))


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="patch_nums"):
        tiny_model(patch_nums=(2, 4))
    with pytest.raises(ConfigError, match="divisible by 4"):
        tiny_model(embed_dim=36, num_heads=6)
    with pytest.raises(ConfigError, match="mean_token_weight must be >= 0"):
        tiny_model(mean_token_weight=-1.0)
    with pytest.raises(ValueError, match=r"low-resolution images \(B, 3, h, w\)"):
        tiny_model().split_cond(torch.zeros(3, 4, 4))
