"""zoo.nn layers against timm's (the layers official DiT/MAR checkpoints were trained with)."""

import torch
from timm.layers import Mlp as TimmMlp
from timm.layers import PatchEmbed as TimmPatchEmbed
from timm.models.vision_transformer import Attention as TimmAttention

from zoo.nn import Attention, Mlp, PatchEmbed, modulate


def test_attention_equals_timm_attention_with_the_same_weights():
    torch.manual_seed(0)
    ref = TimmAttention(48, num_heads=4, qkv_bias=True).eval()
    ours = Attention(48, num_heads=4, qkv_bias=True)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 10, 48)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)


def test_mlp_equals_timm_mlp_with_tanh_gelu():
    torch.manual_seed(0)
    ref = TimmMlp(16, 64, act_layer=lambda: torch.nn.GELU(approximate="tanh"), drop=0).eval()
    ours = Mlp(16, 64, act_layer=lambda: torch.nn.GELU(approximate="tanh"))
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(ours(x), ref(x))


def test_patch_embed_equals_timm_patch_embed():
    torch.manual_seed(0)
    ref = TimmPatchEmbed(8, 2, 4, 32, bias=True)
    ours = PatchEmbed(8, 2, 4, 32)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(ours(x), ref(x))
    assert ours.num_patches == 16


def test_modulate_is_x_times_one_plus_scale_plus_shift():
    x = torch.tensor([[[1.0, 2.0]]])
    out = modulate(x, shift_ND=torch.tensor([[10.0, 20.0]]), scale_ND=torch.tensor([[1.0, -1.0]]))
    assert out.tolist() == [[[12.0, 20.0]]]
