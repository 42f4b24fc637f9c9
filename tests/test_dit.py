"""DiT: registry sizes, shapes, the official initialisation, CFG semantics, positional table."""

import math

import numpy as np
import pytest
import torch

import zoo
from zoo.config import ConfigError
from zoo.nn import get_2d_sincos_pos_embed, timestep_embedding


def test_all_twelve_official_sizes_are_registered_with_paper_shapes():
    expected = {"s": (12, 384, 6), "b": (12, 768, 12), "l": (24, 1024, 16), "xl": (28, 1152, 16)}
    names = zoo.list_models("dit-*")
    assert len(names) == 12
    from zoo.registry import get_entry

    for size, (depth, width, heads) in expected.items():
        for patch in (2, 4, 8):
            cfg = get_entry("generator", f"dit-{size}/{patch}").make_config()
            assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (depth, width, heads, patch)


def test_dit_xl2_parameter_count_matches_the_paper():
    # DiT-XL/2 at 256 px (32x32x4 latents) has 675,129,632 parameters (pos_embed included).
    with torch.device("meta"):
        model = zoo.create_model("dit-xl/2")
    assert sum(p.numel() for p in model.parameters()) == 675_129_632


def test_state_dict_uses_the_official_key_names(tiny_dit_overrides):
    keys = set(zoo.create_model("dit-s/2", **tiny_dit_overrides).state_dict())
    for key in ["x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias",
                "y_embedder.embedding_table.weight", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias",
                "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.bias", "blocks.0.adaLN_modulation.1.weight",
                "final_layer.linear.weight", "final_layer.adaLN_modulation.1.bias"]:
        assert key in keys
    assert len(keys) == 8 + 2 * 10 + 4  # embedders and pos_embed + 10 tensors a block + final layer


def test_forward_shape_with_and_without_learned_sigma(tiny_dit_overrides):
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([0, 10, 999])
    y = torch.tensor([1, 2, 3])
    assert zoo.create_model("dit-s/2", **tiny_dit_overrides)(x, t, y).shape == (3, 2, 8, 8)
    no_sigma = {**tiny_dit_overrides, "learn_sigma": False}
    assert zoo.create_model("dit-s/2", **no_sigma)(x, t, y).shape == (3, 1, 8, 8)


def test_adaln_zero_init_makes_the_untrained_output_exactly_zero(tiny_dit_overrides):
    model = zoo.create_model("dit-s/2", **tiny_dit_overrides).eval()
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([5, 500]), torch.tensor([0, 9]))
    assert torch.count_nonzero(out) == 0
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0


def test_null_class_row_exists_only_with_label_dropout(tiny_dit_overrides):
    assert zoo.create_model("dit-s/2", **tiny_dit_overrides).y_embedder.embedding_table.num_embeddings == 11
    no_drop = {**tiny_dit_overrides, "class_dropout_prob": 0.0}
    assert zoo.create_model("dit-s/2", **no_drop).y_embedder.embedding_table.num_embeddings == 10


def test_labels_are_dropped_in_training_only(tiny_dit_overrides):
    model = zoo.create_model("dit-s/2", **{**tiny_dit_overrides, "class_dropout_prob": 0.5})
    labels = torch.zeros(4000, dtype=torch.long)
    torch.manual_seed(0)
    dropped = model.y_embedder.token_drop(labels)
    assert 0.45 < (dropped == 10).float().mean() < 0.55
    emb_eval = model.y_embedder(labels[:8], train=False)
    assert torch.equal(emb_eval, model.y_embedder.embedding_table.weight[0].expand(8, -1))


def _randomize(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_forward_with_cfg_mixes_guided_channels_and_keeps_the_rest(tiny_dit_overrides):
    model = _randomize(zoo.create_model("dit-s/2", **tiny_dit_overrides)).eval()
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([100, 100, 100, 100])
    y = torch.tensor([3, 7, 10, 10])
    out = model.forward_with_cfg(torch.cat([x, x]), t, y, cfg_scale=4.0)
    cond = model(x, t[:2], y[:2])
    uncond = model(x, t[2:], y[2:])
    expected_eps = uncond[:, :1] + 4.0 * (cond[:, :1] - uncond[:, :1])
    torch.testing.assert_close(out[:2, :1], expected_eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2:, :1], expected_eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:2, 1:], cond[:, 1:], rtol=1e-5, atol=1e-5)  # variance: unguided


def test_official_cfg_guides_only_the_first_three_channels():
    model = _randomize(zoo.create_model("dit-s/2", input_size=8, in_channels=4, hidden_size=32, depth=1,
                                        num_heads=2, num_classes=10)).eval()
    x = torch.randn(1, 4, 8, 8)
    t = torch.tensor([50, 50])
    y = torch.tensor([2, 10])
    out = model.forward_with_cfg(torch.cat([x, x]), t, y, cfg_scale=3.0)
    both = model(torch.cat([x, x]), t, y)
    guided = both[1:, :3] + 3.0 * (both[:1, :3] - both[1:, :3])
    torch.testing.assert_close(out[:1, :3], guided, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:1, 3:], both[:1, 3:], rtol=1e-5, atol=1e-5)  # channel 3 stays conditional


def test_timestep_embedding_matches_the_glide_formula():
    t = torch.tensor([0.0, 3.0, 250.5])
    emb = timestep_embedding(t, 8)
    freqs = np.exp(-math.log(10000) * np.arange(4) / 4)
    expected = np.concatenate([np.cos(np.outer(t.numpy(), freqs)), np.sin(np.outer(t.numpy(), freqs))], axis=1)
    np.testing.assert_allclose(emb.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_2d_sincos_table_encodes_column_then_row():
    table = get_2d_sincos_pos_embed(8, 3)  # 9 tokens, row-major
    assert table.shape == (9, 8)
    # token 5 is row 1, column 2: first half encodes column 2, second half row 1.
    omega = 1.0 / 10000 ** (np.arange(2) / 2)
    np.testing.assert_allclose(table[5, :4], np.concatenate([np.sin(2 * omega), np.cos(2 * omega)]))
    np.testing.assert_allclose(table[5, 4:], np.concatenate([np.sin(1 * omega), np.cos(1 * omega)]))


def test_overrides_are_type_checked_and_unknown_fields_refused():
    with pytest.raises(ConfigError, match="depht.*did you mean 'depth'"):
        zoo.create_model("dit-s/2", depht=3)
    with pytest.raises(ConfigError, match="not divisible by patch_size"):
        zoo.create_model("dit-s/2", input_size=9)
    model = zoo.create_model("dit-s/2", input_size="8", depth="1", hidden_size=32, num_heads=2, num_classes=3)
    assert model.config.depth == 1 and model.config.input_size == 8


def test_unknown_model_name_suggests_the_closest():
    with pytest.raises(ConfigError, match="'dit-q/2' is not a registered generator; did you mean 'dit-s/2'"):
        zoo.create_model("dit-q/2")


def test_loss_is_finite_and_backpropagates(tiny_dit_overrides):
    model = zoo.create_model("dit-s/2", **tiny_dit_overrides)
    terms = model.loss(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert set(terms) >= {"loss", "mse", "vb"}
    terms["loss"].backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_sampling_is_deterministic_for_a_seed_and_depends_on_it(tiny_dit_overrides):
    model = _randomize(zoo.create_model("dit-s/2", **tiny_dit_overrides)).eval()
    labels = torch.tensor([1, 2])

    def draw(seed, **kw):
        return model.sample(labels, steps=4, generator=torch.Generator().manual_seed(seed), **kw)

    torch.testing.assert_close(draw(0), draw(0), rtol=0, atol=0)
    assert not torch.allclose(draw(0), draw(1))
    guided = draw(0, cfg_scale=3.0, sampler="ddim")
    assert guided.shape == (2, 1, 8, 8) and torch.isfinite(guided).all()


def test_an_official_layout_pickle_loads_strictly_with_weights_only(tmp_path, tiny_dit_overrides):
    # Released DiT-XL-2-*.pt files are bare state_dicts saved with torch.save; they must load with
    # torch.load(weights_only=True) and strict=True and reproduce the saved model's outputs.
    source = _randomize(zoo.create_model("dit-s/2", **tiny_dit_overrides)).eval()
    path = tmp_path / "DiT-tiny.pt"
    torch.save(source.state_dict(), path)
    target = zoo.create_model("dit-s/2", **tiny_dit_overrides).eval()
    target.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([4, 10])
    assert torch.equal(target(x, t, y), source(x, t, y))
