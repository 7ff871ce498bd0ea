import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dino_pytorch.models import ConvNet, VisionTransformer, create_model, list_models, vit_base, vit_small, vit_tiny
from dino_pytorch.models.vision_transformer import Attention, DropPath
from reference_vit import reference_vit

HEADS = 3


def small_vit(img_size=224, patch_size=16, in_chans=3, depth=2, **kwargs):
    return VisionTransformer(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=48, depth=depth, num_heads=HEADS,
        qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs,
    )


def randomise(model, seed=0):
    """Weights far from init (peaked attention, non-trivial LayerNorm), so the comparison bites."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name in ("pos_embed", "cls_token"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomise(small_vit())


@pytest.mark.parametrize("size", [(224, 224), (96, 96), (64, 112), (112, 48)])
def test_matches_naive_reference(model, size):
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    ref = reference_vit(model.state_dict(), x, patch_size=16, num_heads=HEADS)
    with torch.no_grad():
        cls = model(x)
        attn = model.get_last_selfattention(x)
        layers = model.get_intermediate_layers(x, n=2)
    n = (size[0] // 16) * (size[1] // 16)
    assert cls.shape == (2, 48)
    assert attn.shape == (2, HEADS, n + 1, n + 1)
    assert [t.shape for t in layers] == [(2, n + 1, 48)] * 2
    assert (cls.double() - ref["cls"]).abs().max() <= 1e-5
    assert (attn.double() - ref["last_attention"]).abs().max() <= 1e-5
    for ours, theirs in zip(layers, ref["blocks"][-2:]):
        assert (ours.double() - theirs).abs().max() <= 1e-5
    assert torch.allclose(attn.sum(-1), torch.ones(()), atol=1e-5)


def test_non_multiple_sizes_are_floored(model):
    x = torch.randn(1, 3, 100, 70)
    with torch.no_grad():
        assert torch.allclose(model(x), model(x[:, :, :96, :64]), atol=1e-6)


def test_sdpa_path_equals_explicit_softmax():
    torch.manual_seed(0)
    attn = Attention(48, num_heads=HEADS, qkv_bias=True)
    with torch.no_grad():
        attn.qkv.weight.mul_(10)  # peaked attention
    x = torch.randn(3, 17, 48)
    fused = attn(x)
    explicit, probs = attn(x, return_attention=True)
    assert torch.allclose(fused, explicit, atol=1e-6, rtol=1e-5)
    assert probs.shape == (3, HEADS, 17, 17)
    # And in the full model: the last block's SDPA forward equals a forward through its probabilities.
    model = randomise(small_vit(img_size=32, patch_size=8))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.prepare_tokens(x)
        tokens = model.blocks[0](tokens)
        last = model.blocks[1]
        out, _ = last.attn(last.norm1(tokens), return_attention=True)
        tokens = tokens + out
        tokens = tokens + last.mlp(last.norm2(tokens))
        assert torch.allclose(model(x), model.norm(tokens)[:, 0], atol=1e-5)


def test_official_key_names():
    model = small_vit(depth=1)
    block = [
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    ]
    expected = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    expected += [f"blocks.0.{k}" for k in block] + ["norm.weight", "norm.bias"]
    assert list(model.state_dict()) == expected
    assert isinstance(model.head, nn.Identity)
    assert model.pos_embed.shape == (1, 197, 48) and model.cls_token.shape == (1, 1, 48)
    assert (model.embed_dim, model.num_heads, model.patch_size) == (48, HEADS, 16)
    classifier = small_vit(depth=1, num_classes=10)
    assert list(classifier.state_dict())[-2:] == ["head.weight", "head.bias"]
    assert classifier(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_parameter_counts_and_presets():
    def count(m):
        return sum(p.numel() for p in m.parameters())

    with torch.device("meta"):  # shapes only: skips initialising 110M parameters
        small, base, tiny = vit_small(patch_size=16), vit_base(patch_size=16), vit_tiny(patch_size=16)
    assert count(small) == 21_665_664  # 21.67M, as the official ViT-S/16
    assert abs(count(base) - 85.8e6) < 0.05e6
    assert count(tiny) == pytest.approx(5.52e6, rel=0.01)
    assert (small.embed_dim, small.num_heads, len(small.blocks)) == (384, 6, 12)
    assert small.norm.eps == 1e-6 and small.blocks[0].attn.qkv.bias is not None
    assert small.blocks[0].attn.scale == 0.125
    assert vit_tiny(patch_size=8, in_chans=1, img_size=32).pos_embed.shape == (1, 17, 192)


def test_official_init():
    torch.manual_seed(0)
    model = VisionTransformer(embed_dim=96, depth=2, num_heads=3, qkv_bias=True)
    for name, p in model.named_parameters():
        if name.endswith("bias") and "norm" not in name and "patch_embed" not in name:
            assert torch.equal(p, torch.zeros_like(p)), name
    assert model.blocks[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.equal(model.norm.weight, torch.ones(96)) and torch.equal(model.norm.bias, torch.zeros(96))
    # The patch conv keeps PyTorch's default kaiming-uniform: U(+-1/sqrt(fan_in)), std bound/sqrt(3).
    bound = 1 / math.sqrt(3 * 16 * 16)
    w = model.patch_embed.proj.weight
    assert w.abs().max() <= bound and w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert model.patch_embed.proj.bias.abs().max() > 0


def test_drop_path_rates():
    model = small_vit(depth=4, drop_path_rate=0.3)
    assert isinstance(model.blocks[0].drop_path, nn.Identity)
    rates = [b.drop_path.drop_prob for b in model.blocks[1:]]
    assert rates == pytest.approx([0.1, 0.2, 0.3])
    dp = DropPath(0.5).train()
    x = torch.ones(1000, 4)
    y = dp(x)
    assert set(torch.unique(y).tolist()) <= {0.0, 2.0} and torch.all(y == y[:, :1])
    assert 0.4 < (y[:, 0] > 0).float().mean() < 0.6
    assert torch.equal(dp.eval()(x), x)


def test_interpolation_is_the_official_scale_factor_form():
    model = small_vit()
    x = torch.zeros(1, 37, 48)  # tokens of a 96 x 96 image: 6 x 6 patches
    pos = model.interpolate_pos_encoding(x, 96, 96)
    grid = model.pos_embed[:, 1:].reshape(1, 14, 14, 48).permute(0, 3, 1, 2)
    by_scale = F.interpolate(grid, scale_factor=(6.1 / 14, 6.1 / 14), mode="bicubic")
    by_size = F.interpolate(grid, size=(6, 6), mode="bicubic")
    flat = by_scale.permute(0, 2, 3, 1).reshape(1, 36, 48)
    assert torch.equal(pos[:, 1:], flat) and torch.equal(pos[:, :1], model.pos_embed[:, :1])
    assert (by_scale - by_size).abs().max() > 1e-3  # the two forms really differ
    # Same patch count and a square image: the stored table itself.
    assert model.interpolate_pos_encoding(torch.zeros(1, 197, 48), 224, 224) is model.pos_embed
    # Same patch count, non-square pixels (224 x 230): official still interpolates.
    assert model.interpolate_pos_encoding(torch.zeros(1, 197, 48), 224, 230) is not model.pos_embed


def test_official_state_dict_with_prefixes_loads_strictly():
    from dino_pytorch.checkpoint import strip_prefixes

    source = randomise(small_vit(), seed=3)
    official = {f"module.backbone.{k}": v.clone() for k, v in source.state_dict().items()}
    target = small_vit()
    target.load_state_dict(strip_prefixes(official), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(target.eval()(x), source(x))


def test_intermediate_layers_and_attention_values(model):
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        layers = model.get_intermediate_layers(x, n=2)
        assert torch.allclose(layers[-1][:, 0], model(x), atol=1e-6)
        attn = model.get_last_selfattention(x)
    assert attn.shape == (2, HEADS, 10, 10) and (attn >= 0).all()
    with pytest.raises(ValueError, match="n=3"):
        model.get_intermediate_layers(x, n=3)


def test_bad_inputs():
    model = small_vit(img_size=32, patch_size=8)
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\)"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="patch_size=8"):
        model(torch.randn(2, 3, 4, 32))
    with pytest.raises(ValueError, match="num_heads=5"):
        VisionTransformer(embed_dim=48, num_heads=5)
    with pytest.raises(ValueError, match="patch_size=0"):
        VisionTransformer(patch_size=0)
    with pytest.raises(ValueError, match="img_size"):
        VisionTransformer(img_size=(224, 160))
    with pytest.raises(ValueError, match="drop_path_rate=1.5"):
        VisionTransformer(embed_dim=48, num_heads=3, depth=1, drop_path_rate=1.5)
    assert VisionTransformer(img_size=[32], patch_size=8, embed_dim=48, depth=1, num_heads=3).pos_embed.shape[1] == 17


def test_registry():
    names = list_models()
    assert {"vit_tiny", "vit_small", "vit_base", "convnet", "resnet18", "resnet50"} <= set(names)
    vit = create_model("vit_tiny", patch_size=8, in_chans=1, img_size=32, depth=1)
    assert isinstance(vit, VisionTransformer) and vit.patch_size == 8 and len(vit.blocks) == 1
    assert isinstance(create_model("convnet", width=8), ConvNet)
    resnet = create_model("resnet18")
    assert type(resnet).__name__ == "ResNet" and resnet.fc.in_features == 512
    with pytest.raises(ValueError, match="unknown model name 'vit_huge'.*vit_small.*timm:<name>"):
        create_model("vit_huge")
    with pytest.raises(TypeError, match="name"):
        create_model(3)


def test_registry_timm(monkeypatch):
    model = create_model("timm:resnet10t", num_classes=0).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 512)
    with pytest.raises(ValueError, match="no model named 'not_a_model'"):
        create_model("timm:not_a_model")
    monkeypatch.setitem(__import__("sys").modules, "timm", None)
    with pytest.raises(ImportError, match="pip install timm"):
        create_model("timm:resnet10t")
