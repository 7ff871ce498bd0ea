import matplotlib.image  # noqa: E402  (matplotlib: the [dev]/[train] extras)
import pytest
import torch
import torch.nn.functional as F

from dino_pytorch.attention import (  # noqa: E402
    attention_maps,
    save_attention_pngs,
    save_dataset_attention_maps,
    threshold_masks,
    upsample,
)
from dino_pytorch.models import vit_tiny  # noqa: E402
from reference_vit import reference_vit


def tiny_vit(in_chans=3):
    torch.manual_seed(0)
    return vit_tiny(patch_size=8, img_size=32, in_chans=in_chans, embed_dim=24, depth=2)


def naive_masks(attn, threshold):
    """Per head: the top values, largest first, until they hold `threshold` of the head's mass."""
    heads = []
    for head in attn.flatten(1).double():
        total, kept, mask = head.sum(), 0.0, torch.zeros(head.numel(), dtype=torch.bool)
        for i in torch.argsort(head, descending=True).tolist():
            if kept >= threshold * total:
                break
            mask[i] = True
            kept += head[i]
        heads.append(mask)
    return torch.stack(heads).reshape(attn.shape)


# ------------------------------------------------------------------------------ masks and maps

def test_threshold_masks_known_values():
    attn = torch.tensor([[[0.5, 0.2, 0.15], [0.1, 0.05, 0.0]]])
    # Ascending cumulative mass 0, .05, .15, .30, .50, 1.0: above 0.4 are the 0.2 and the 0.5.
    assert threshold_masks(attn, 0.6).tolist() == [[[True, True, False], [False, False, False]]]
    assert threshold_masks(attn, 0.5).tolist() == [[[True, False, False], [False, False, False]]]
    assert threshold_masks(attn * 7, 0.6).equal(threshold_masks(attn, 0.6))  # unnormalised input is fine


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.9])
def test_threshold_masks_match_naive_smallest_top_set(threshold):
    attn = torch.rand(4, 6, 7, generator=torch.Generator().manual_seed(0)) ** 3
    masks = threshold_masks(attn, threshold)
    assert masks.dtype == torch.bool and masks.shape == attn.shape
    assert torch.equal(masks, naive_masks(attn, threshold))
    for head, mask in zip(attn, masks):
        share = head[mask].sum() / head.sum()
        assert share >= threshold - 1e-6
        assert share - head[mask].min() / head.sum() < threshold  # without its smallest member: too little
        assert head[mask].min() >= head[~mask].max()  # the kept patches are the top ones


def test_threshold_masks_bad_input():
    with pytest.raises(ValueError, match="threshold=1.5"):
        threshold_masks(torch.rand(1, 2, 2), 1.5)
    with pytest.raises(ValueError, match=r"expected \(heads, h, w\)"):
        threshold_masks(torch.rand(4, 4), 0.6)


def test_upsample_is_nearest_by_patch_size():
    maps = torch.rand(3, 4, 5)
    big = upsample(maps, 8)
    assert big.shape == (3, 32, 40)
    assert torch.equal(big, F.interpolate(maps[None], scale_factor=8, mode="nearest")[0])  # official
    masks = upsample(maps > 0.5, 4)
    assert masks.dtype == torch.bool and torch.equal(masks[:, ::4, ::4], maps > 0.5)


def test_attention_maps_shape_and_values():
    model = tiny_vit().train()
    with torch.no_grad():  # peaked attention (at init it is nearly uniform): values that tell rows apart
        for block in model.blocks:
            block.attn.qkv.weight.mul_(5)
    image = torch.randn(3, 37, 45)  # cropped to 32 x 40: a 4 x 5 patch grid
    maps = attention_maps(model, image)
    assert maps.shape == (3, 4, 5) and model.training  # mode restored
    with torch.no_grad():
        attn = model.eval().get_last_selfattention(image[None, :, :32, :40])
    assert torch.equal(maps, attn[0, :, 0, 1:].reshape(3, 4, 5))
    # Values: the CLS row of a naive float64 softmax(q k^T / sqrt(d)) per head of the last block,
    # computed from the model's weights (position table interpolated to the 4 x 5 grid).
    ref = reference_vit(model.state_dict(), image[None, :, :32, :40], patch_size=8, num_heads=3)["last_attention"]
    torch.testing.assert_close(maps.double(), ref[0, :, 0, 1:].reshape(3, 4, 5), rtol=1e-4, atol=5e-6)
    assert ((maps.sum(dim=(1, 2)) > 0) & (maps.sum(dim=(1, 2)) < 1)).all()
    with pytest.raises(ValueError, match="patch_size=16"):
        attention_maps(model, image, patch_size=16)
    with pytest.raises(TypeError, match="get_last_selfattention"):
        attention_maps(torch.nn.Linear(2, 2), image, 8)


def test_save_attention_pngs(tmp_path):
    model = tiny_vit()
    image = torch.randn(3, 40, 24)
    maps = attention_maps(model, image)
    written = save_attention_pngs(tmp_path / "out", image, maps, patch_size=8, threshold=0.6)
    names = sorted(p.name for p in written)
    expected = ["img.png"] + [f"attn-head{j}.png" for j in range(3)] + [f"mask_th0.6_head{j}.png" for j in range(3)]
    assert names == sorted(expected)
    for path in written:
        assert path.exists() and path.stat().st_size > 0
        assert matplotlib.image.imread(path).shape[:2] == (40, 24)
    assert len(save_attention_pngs(tmp_path / "none", image, maps, 8, threshold=None)) == 4
    with pytest.raises(ValueError, match="do not cover"):
        save_attention_pngs(tmp_path, image, maps[:, :2], 8)


def test_save_dataset_attention_maps(tmp_path):
    model = tiny_vit(in_chans=1)
    images = torch.randn(3, 1, 16, 24)
    dataset = [(img, label) for label, img in enumerate(images)]
    written = save_dataset_attention_maps(model, dataset, tmp_path, count=2, threshold=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000", "001"] and len(written) == 2 * 4
    assert len(save_dataset_attention_maps(model, images, tmp_path / "all", threshold=0.6)) == 3 * 7
