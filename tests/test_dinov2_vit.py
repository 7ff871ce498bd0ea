"""DinoVisionTransformer against the official DINOv2 model (tests/reference_dinov2_vit.py, a credited
copy), and DINOv2 weights both ways: released files, chunked training checkpoints, our export."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from dino_pytorch.checkpoint import CheckpointError
from dino_pytorch.features import as_feature_extractor, first_conv_channels, infer_feature_dim
from dino_pytorch.models import (
    DinoVisionTransformer,
    create_model,
    dinov2_backbone_state_dict,
    dinov2_vit_base,
    dinov2_vit_large,
    dinov2_vit_small,
    list_models,
    load_dinov2_state_dict,
    to_dinov2_state_dict,
)
from dino_pytorch.models.dinov2_layers import LayerScaleBlock, subset_residual

with warnings.catch_warnings():  # the copy keeps no xFormers warnings, but be safe
    warnings.simplefilter("ignore")
    import reference_dinov2_vit as official

KEYS = ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm")
WIDTH = {"small": (384, 6), "base": (768, 12), "large": (1024, 16)}
OURS = {"small": dinov2_vit_small, "base": dinov2_vit_base, "large": dinov2_vit_large}


def released(registers: int) -> dict:
    """The settings of the released models (DINOv2's hub): init_values 1.0, no chunks; _reg: 4 registers."""
    extra = dict(interpolate_antialias=True, interpolate_offset=0.0) if registers else {}
    return dict(patch_size=14, img_size=518, init_values=1.0, block_chunks=0, num_register_tokens=registers, **extra)


def _randomise(model, seed):
    """Random weights with the scales of a trained model, so a misplaced parameter shows: gains
    (LayerNorm weights, layer-scale) around 1, everything else (mask token included) around 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = name.endswith(("norm1.weight", "norm2.weight", "gamma")) or name == "norm.weight"
            p.copy_((1.0 if gain else 0.0) + (0.2 if gain else 0.05) * torch.randn(p.shape, generator=g))


def official_vit(size="small", registers=0, depth=None, seed=0, official_init=False, **kwargs):
    """The official model with the released settings and random weights under ``seed``: DINOv2's
    own init then perturbed (``official_init``), or built on the meta device and filled at random
    (fast: no truncated-normal init of weights that are overwritten anyway)."""
    torch.manual_seed(seed)
    settings = {**released(registers), **kwargs}
    if depth is not None:
        width, heads = WIDTH[size]
        settings = {"embed_dim": width, "num_heads": heads, "depth": depth, **settings}
    build = {"small": official.vit_small, "base": official.vit_base, "large": official.vit_large}[size] \
        if depth is None else official.DinoVisionTransformer
    if official_init:
        model = build(**settings)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    else:
        with torch.device("meta"):
            model = build(**settings)
        model = model.to_empty(device="cpu")
        _randomise(model, seed + 1)
    return model.eval()


def ours_like(size="small", registers=0, depth=None, meta=False, **kwargs):
    """Ours with the released settings; ``meta``: unallocated, to be loaded with ``assign=True``."""
    extra = {} if depth is None else {"depth": depth}
    with torch.device("meta" if meta else "cpu"):
        model = OURS[size](**{**released(registers), **extra, **kwargs})
    return model.eval()


def max_differences(a: dict, b: dict) -> dict:
    """{key: (max abs difference, max abs difference / max abs value)} over the feature tensors."""
    out = {}
    for key in KEYS:
        if a[key].numel():
            diff = (a[key] - b[key]).abs().max().item()
            out[key] = (diff, diff / a[key].abs().max().item())
    return out


def assert_same_features(theirs, ours, x, masks=None):
    with torch.no_grad():
        a, b = theirs.forward_features(x, masks=masks), ours.forward_features(x, masks=masks)
    for key, (abs_diff, rel_diff) in max_differences(a, b).items():
        assert abs_diff <= 1e-5 * max(1.0, a[key].abs().max().item()), (key, abs_diff, rel_diff)
    assert b["masks"] is masks
    assert b["x_norm_regtokens"].shape == (x.shape[0], ours.num_register_tokens, ours.embed_dim)


def load_both_ways(theirs, ours):
    """Official -> ours with a plain load_state_dict, and ours -> official in the released layout."""
    ours.load_state_dict({k: v.clone() for k, v in theirs.state_dict().items()}, strict=True,
                         assign=ours.pos_embed.is_meta)
    exported = to_dinov2_state_dict(ours)
    assert list(exported) == list(theirs.state_dict())  # same names, same order
    theirs.load_state_dict(exported, strict=True)
    for key, value in theirs.state_dict().items():
        assert torch.equal(value, exported[key]), key


# ---------------------------------------------------------------- the released ViT-S/14


@pytest.mark.slow
@pytest.mark.parametrize("registers", [0, 4])
def test_released_vit_s14_agrees_with_official_at_518_and_224(registers):
    theirs, ours = official_vit("small", registers, official_init=True), ours_like("small", registers)
    load_both_ways(theirs, ours)
    g = torch.Generator().manual_seed(2)
    for size in (518, 224):  # 518: the stored 37x37 grid; 224: 16x16, interpolated
        assert_same_features(theirs, ours, torch.randn(1, 3, size, size, generator=g))


@pytest.mark.parametrize("registers", [0, 4])
def test_depth2_vit_s14_agrees_with_official_at_518_and_224_with_masks(registers):
    theirs, ours = official_vit("small", registers, depth=2), ours_like("small", registers, depth=2, meta=True)
    load_both_ways(theirs, ours)
    g = torch.Generator().manual_seed(3)
    assert_same_features(theirs, ours, torch.randn(1, 3, 518, 518, generator=g))
    x224 = torch.randn(2, 3, 224, 224, generator=g)
    masks = torch.rand(2, 256, generator=g) < 0.4  # iBOT-style: ~40% of the patches masked
    assert_same_features(theirs, ours, x224, masks)
    with torch.no_grad():  # forward: the CLS features, through the Identity head; is_training: the dict
        features = ours(x224, masks, is_training=True)
        assert torch.equal(ours(x224, masks), features["x_norm_clstoken"])


def test_masked_patches_take_the_mask_token_before_the_positions():
    ours = ours_like("small", 4, depth=1)
    with torch.no_grad():
        ours.mask_token.normal_()
        x = torch.randn(2, 3, 56, 70)  # a 4 x 5 grid: non-square, interpolated
        masks = torch.zeros(2, 20, dtype=torch.bool)
        masks[0, [0, 7, 19]] = True
        masks[1, 3] = True
        plain, masked = ours.prepare_tokens_with_masks(x), ours.prepare_tokens_with_masks(x, masks)
        pos = ours.interpolate_pos_encoding(plain[:, [0, *range(5, 25)]], 56, 70)[:, 1:]
    patches_plain, patches_masked = plain[:, 5:], masked[:, 5:]
    expected = torch.where(masks.unsqueeze(-1), ours.mask_token + pos, patches_plain)
    assert torch.equal(patches_masked, expected)
    assert torch.equal(masked[:, :5], plain[:, :5])  # CLS and registers untouched


@pytest.mark.parametrize("registers", [0, 4])
def test_registers_have_no_position(registers):
    ours = ours_like("small", registers, depth=1, img_size=56)
    assert ours.pos_embed.shape == (1, 1 + 16, 384)  # CLS + patches only, whatever R
    with torch.no_grad():
        if registers:
            ours.register_tokens.normal_()
        tokens = ours.prepare_tokens_with_masks(torch.randn(2, 3, 56, 56))
    assert tokens.shape == (2, 1 + registers + 16, 384)
    assert torch.equal(tokens[:, 0], (ours.cls_token + ours.pos_embed[:, :1]).expand(2, 1, -1)[:, 0])
    if registers:
        assert torch.equal(tokens[:, 1:1 + registers], ours.register_tokens.expand(2, -1, -1))
    else:
        assert ours.register_tokens is None and "register_tokens" not in ours.state_dict()


@pytest.mark.parametrize("offset,antialias", [(0.1, False), (0.0, True), (0.0, False), (0.1, True)])
def test_position_interpolation_is_dinov2s_bit_for_bit(offset, antialias):
    theirs = official_vit("small", depth=1, interpolate_offset=offset, interpolate_antialias=antialias)
    ours = ours_like("small", depth=1, meta=True, interpolate_offset=offset, interpolate_antialias=antialias)
    ours.load_state_dict(theirs.state_dict(), assign=True)
    for rows, cols in [(16, 16), (37, 37), (7, 7), (37, 20), (50, 60)]:
        tokens = torch.zeros(1, 1 + rows * cols, 384)
        expected = theirs.interpolate_pos_encoding(tokens, rows * 14, cols * 14)
        assert torch.equal(ours.interpolate_pos_encoding(tokens, rows * 14, cols * 14), expected), (rows, cols)


# --------------------------------------------------------------------- B/14 and L/14


@pytest.mark.parametrize("size", ["base", "large"])
@pytest.mark.parametrize("registers", [0, 4])
def test_full_size_b14_and_l14_have_the_released_key_layout(size, registers):
    # On the meta device: names, order and shapes of 86M / 304M parameters without allocating them.
    with torch.device("meta"):
        theirs = {"base": official.vit_base, "large": official.vit_large}[size](**released(registers))
        ours = OURS[size](**released(registers))
    expected = {k: v.shape for k, v in theirs.state_dict().items()}
    exported = to_dinov2_state_dict(ours)
    assert list(exported) == list(expected)
    assert {k: v.shape for k, v in exported.items()} == expected
    load_dinov2_state_dict(ours, theirs.state_dict())  # strict: raises on any mismatch


@pytest.mark.parametrize("size", ["base", "large"])
def test_depth2_b14_and_l14_agree_with_official_at_224(size):
    theirs, ours = official_vit(size, 4, depth=2), ours_like(size, 4, depth=2, meta=True)
    load_both_ways(theirs, ours)
    assert_same_features(theirs, ours, torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4)))


# ------------------------------------------------------------------ training checkpoints


def test_a_chunked_training_checkpoint_loads_teacher_or_student_and_exports_back():
    chunked = dict(depth=4, embed_dim=64, num_heads=4, block_chunks=2)
    teacher = official_vit("small", 4, seed=5, **chunked)
    student = official_vit("small", 4, seed=6, **chunked)
    assert any(k.startswith("blocks.1.3.") for k in teacher.state_dict())  # DINOv2's chunk layout
    model = {f"{role}.backbone.{k}": v for role, m in (("teacher", teacher), ("student", student))
             for k, v in m.state_dict().items()}
    model["teacher.dino_head.mlp.0.weight"] = torch.zeros(8, 64)
    model["student.ibot_head.mlp.0.weight"] = torch.zeros(8, 64)
    checkpoint = {"model": model, "iteration": 12}
    ours = dinov2_vit_small(embed_dim=64, num_heads=4, depth=4, **{**released(4), "block_chunks": 2}).eval()
    x = torch.randn(1, 3, 112, 112)
    for role, reference in (("teacher", teacher), ("student", student)):
        load_dinov2_state_dict(ours, checkpoint, which=role)
        assert_same_features(reference, ours, x)
    # The eval checkpoint (teacher_checkpoint.pth) and DDP's module. prefix.
    eval_checkpoint = {"teacher": {f"module.backbone.{k}": v for k, v in teacher.state_dict().items()}}
    load_dinov2_state_dict(ours, eval_checkpoint)
    assert_same_features(teacher, ours, x)
    # Ours back into the chunked layout of a training checkpoint.
    exported = to_dinov2_state_dict(ours, block_chunks=2, prefix="teacher.backbone.")
    fresh = official_vit("small", 4, seed=7, **chunked)
    fresh.load_state_dict({k[len("teacher.backbone."):]: v for k, v in exported.items()}, strict=True)
    assert_same_features(fresh, ours, x)


def test_a_saved_file_loads_by_path_and_a_mismatch_names_the_fix(tmp_path):
    theirs = official_vit("small", 0, depth=2)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(theirs.state_dict(), path)
    ours = ours_like("small", 0, depth=2)
    load_dinov2_state_dict(ours, path)
    assert torch.equal(ours.blocks[1].ls2.gamma, theirs.blocks[1].ls2.gamma)
    with pytest.raises(CheckpointError, match=r"unexpected.*init_values=1\.0"):
        load_dinov2_state_dict(dinov2_vit_small(depth=2), path)  # init_values=None: no layer-scale
    with pytest.raises(CheckpointError, match=r"num_register_tokens=0, depth=2"):
        load_dinov2_state_dict(ours_like("small", 4, depth=3, meta=True), path)
    with pytest.raises(CheckpointError, match="no student weights"):
        load_dinov2_state_dict(ours, {"teacher.backbone.cls_token": torch.zeros(1, 1, 384)}, which="student")
    state = dinov2_backbone_state_dict({"model": {"teacher.backbone.blocks.0.0.norm1.weight": torch.ones(3)}})
    assert list(state) == ["blocks.0.norm1.weight"]


# ------------------------------------------------------------------- the model itself


def test_init_is_dinov2s_and_layer_scale_is_optional():
    torch.manual_seed(0)
    model = dinov2_vit_small(depth=2, num_register_tokens=4, init_values=1e-5)
    assert torch.equal(model.mask_token, torch.zeros(1, 384))
    assert 0 < model.cls_token.std() < 1e-5 and 0 < model.register_tokens.std() < 1e-5
    assert abs(model.pos_embed.std().item() - 0.02) < 1e-3
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 1e-3
    assert torch.equal(model.blocks[1].mlp.fc2.bias, torch.zeros(384))
    assert torch.equal(model.blocks[0].ls1.gamma, torch.full((384,), 1e-5))
    for init_values in (None, 0):  # DINOv2: no layer-scale, no gamma keys
        plain = dinov2_vit_small(depth=1, init_values=init_values)
        assert isinstance(plain.blocks[0].ls1, torch.nn.Identity)
        assert not any("gamma" in k for k in plain.state_dict())


@pytest.mark.parametrize("flags", [dict(qkv_bias=False), dict(ffn_bias=False, proj_bias=False), {}])
def test_bias_flags_give_dinov2s_keys(flags):
    with torch.device("meta"):
        theirs = official.DinoVisionTransformer(embed_dim=48, depth=2, num_heads=3, init_values=1.0, block_chunks=0,
                                                **flags)
        ours = DinoVisionTransformer(embed_dim=48, depth=2, num_heads=3, init_values=1.0, **flags)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_intermediate_layers_and_attention_follow_dinov2():
    theirs, ours = official_vit("small", 4, depth=2), ours_like("small", 4, depth=2, meta=True)
    ours.load_state_dict(theirs.state_dict(), assign=True)
    x = torch.randn(2, 3, 56, 42)
    with torch.no_grad():
        for kwargs in (dict(n=2), dict(n=[0], reshape=True, return_class_token=True), dict(n=1, norm=False)):
            for a, b in zip(theirs.get_intermediate_layers(x, **kwargs), ours.get_intermediate_layers(x, **kwargs)):
                for ta, tb in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
                    assert torch.allclose(ta, tb, atol=1e-6), kwargs
        attention = ours.get_last_selfattention(x)
    assert attention.shape == (2, 6, 1 + 4 + 12, 1 + 4 + 12)
    assert torch.allclose(attention.sum(-1), torch.ones(()), atol=1e-5)
    with pytest.raises(ValueError, match="n=3"):
        ours.get_intermediate_layers(x, n=3)


def test_a_list_of_crops_gives_one_result_each():
    ours = ours_like("small", 4, depth=1)
    crops = [torch.randn(2, 3, 56, 56), torch.randn(3, 3, 28, 28)]
    masks = [torch.zeros(2, 16, dtype=torch.bool), None]
    with torch.no_grad():
        out = ours.forward_features(crops, masks)
        assert [o["x_norm_patchtokens"].shape[:2] for o in out] == [(2, 16), (3, 4)]
        assert torch.equal(out[1]["x_norm_clstoken"], ours(crops[1]))


def test_drop_path_is_dinov2s_per_sample_or_subset_rule():
    torch.manual_seed(0)
    x = torch.zeros(10, 3, 4)
    out = subset_residual(x, lambda t: torch.ones_like(t), rate=0.4)  # keeps int(10 * 0.6) = 6 samples
    changed = out.flatten(1).any(dim=1)
    assert changed.sum() == 6 and torch.all(out[changed] == 10 / 6)
    model = dinov2_vit_small(depth=3, embed_dim=48, num_heads=3, drop_path_rate=0.15, init_values=1.0)
    assert [b.drop_path_rate for b in model.blocks] == np.linspace(0, 0.15, 3).tolist()  # DINOv2's rates
    block: LayerScaleBlock = model.blocks[2]
    tokens = torch.randn(4, 5, 48)
    with torch.no_grad():
        mid = tokens + block.attention_branch(tokens)
        assert torch.equal(block.eval()(tokens), mid + block.mlp_branch(mid))
    model.train()(torch.randn(4, 3, 28, 28)).sum().backward()  # rates 0, 0.075 (per sample), 0.15 (subset)
    assert model.blocks[0].mlp.fc1.weight.grad is not None


def test_a_drop_in_backbone_for_dino():
    model = create_model("dinov2_vit_small", depth=1, embed_dim=48, num_heads=3, img_size=56, in_chans=2)
    assert {"dinov2_vit_small", "dinov2_vit_base", "dinov2_vit_large"} <= set(list_models())
    assert (model.embed_dim, model.num_features, model.patch_size, model.in_chans) == (48, 48, 14, 2)
    features = as_feature_extractor(model)
    assert features is model and first_conv_channels(features) == 2
    assert infer_feature_dim(features) == 48


@pytest.mark.parametrize("call,match", [
    (lambda m: m(torch.randn(1, 3, 96, 96)), r"multiples of patch_size=14"),
    (lambda m: m(torch.randn(1, 3, 56, 56), torch.zeros(1, 15, dtype=torch.bool)), r"shape \(1, 16\)"),
    (lambda m: m(torch.randn(1, 3, 56, 56), torch.zeros(1, 16)), r"bool tensor"),
    (lambda m: m(torch.randn(1, 1, 56, 56)), r"expected \(B, 3, H, W\)"),
])
def test_bad_inputs_say_what_was_expected(call, match):
    with pytest.raises(ValueError, match=match):
        call(dinov2_vit_small(depth=1, embed_dim=48, num_heads=3, img_size=56))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(init_values=-1.0), ValueError, "init_values"), (dict(num_register_tokens=-1), ValueError, "num_register"),
    (dict(interpolate_antialias=1), TypeError, "interpolate_antialias"), (dict(ffn_layer="swiglu"), ValueError, "mlp"),
    (dict(drop_path_rate=1.0), ValueError, "drop_path_rate"), (dict(embed_dim=50), ValueError, "divisible"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        dinov2_vit_small(depth=1, **{"embed_dim": 48, "num_heads": 3, **kwargs})
