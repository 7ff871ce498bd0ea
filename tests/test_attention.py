import json

import matplotlib.image  # noqa: E402  (matplotlib: the [dev]/[train] extras)
import pytest
import torch
import torch.nn.functional as F

import dino_pytorch.attention as attention_module
from dino_pytorch.attention import (  # noqa: E402
    ForegroundShare,
    attention_maps,
    cls_attention_foreground_share,
    patch_foreground,
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


# ------------------------------------------------------------------------ attention on the object

def peaked_vit(in_chans=3):
    model = tiny_vit(in_chans)
    with torch.no_grad():  # at init attention is nearly uniform: sharpen it so shares tell patches apart
        for block in model.blocks:
            block.attn.qkv.weight.mul_(5)
    return model


def test_attention_maps_of_a_batch_are_the_per_image_maps():
    model = peaked_vit()
    images = torch.randn(3, 3, 35, 40)  # cropped to 32 x 40
    maps = attention_maps(model, images)
    assert maps.shape == (3, 3, 4, 5)
    torch.testing.assert_close(maps, torch.stack([attention_maps(model, image) for image in images]),
                               rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"expected \(C, H, W\) or \(B, C, H, W\)"):
        attention_maps(model, torch.randn(1, 1, 3, 32, 32))


def test_patch_foreground():
    pixels = torch.zeros(2, 1, 9, 12, dtype=torch.uint8)  # a 2 x 3 grid of 4 x 4 patches, one row cropped
    pixels[0, 0, 1, 1] = 7  # patch (0, 0)
    pixels[0, 0, 7, 11] = 1  # patch (1, 2)
    pixels[1, 0, 8, 0] = 255  # the cropped row: no patch
    expected = torch.tensor([[[True, False, False], [False, False, True]], [[False] * 3, [False] * 3]])
    assert torch.equal(patch_foreground(pixels, 4), expected)
    assert torch.equal(patch_foreground(pixels[:, 0], 4), expected)  # (N, H, W)
    assert torch.equal(patch_foreground(pixels != 0, 4), expected)  # a pixel mask
    rgb = torch.zeros(1, 3, 4, 8)
    rgb[0, 2, 0, 5] = -0.5  # any channel
    assert patch_foreground(rgb, 4).tolist() == [[[False, True]]]
    with pytest.raises(ValueError, match="smaller than patch_size=16"):
        patch_foreground(pixels, 16)


def naive_foreground_share(model, images, foreground):
    """Per image, float64 from the model's weights: head-mean CLS row of the last block over the
    patch keys, renormalised, summed over the foreground patches; mean over images, in percent."""
    heads = model.blocks[-1].attn.num_heads
    shares, uniform = [], []
    for image, mask in zip(images, foreground):
        attn = reference_vit(model.state_dict(), image[None], patch_size=model.patch_size, num_heads=heads)
        cls = attn["last_attention"][0, :, 0, 1:].mean(dim=0)  # (N,)
        shares.append(float((cls / cls.sum())[mask.flatten()].sum()))
        uniform.append(float(mask.double().mean()))
    return 100 * sum(shares) / len(shares), 100 * sum(uniform) / len(uniform)


def test_cls_attention_foreground_share_matches_naive_reference():
    model = peaked_vit().train()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(5, 3, 32, 40, generator=generator)
    foreground = torch.rand(5, 4, 5, generator=generator) < 0.4
    foreground[3] = False  # an image with no object: share 0, counted
    result = cls_attention_foreground_share(model, images, foreground, batch_size=2)  # batches of 2, 2, 1
    share, uniform = naive_foreground_share(model, images, foreground)
    assert isinstance(result, ForegroundShare) and model.training  # mode restored
    assert result.share == pytest.approx(share, rel=1e-5) and result.uniform == pytest.approx(uniform, rel=1e-12)
    # The peaked model is far from uniform, so a wrong patch order or a missed renormalisation shows.
    top = F.one_hot(attention_maps(model, images).mean(dim=1).flatten(1).argmax(dim=1), 20).bool().reshape(5, 4, 5)
    on_top = cls_attention_foreground_share(model, images, top)
    assert on_top.uniform == 5.0 and on_top.share > 1.25 * on_top.uniform
    everything = cls_attention_foreground_share(model, images, torch.ones(5, 4, 5, dtype=torch.bool))
    assert everything.share == pytest.approx(100.0) and everything.uniform == 100.0


def test_cls_attention_foreground_share_known_maps(monkeypatch):
    # Two images, two heads, a 1 x 2 grid. Image 0: head mean (0.2, 0.2) -> 0.5 on its left patch.
    # Image 1: head mean (0.4, 0.1) -> renormalised (0.8, 0.2), 0.2 on its right patch. Mean 35 %.
    maps = torch.tensor([[[[0.3, 0.1]], [[0.1, 0.3]]], [[[0.6, 0.2]], [[0.2, 0.0]]]])
    monkeypatch.setattr(attention_module, "attention_maps", lambda model, images, patch_size: maps[: len(images)])
    foreground = torch.tensor([[[True, False]], [[False, True]]])
    result = cls_attention_foreground_share(torch.nn.Identity(), torch.zeros(2, 1, 4, 8), foreground, 4)
    assert result.share == pytest.approx(35.0, abs=1e-12) and result.uniform == 50.0
    share, uniform = result  # unpacks as a pair
    assert (share, uniform) == (result.share, 50.0)


def test_cls_attention_foreground_share_bad_input():
    model = tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="expected bool"):
        cls_attention_foreground_share(model, images, torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match=r"expected bool \(2, H // p, W // p\)"):
        cls_attention_foreground_share(model, images, torch.ones(3, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"a \(2, 2\) patch grid, the images a \(4, 4\)"):
        cls_attention_foreground_share(model, images, torch.ones(2, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"expected \(N, C, H, W\)"):
        cls_attention_foreground_share(model, images[0], torch.ones(3, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch_size=0"):
        cls_attention_foreground_share(model, images, torch.ones(2, 4, 4, dtype=torch.bool), batch_size=0)


def test_dino_train_reports_the_share_on_the_garment(tmp_path, capsys):
    from types import SimpleNamespace

    from dino_pytorch.cli._setup import backbone_from_flags, config_from_flags, eval_datasets
    from dino_pytorch.cli.demo_report import GARMENT_IMAGES, demo_extras, garment_attention
    from dino_pytorch.cli.report_hook import ReportExtras
    from dino_pytorch.cli.train_evals import final_report
    from dino_pytorch.datasets import load_fashion_mnist

    flags = SimpleNamespace(arch="vit_tiny", patch_size=7, vit_depth=1, vit_embed_dim=24, drop_path_rate=0.0)
    config = config_from_flags(flags, "fashion_mnist", 1, 28)
    torch.manual_seed(0)
    model = backbone_from_flags(config)
    records = []
    log = SimpleNamespace(metrics=records.append)
    start = garment_attention(log, model, config, 0, random_init=True)
    # The first 1,000 test images as the k-NN sees them; the garment from their raw pixels.
    test_set = eval_datasets("fashion_mnist", None, 1, 28, subset=GARMENT_IMAGES)[1]
    images = torch.stack([test_set[i][0] for i in range(GARMENT_IMAGES)])
    garment = patch_foreground(load_fashion_mnist(False)[0][:GARMENT_IMAGES], 7)
    assert start == cls_attention_foreground_share(model, images, garment)
    assert 50 < start.uniform < 100
    assert records == [{"step": 0, "cls_foreground_share": start.share, "cls_foreground_uniform": start.uniform,
                        "random_init": True}]
    end = ForegroundShare(share=71.25, uniform=start.uniform)
    final_report(tmp_path, "vit_tiny", 40, 70.0, 60.0, demo_extras(80.0, end, start))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["cls_foreground_share"] == 71.25 and summary["cls_foreground_share_random_init"] == start.share
    assert summary["cls_foreground_share_uniform"] == start.uniform and summary["knn_top1_raw_pixels"] == 80.0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in out[1:4]] == [["raw", "pixels"], ["vit_tiny", "at"], ["vit_tiny", "after"]]
    assert out[-1] == (f"CLS attention on the garment (last block, first 1,000 test images): random init "
                       f"{start.share:.1f}% -> after DINO 71.2% (uniform {start.uniform:.1f}%)")
    convnet = config_from_flags(SimpleNamespace(arch="convnet", width=8, pool=1), "fashion_mnist", 1, 28)
    assert garment_attention(log, torch.nn.Identity(), convnet, 0) is None and len(records) == 1
    final_report(tmp_path, "convnet", 40, 70.0, None, ReportExtras())  # no hook: the k-NN table alone
    assert "garment" not in capsys.readouterr().out
    assert "cls_foreground_share" not in (tmp_path / "summary.json").read_text()
