"""zoo.nn: timm's standard layers (as the official DiT and MAR use them) and what zoo adds."""

import timm.layers
import torch

import zoo
from zoo.nn import Attention, Mlp, PatchEmbed, modulate, unpatchify


def test_the_standard_layers_are_timms():
    assert (Attention, Mlp, PatchEmbed) == (timm.layers.Attention, timm.layers.Mlp, timm.layers.PatchEmbed)
    dit = zoo.create_model("dit-s/2", input_size=8, in_channels=4, hidden_size=32, depth=1, num_heads=2)
    assert isinstance(dit.blocks[0].attn, timm.layers.Attention) and isinstance(dit.x_embedder, timm.layers.PatchEmbed)
    from timm.models.vision_transformer import Block

    mar = zoo.create_model("mar-t", img_size=16, vae_stride=2, patch_size=2, vae_embed_dim=3, class_num=10)
    assert isinstance(mar.encoder_blocks[0], Block)
    var = zoo.create_model("var-d2", embed_dim=32, num_heads=2, num_classes=10, patch_nums=(1, 2), vocab_size=16,
                           Cvae=4)
    assert isinstance(var.blocks[0].ffn, timm.layers.Mlp)


def test_unpatchify_inverts_timms_patch_order():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 8, 8)
    p = 2
    # PatchEmbed's convolution sees each patch's pixels in (c, p, q) order; DiT's linear head emits
    # (p, q, c): build those tokens by hand and check unpatchify puts every pixel back.
    tokens = images.reshape(2, 3, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, p * p * 3)
    assert torch.equal(unpatchify(tokens, 3, p), images)


def test_modulate_is_x_times_one_plus_scale_plus_shift():
    x = torch.tensor([[[1.0, 2.0]]])
    out = modulate(x, shift_ND=torch.tensor([[10.0, 20.0]]), scale_ND=torch.tensor([[1.0, -1.0]]))
    assert out.tolist() == [[[12.0, 20.0]]]


def test_var_attention_follows_timms_fused_attention_switch(monkeypatch):
    from tests.test_var import randomize, teacher_forcing_batch, tiny_tokenizer, tiny_var

    model = randomize(tiny_var()).eval()
    gt_BL, x_BLCv = teacher_forcing_batch(tiny_tokenizer())
    labels = torch.tensor([1, 2, 3])
    fused = model(labels, x_BLCv)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False  # what TIMM_FUSED_ATTN=0 gives
    torch.testing.assert_close(model(labels, x_BLCv), fused, rtol=1e-5, atol=1e-5)
