"""N-channel (band) images through both augmenters: the multi-crop recipe for any channel count.

Band images are float tensors in [0, 1], (C, H, W) for MultiCropTransform and (B, C, H, W) for
BatchedMultiCrop, with len(mean) == C.  The recipe for C channels (docs/augmentation.md, "N-channel
images"): crop, flip, blur, brightness and solarize on every band; contrast blends each band with its
own mean (the mean luma for C = 3); saturation, hue and grayscale only for C = 3, their draws still
taken.  References are naive float64 computations; tolerances are justified where they are set.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms.v2 import functional as TF

from augment_cases import ALL_OFF
from dino_pytorch import DINO
from dino_pytorch.augment import BatchedMultiCrop, MultiCropRecipe, MultiCropTransform, ViewParams, stack_images
from dino_pytorch.models import ConvNet

# Default recipes for C not in {1, 3} keep saturation, hue and grayscale on, which warns once; the
# warning itself is tested below.
pytestmark = pytest.mark.filterwarnings("ignore:.*need 3-channel images:UserWarning")

BANDS = [1, 4, 13]
SMALL = dict(global_crop_size=12, local_crop_size=6, local_crops_number=2)
# The float kernels sum float32 products of the same weights and pixels in both augmenters and for
# any channel count, but BLAS may block the sums differently per batch or channel count: a few ULP of
# values up to 1 / std = 4, so 1e-5 holds with margin, while a different crop, op or parameter moves
# a view by 1e-2 or more (one grey level / std is 0.016).
ATOL = 1e-5
# PIL's ITU-R 601-2 luma, the grey level of contrast for C = 3.
LUMA = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)


def stats(c):
    """Distinct per-band statistics, so a band mixed up with another shows."""
    return tuple(torch.linspace(0.2, 0.6, c).tolist()), tuple(torch.linspace(0.2, 0.3, c).tolist())


def recipe(c, same_stats=False, **overrides):
    mean, std = ((0.5,) * c, (0.25,) * c) if same_stats else stats(c)
    return MultiCropRecipe(**{**SMALL, "mean": mean, "std": std, **overrides})


def off(c, **overrides):
    """Every random op off and the identity crop geometry, then the overrides."""
    return recipe(c, **{**ALL_OFF, **overrides})


def bands(c, size=20, batch=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (c, size, size) if batch is None else (batch, c, size, size)
    return torch.rand(shape, generator=g)


def normalised64(x, r):
    """(x - mean) / std per band, in float64."""
    shape = (-1, 1, 1)
    mean = torch.tensor(r.mean, dtype=torch.float64).view(shape)
    std = torch.tensor(r.std, dtype=torch.float64).view(shape)
    return (x.double() - mean) / std


def per_image_views(r, image, seed):
    torch.manual_seed(seed)
    return MultiCropTransform(recipe=r)(image)


def batched_views(r, images, seeds):
    return BatchedMultiCrop(recipe=r)(images, seeds=seeds)


def record_boxes(transform):
    """Make ``transform`` log the crop boxes it draws (its draws unchanged); returns the log."""
    boxes, draw = [], transform.sample_crop_params

    def logged(*args, **kwargs):
        boxes.append(draw(*args, **kwargs))
        return boxes[-1]

    transform.sample_crop_params = logged
    return boxes


def close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=atol)


# ----------------------------------------------------------------------------------------------
# shapes, dtype, normalisation


@pytest.mark.parametrize("c", BANDS)
def test_shapes_and_dtype_of_the_default_recipe(c):
    r = recipe(c)
    views = per_image_views(r, bands(c), seed=0)
    assert [tuple(v.shape) for v in views] == [(c, 12, 12)] * 2 + [(c, 6, 6)] * 2
    batch = batched_views(r, bands(c, batch=3), seeds=[1, 2, 3])
    assert [tuple(v.shape) for v in batch] == [(3, c, 12, 12)] * 2 + [(3, c, 6, 6)] * 2
    for v in views + batch:
        assert v.dtype == torch.float32 and v.is_contiguous() and torch.isfinite(v).all()


@pytest.mark.parametrize("c", BANDS)
def test_identity_recipe_is_the_per_band_normalisation(c):
    r = off(c, global_crop_size=20, local_crop_size=20)
    image, batch = bands(c), bands(c, batch=2, seed=1)
    for v in per_image_views(r, image, seed=0):
        close(v, normalised64(image, r))
    for v in batched_views(r, batch, seeds=[0, 1]):
        close(v, normalised64(batch, r))
    # float16 / float64 inputs are taken as float32 values.
    close(per_image_views(r, image.double(), seed=0)[0], normalised64(image, r))


# ----------------------------------------------------------------------------------------------
# brightness and contrast per band, on a fixed draw


def jitter_reference(x, op, factor):
    """Naive float64 brightness (op 0) or contrast (op 1) of one (C, H, W) image, clamped to [0, 1]."""
    x = x.double()
    if op == 0:
        return (factor * x).clamp(0, 1)
    if x.shape[0] == 3:
        mean = (x * LUMA.view(3, 1, 1)).sum(0).mean()  # the official grey-mean rule
    else:
        mean = x.mean(dim=(1, 2), keepdim=True)  # each band toward its own mean
    return (factor * x + (1 - factor) * mean).clamp(0, 1)


def fixed_params(batch, size, **fields):
    base = dict(boxes=torch.tensor([[0, 0, size, size]]).repeat(batch, 1), flip=torch.zeros(batch, dtype=torch.bool),
                jitter=torch.zeros(batch, dtype=torch.bool),
                factors=torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64).repeat(batch, 1),
                order=torch.arange(4).repeat(batch, 1), grayscale=torch.zeros(batch, dtype=torch.bool),
                blur=torch.zeros(batch, dtype=torch.bool), sigma=torch.ones(batch, dtype=torch.float64),
                solarize=torch.zeros(batch, dtype=torch.bool))
    return ViewParams(**{**base, **fields})


@pytest.mark.parametrize("c", [1, 3, 4, 13])
@pytest.mark.parametrize("op,factor", [(0, 1.6), (0, 0.7), (1, 0.4), (1, 1.8)])
def test_brightness_and_contrast_per_band_against_float64(c, op, factor):
    name = ("brightness", "contrast")[op]
    jitter = {"brightness": 0.0, "contrast": 0.0, name: (factor, factor)}
    r = off(c, global_crop_size=20, local_crops_number=0, global_crops_number=1, color_jitter_prob=1.0,
            saturation=0.0, hue=0.0, **jitter)
    x = bands(c, batch=2, seed=c)
    # Batched, through apply_params with the factor set by hand.
    factors = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64).repeat(2, 1)
    factors[:, op] = factor
    params = fixed_params(2, 20, jitter=torch.ones(2, dtype=torch.bool), factors=factors)
    out = BatchedMultiCrop(recipe=r).apply_params(x, [params])[0]
    # Per image, from a recipe whose only random op is this one, at a fixed factor.
    single = per_image_views(r, x[0], seed=0)[0]
    for b in range(2):
        expected = normalised64(jitter_reference(x[b], op, factor), r)
        close(out[b], expected)
    close(single, normalised64(jitter_reference(x[0], op, factor), r))
    if op == 1 and c > 3:  # a per-band mean really differs from one mean of all bands
        pooled = (factor * x[0].double() + (1 - factor) * x[0].double().mean()).clamp(0, 1)
        assert (normalised64(pooled, r) - single.double()).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------
# saturation, hue and grayscale: RGB only


@pytest.mark.parametrize("c", [1, 4, 13])
def test_saturation_hue_and_grayscale_are_skipped_for_non_rgb(c):
    r = off(c, global_crop_size=20, local_crop_size=20, color_jitter_prob=1.0, grayscale_prob=1.0,
            brightness=0.0, contrast=0.0, saturation=(1.8, 1.8), hue=(0.3, 0.3))
    assert r.skipped_colour_ops == (() if c == 1 else ("saturation", "hue", "grayscale"))
    x = bands(c, batch=2)
    factors = torch.tensor([[1.0, 1.0, 1.8, 0.3]], dtype=torch.float64).repeat(2, 1)
    params = fixed_params(2, 20, jitter=torch.ones(2, dtype=torch.bool), factors=factors,
                          grayscale=torch.ones(2, dtype=torch.bool))
    out = BatchedMultiCrop(recipe=r).apply_params(x, [params] * r.num_views)
    for v in out + batched_views(r, x, seeds=[5, 6]):
        close(v, normalised64(x, r))
    for v in per_image_views(r, x[0], seed=0):
        close(v, normalised64(x[0], r))
    # The same recipe on RGB does change the image: the skip is the channel count's doing.
    rgb = off(3, global_crop_size=20, local_crop_size=20, color_jitter_prob=1.0, grayscale_prob=1.0,
              brightness=0.0, contrast=0.0, saturation=(1.8, 1.8), hue=(0.3, 0.3))
    assert (per_image_views(rgb, bands(3), seed=0)[0].double() - normalised64(bands(3), rgb)).abs().max() > 0.1


def test_one_line_note_when_colour_ops_are_skipped():
    for augmenter in (MultiCropTransform, BatchedMultiCrop):
        with pytest.warns(UserWarning) as caught:
            augmenter(recipe=recipe(4))
        assert len(caught) == 1 and "\n" not in str(caught[0].message)
        message = str(caught[0].message)
        assert augmenter.__name__ in message and "saturation, hue, grayscale" in message and "4 channels" in message
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            augmenter(recipe=recipe(13, saturation=0.0, hue=0.0, grayscale_prob=0.0))
            augmenter(recipe=recipe(1))
            augmenter(recipe=recipe(3))
    with pytest.warns(UserWarning, match="need 3-channel images") as caught:
        MultiCropTransform(recipe=recipe(4, saturation=0.0, hue=0.0))
    assert "grayscale need" in str(caught[0].message) and "saturation" not in str(caught[0].message)


# ----------------------------------------------------------------------------------------------
# the draws do not depend on the channel count


@pytest.mark.parametrize("c", [4, 13])
def test_band_views_use_the_grey_draws(c):
    # Every band equal to one grey image: the C-band views must be the grey views in every band, for
    # the default recipe with every op on, so each draw (crop, flip, jitter order and factors,
    # grayscale, blur and sigma, solarize) was taken in the same order.
    grey = bands(1, size=24)
    solarizing = dict(global_solarize_probs=(0.5, 0.5), local_solarize_prob=0.5)
    r1, rc = recipe(1, same_stats=True, **solarizing), recipe(c, same_stats=True, **solarizing)
    for seed in range(4):
        torch.manual_seed(seed)
        one = MultiCropTransform(recipe=r1)(grey)
        state_one = torch.get_rng_state()
        torch.manual_seed(seed)
        many = MultiCropTransform(recipe=rc)(grey.expand(c, -1, -1))
        assert torch.equal(torch.get_rng_state(), state_one)  # the same number of draws
        for v1, vc in zip(one, many):
            close(vc, v1.expand_as(vc))
    seeds = list(range(8))
    one, p1 = BatchedMultiCrop(recipe=r1)(grey.expand(8, 1, -1, -1), seeds=seeds, return_params=True)
    many, pc = BatchedMultiCrop(recipe=rc)(grey.expand(8, c, -1, -1), seeds=seeds, return_params=True)
    for a, b in zip(p1, pc):
        assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    for v1, vc in zip(one, many):
        close(vc, v1.expand_as(vc))


def test_grey_float_path_draws_like_the_official_uint8_path():
    # C = 1 as float takes exactly the draws of today's uint8 grey path: the same crop boxes, the same
    # RNG state after the call.  The views differ only by the uint8 path's rounding: torchvision's
    # uint8 kernels round after resize and blur and truncate after brightness and contrast (up to a
    # level each, biased down), measured at most 2.9 levels and 1.2 on average; another draw moves
    # pixels of this smooth image by tens of levels.
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 40), torch.linspace(0, 1, 40), indexing="ij")
    grey8 = ((0.5 + 0.4 * torch.sin(6 * xx + 3 * yy)) * 255).round().to(torch.uint8).unsqueeze(0)
    t = MultiCropTransform(recipe=recipe(1, same_stats=True))
    boxes = record_boxes(t)
    for seed in range(5):
        torch.manual_seed(seed)
        official = t(grey8)
        official_boxes, state = list(boxes), torch.get_rng_state()
        boxes.clear()
        torch.manual_seed(seed)
        floats = t(grey8.float() / 255)
        assert boxes == official_boxes and torch.equal(torch.get_rng_state(), state)
        boxes.clear()
        for a, b in zip(official, floats):
            levels = (a - b).abs() * 0.25 * 255
            assert levels.max() <= 4.0 and levels.mean() <= 1.5


# ----------------------------------------------------------------------------------------------
# solarisation on [0, 1]


def test_solarisation_on_unit_floats_equals_the_uint8_rule():
    # 13 bands, each a permutation of all 256 levels as a 16x16 image.
    g = torch.Generator().manual_seed(0)
    levels = torch.stack([torch.randperm(256, generator=g).view(16, 16) for _ in range(13)]).to(torch.uint8)
    official = torch.where(levels >= 128, 255 - levels, levels)  # x >= 128 -> 255 - x
    r = off(13, global_crop_size=16, local_crop_size=16, global_solarize_probs=1.0, local_solarize_prob=1.0)
    expected = normalised64(official.double() / 255, r)
    for v in per_image_views(r, levels.float() / 255, seed=0) + [
            v[0] for v in batched_views(r, (levels.float() / 255).unsqueeze(0), seeds=[0])]:
        close(v, expected)
    # The uint8 path's official op on grey and RGB levels gives the same values as the float rule.
    for c in (1, 3):
        rc = off(c, global_crop_size=16, local_crop_size=16, global_solarize_probs=1.0, local_solarize_prob=1.0)
        official_view = per_image_views(rc, levels[:c], seed=0)[0]
        float_view = per_image_views(rc, levels[:c].float() / 255, seed=0)[0]
        close(official_view, float_view)
        close(official_view, normalised64(TF.solarize(levels[:c], 128).double() / 255, rc))


# ----------------------------------------------------------------------------------------------
# consistency with the RGB path, and between the augmenters


@pytest.mark.parametrize("augmenter", ["per_image", "batched"])
def test_bands_repeating_rgb_match_the_rgb_path(augmenter):
    # Crop, flip, blur, brightness and solarize act on each band alone, so an image whose 6 bands are
    # (R, G, B, R, G, B) gives the RGB views twice.  Contrast (grey mean vs band means), saturation,
    # hue and grayscale are RGB rules and are off here.
    rgb = bands(3, size=24, batch=2, seed=3)
    six = torch.cat([rgb, rgb], dim=1)
    common = dict(contrast=0.0, saturation=0.0, hue=0.0, grayscale_prob=0.0, global_solarize_probs=0.5,
                  local_solarize_prob=0.5)
    r3 = MultiCropRecipe(**SMALL, **common)
    r6 = MultiCropRecipe(**SMALL, **common, mean=r3.mean * 2, std=r3.std * 2)
    for seed in range(3):
        if augmenter == "per_image":
            pairs = zip(per_image_views(r3, rgb[0], seed), per_image_views(r6, six[0], seed))
        else:
            seeds = [seed, seed + 10]
            pairs = zip(batched_views(r3, rgb, seeds), batched_views(r6, six, seeds))
        for v3, v6 in pairs:
            close(v6[..., :3, :, :], v3)
            close(v6[..., 3:, :, :], v3)


@pytest.mark.parametrize("c", BANDS)
def test_both_augmenters_give_the_same_views_for_the_same_parameters(c):
    # Per-image float views with random crops and every other op fixed (brightness 0.8 then contrast 0.6
    # commute and never clamp here, so the random op order does not matter): the batched augmenter
    # given the same boxes and parameters must give the same views, its kernels being the same.
    fixed = dict(flip_prob=1.0, color_jitter_prob=1.0, brightness=(0.8, 0.8), contrast=(0.6, 0.6), saturation=0.0,
                 hue=0.0, grayscale_prob=0.0, global_blur_probs=1.0, local_blur_prob=1.0, blur_sigma=(0.7, 0.7),
                 global_solarize_probs=1.0, local_solarize_prob=1.0)
    r = recipe(c, **fixed)
    image = bands(c, size=24, seed=c)
    t = MultiCropTransform(recipe=r)
    boxes = record_boxes(t)
    for seed in range(3):
        boxes.clear()
        torch.manual_seed(seed)
        views = t(image)
        params = [fixed_params(1, 24, boxes=torch.tensor([box]), flip=torch.ones(1, dtype=torch.bool),
                               jitter=torch.ones(1, dtype=torch.bool),
                               factors=torch.tensor([[0.8, 0.6, 1.0, 0.0]], dtype=torch.float64),
                               blur=torch.ones(1, dtype=torch.bool), sigma=torch.tensor([0.7], dtype=torch.float64),
                               solarize=torch.ones(1, dtype=torch.bool)) for box in boxes]
        batched = BatchedMultiCrop(recipe=r).apply_params(image.unsqueeze(0), params)
        assert len({tuple(b) for b in boxes}) > 1  # the crops really are random
        for v, b in zip(views, batched):
            close(v, b[0])


# ----------------------------------------------------------------------------------------------
# inputs: channel checks, ranges, stacking and collate


def test_channel_count_must_match_len_mean():
    r13 = recipe(13)
    with pytest.raises(ValueError, match=r"image has 4 channels, expected C = 13 .*len\(mean\) = 13"):
        MultiCropTransform(recipe=r13)(bands(4))
    with pytest.raises(ValueError, match=r"images has 4 channels, expected C = 13"):
        BatchedMultiCrop(recipe=r13)(bands(4, batch=2))
    with pytest.raises(ValueError, match=r"image has 3 channels, expected C = 13"):
        MultiCropTransform(recipe=r13)(Image.new("RGB", (20, 20)))
    with pytest.raises(ValueError, match=r"images\[1\] has 4 channels"):
        BatchedMultiCrop(recipe=r13).collate([bands(13), bands(4)])
    with pytest.raises(ValueError, match=r"image has 4 channels, expected C in \{1, 3\}.*4-band images pass mean"):
        MultiCropTransform(**SMALL)(bands(4))
    with pytest.raises(ValueError, match=r"mean=.* and std=.*equal lengths"):
        MultiCropRecipe(mean=(0.5,) * 13, std=(0.25,) * 12)
    with pytest.raises(ValueError, match="equal lengths of at least 1"):
        MultiCropRecipe(mean=(), std=())
    with pytest.raises(ValueError, match=r"image has torch.float32 values in \[0.*, 2\], expected floats in \[0, 1\]"):
        MultiCropTransform(recipe=r13)(bands(13) * 2)
    with pytest.raises(TypeError, match="image: expected uint8 values in .* got dtype torch.int32"):
        MultiCropTransform(recipe=r13)(torch.zeros(13, 20, 20, dtype=torch.int32))
    assert MultiCropRecipe(mean=(0.5,) * 13, std=(0.25,) * 13).channels == 13


def test_uint8_bands_are_taken_as_levels():
    # A uint8 image of a channel count torchvision's uint8 colour kernels do not take is x / 255.
    x8 = (bands(4) * 255).round().to(torch.uint8)
    r = recipe(4)
    for a, b in zip(per_image_views(r, x8, seed=2), per_image_views(r, x8.float() / 255, seed=2)):
        assert torch.equal(a, b)


def test_stack_and_collate_float_bands():
    images = [bands(13, size=20, seed=0), bands(13, size=24, seed=1)]
    batch, sizes = stack_images(images)
    assert batch.dtype == torch.float32 and batch.shape == (2, 13, 24, 24)
    assert sizes.tolist() == [[20, 20], [24, 24]]
    assert torch.equal(batch[0, :, :20, :20], images[0]) and not batch[0, :, 20:].any()
    # Mixed uint8 and float images of one channel count: the uint8 ones as exact levels / 255.
    grey8 = torch.randint(0, 256, (1, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mixed, _ = stack_images([grey8, bands(1)])
    assert mixed.dtype == torch.float32 and torch.equal(mixed[0], grey8.float() / 255)

    m = BatchedMultiCrop(recipe=recipe(13))
    torch.manual_seed(0)
    views, labels = m.collate([(images[0], 3), (images[1], 5)])
    torch.manual_seed(0)
    direct = m(batch, image_sizes=sizes)
    assert labels.tolist() == [3, 5]
    assert [tuple(v.shape) for v in views] == [(2, 13, 12, 12)] * 2 + [(2, 13, 6, 6)] * 2
    for a, b in zip(views, direct):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# through DINO


@pytest.mark.parametrize("c", BANDS)
def test_one_dino_step_on_band_views(c):
    torch.manual_seed(c)
    r = recipe(c, global_crop_size=16, local_crop_size=8)
    dino = DINO(ConvNet(in_chans=c, width=4, stages=2), out_dim=16, hidden_dim=16, bottleneck_dim=8,
                input_size=(c, 16, 16))
    opt = torch.optim.SGD([p for p in dino.parameters() if p.requires_grad], lr=0.1)
    per_image = MultiCropTransform(recipe=r)
    for views in (BatchedMultiCrop(recipe=r)(bands(c, size=24, batch=4), seeds=[0, 1, 2, 3]),
                  default_collate([per_image(im) for im in bands(c, size=24, batch=4, seed=1)])):
        student = [p.detach().clone() for p in dino.student.parameters()]
        teacher = [p.detach().clone() for p in dino.teacher.parameters()]
        loss = dino(views)
        assert loss.ndim == 0 and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        dino.update_teacher()
        assert any(not torch.equal(a, b) for a, b in zip(student, dino.student.parameters()))
        assert any(not torch.equal(a, b) for a, b in zip(teacher, dino.teacher.parameters()))
