"""as_masked_vit: DINOv2's forward_features(x, masks) for our v1 ViT and timm ViTs. Without masks the
features are bit for bit the model's own; masked patches equal a hand-made replacement by the mask
token; gradients reach the mask token and the wrapped model; DINO(ibot=) trains with it."""
from __future__ import annotations

import pytest
import timm  # the [dev] extra, which `make test` installs
import torch
from torch import nn

from dino_pytorch import DINO, IBOTConfig
from dino_pytorch.models import MaskedViT, as_masked_vit, dinov2_vit_small, strip_masked_vit, vit_tiny

D_OURS, D_TIMM = 32, 192
KEYS = {"x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm", "masks"}


def ours(seed=0):
    torch.manual_seed(seed)
    return vit_tiny(img_size=32, patch_size=8, embed_dim=D_OURS, depth=2, num_heads=2)


def timm_vit(seed=0, **kw):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, **kw)


TIMM_KINDS = {
    "plain": {},
    "registers": dict(reg_tokens=4, no_embed_class=True, dynamic_img_size=True),
    "no_class_token": dict(class_token=False, global_pool="avg", reg_tokens=2),  # fc_norm after pooling
}


def own_features(model, x):
    """The model's own (B, D) features: our ViT's forward, timm's pre-logits head on its features."""
    if isinstance(model, nn.Module) and hasattr(model, "forward_head"):
        return model.forward_head(model.forward_features(x), pre_logits=True)
    return model(x)


def own_tokens(model, x):
    """The model's own ((B, D) features, (B, N, D) final-normed patch tokens)."""
    if hasattr(model, "forward_head"):  # timm; a model that norms after pooling norms each token with fc_norm
        tokens = model.forward_features(x)
        patches = tokens[:, model.num_prefix_tokens:]
        if isinstance(model.norm, nn.Identity):
            patches = model.fc_norm(patches)
        return model.forward_head(tokens, pre_logits=True), patches
    normed = model.get_intermediate_layers(x)[0]
    return normed[:, 0], normed[:, 1:]


def by_hand(adapter, x, masks):
    """The masked features computed the long way: the model's own forward with patch_embed's output
    replaced at the masked positions (a forward hook), so nothing of the adapter's code runs.
    Returns (features (B, D), patch tokens (B, N, D))."""
    model = adapter.vit

    def replace(module, inputs, out):
        flat = out.reshape(out.shape[0], -1, out.shape[-1]).clone()
        flat[masks] = adapter.mask_token[0]
        return flat.view(out.shape)

    handle = model.patch_embed.register_forward_hook(replace)
    try:
        return own_tokens(model, x)
    finally:
        handle.remove()


def all_models():
    yield "ours", ours(), 8, D_OURS
    for name, kw in TIMM_KINDS.items():
        yield name, timm_vit(**kw), 16, D_TIMM


@pytest.mark.parametrize("case", ["ours", *TIMM_KINDS])
def test_no_masks_is_the_models_own_features_bit_for_bit(case):
    model = ours() if case == "ours" else timm_vit(**TIMM_KINDS[case])
    model.eval()
    adapter = as_masked_vit(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = own_features(model, x)
        assert torch.equal(adapter(x), ref)
        out = adapter.forward_features(x)
        assert torch.equal(out["x_norm_clstoken"], ref)
        assert torch.equal(out["x_norm_patchtokens"], own_tokens(model, x)[1])
        none_masked = torch.zeros(3, out["x_norm_patchtokens"].shape[1], dtype=torch.bool)
        assert torch.equal(adapter.forward_features(x, masks=none_masked)["x_norm_clstoken"], ref)


def test_shapes_of_every_key_and_attributes():
    x = torch.randn(2, 3, 32, 32)
    regs = {"ours": 0, "plain": 0, "registers": 4, "no_class_token": 2}
    prefix = {"ours": 1, "plain": 1, "registers": 5, "no_class_token": 2}
    for name, model, patch, dim in all_models():
        adapter = as_masked_vit(model)
        n = (32 // patch) ** 2
        masks = torch.zeros(2, n, dtype=torch.bool)
        masks[0, 1] = True
        out = adapter.forward_features(x, masks=masks)
        assert set(out) == KEYS and out["masks"] is masks, name
        assert out["x_norm_clstoken"].shape == (2, dim)
        assert out["x_norm_regtokens"].shape == (2, regs[name], dim)
        assert out["x_norm_patchtokens"].shape == (2, n, dim)
        assert out["x_prenorm"].shape == (2, prefix[name] + n, dim)
        assert (adapter.patch_size, adapter.embed_dim, adapter.in_chans) == (patch, dim, 3)
        assert isinstance(adapter.patch_size, int) and adapter.num_register_tokens == regs[name]
        assert adapter.mask_token.shape == (1, dim) and not adapter.mask_token.any()  # DINOv2's init: zeros
        lists = adapter.forward_features([x, x[:1]], masks=[masks, None])
        assert torch.equal(lists[0]["x_norm_patchtokens"], out["x_norm_patchtokens"])


@pytest.mark.parametrize("case", ["ours", *TIMM_KINDS])
def test_masked_patches_equal_replacing_the_embeddings_by_hand(case):
    model = ours() if case == "ours" else timm_vit(**TIMM_KINDS[case])
    model.eval()
    adapter = as_masked_vit(model)
    with torch.no_grad():
        adapter.mask_token.normal_()  # not the trivial zeros
    x = torch.randn(3, 3, 32, 32)
    n = adapter.forward_features(x)["x_norm_patchtokens"].shape[1]
    masks = torch.rand(3, n, generator=torch.Generator().manual_seed(0)) < 0.5
    masks[0, 0], masks[1, 0] = True, False
    with torch.no_grad():
        out = adapter.forward_features(x, masks=masks)
        cls, patches = by_hand(adapter, x, masks)
        assert torch.equal(out["x_norm_clstoken"], cls)
        assert torch.equal(out["x_norm_patchtokens"], patches)
        assert not torch.allclose(out["x_norm_clstoken"], adapter(x), atol=1e-3)  # the masks matter


def test_our_vit_at_other_sizes_uses_its_own_interpolation():
    model = ours().eval()
    adapter = as_masked_vit(model)
    for size in ((48, 48), (24, 40)):
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            assert torch.equal(adapter(x), model(x))
        assert adapter.forward_features(x)["x_norm_patchtokens"].shape[1] == (size[0] // 8) * (size[1] // 8)
    dynamic = timm_vit(**TIMM_KINDS["registers"]).eval()  # timm's dynamic_img_size
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        assert torch.equal(as_masked_vit(dynamic)(x), own_features(dynamic, x))


@pytest.mark.parametrize("case", ["ours", "registers"])
def test_gradients_reach_the_mask_token_and_the_wrapped_model(case):
    model = ours() if case == "ours" else timm_vit(**TIMM_KINDS[case])
    adapter = as_masked_vit(model)
    x = torch.randn(2, 3, 32, 32)
    n = adapter.forward_features(x)["x_norm_patchtokens"].shape[1]
    masks = torch.zeros(2, n, dtype=torch.bool)
    masks[:, 0] = True
    out = adapter.forward_features(x, masks=masks)
    (out["x_norm_clstoken"].square().sum() + out["x_norm_patchtokens"].square().sum()).backward()
    assert adapter.mask_token.grad is not None and adapter.mask_token.grad.abs().sum() > 0
    assert model.patch_embed.proj.weight.grad is not None and model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_parameters_are_shared_and_keys_sit_under_vit():
    model = ours()
    adapter = as_masked_vit(model)
    assert adapter.vit is model
    assert all(any(p is q for q in adapter.parameters()) for p in model.parameters())
    keys = set(adapter.state_dict())
    assert keys == {"vit." + k for k in model.state_dict()} | {"mask_token"}
    plain = strip_masked_vit(adapter.state_dict())
    assert set(plain) == set(model.state_dict())
    fresh = ours(seed=1)
    fresh.load_state_dict(plain)  # the plain model's layout, strict
    dino_style = strip_masked_vit({"backbone." + k: v for k, v in adapter.state_dict().items()} | {"head.w": 1},
                                  prefix="backbone.")
    assert set(dino_style) == {"backbone." + k for k in model.state_dict()} | {"head.w"}


def test_as_masked_vit_keeps_what_already_has_the_call_and_refuses_the_rest():
    v2 = dinov2_vit_small(img_size=28, patch_size=14, embed_dim=32, depth=1, num_heads=2)
    assert as_masked_vit(v2) is v2
    adapter = as_masked_vit(ours())
    assert as_masked_vit(adapter) is adapter and isinstance(adapter, MaskedViT)
    with pytest.raises(TypeError, match="as_masked_vit takes .* got Linear"):
        as_masked_vit(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="patch_drop_rate > 0"):
        as_masked_vit(timm_vit(patch_drop_rate=0.5))
    with pytest.raises(ValueError, match=r"masks is \(2, 3\) torch.bool, expected a bool tensor of shape \(2, 16\)"):
        adapter.forward_features(torch.randn(2, 3, 32, 32), masks=torch.zeros(2, 3, dtype=torch.bool))


def _train_two_steps(backbone, local_size):
    dino = DINO(backbone, out_dim=16, hidden_dim=32, bottleneck_dim=16, input_size=(3, 32, 32),
                ibot=IBOTConfig(out_dim=32, mask_probability=1.0))
    opt = torch.optim.SGD([p for p in dino.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        views = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(2)]
        views += [torch.randn(2, 3, local_size, local_size, generator=g) for _ in range(2)]
        loss = dino(views)
        opt.zero_grad()
        loss.backward()
        dino.optimizer_step(opt)
        dino.update_teacher()
        assert torch.isfinite(loss) and "ibot_loss" in dino.loss_parts
        assert torch.isfinite(dino.loss_parts["ibot_loss"])
    return dino


@pytest.mark.parametrize("case", ["ours", "registers"])
def test_dino_with_ibot_trains_through_the_adapter(case):
    model = ours() if case == "ours" else timm_vit(**TIMM_KINDS[case])
    adapter = as_masked_vit(model)
    before = adapter.mask_token.detach().clone()
    dino = _train_two_steps(adapter, 16)
    assert not torch.equal(before, adapter.mask_token.detach())  # the mask token learns
    assert "student.backbone.mask_token" in dino.state_dict()


def test_dino_without_the_adapter_names_it_in_one_line():
    for model in (timm_vit(), ours()):
        with pytest.raises(TypeError, match="as_masked_vit") as info:
            DINO(model, out_dim=16, input_size=(3, 32, 32), ibot=IBOTConfig(out_dim=32))
        assert "\n" not in str(info.value) and "dino_pytorch.models.as_masked_vit" in str(info.value)
