"""Tests for dino_pytorch.augment.BatchedMultiCrop (the batched augmenter).

The batched module must draw the same distribution of views as the per-image MultiCropTransform, with
parameters drawn per sample.  Rates are checked on one call over a batch of 2000 tiny images, with a
binomial 4-sigma tolerance; crop statistics are compared with MultiCropTransform.sample_crop_params
over the same number of draws.  Every random test runs under a fixed seed, so it is deterministic.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from augment_cases import ALL_OFF, MEAN, STD
from dino_pytorch.augment import BatchedMultiCrop, MultiCropTransform, ViewParams, multicrop_collate, stack_images
from dino_pytorch.augment.functional import to_grey_image

SMALL = dict(global_crop_size=8, local_crop_size=4)
N = 2000  # batch size of the statistical tests


def off(**overrides) -> BatchedMultiCrop:
    """Small views, every op off, then the given overrides."""
    return BatchedMultiCrop(**{**SMALL, **ALL_OFF, **overrides})


def images(batch=4, channels=3, size=16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8, generator=g)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def normalised(x: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    """(x / 255 - mean) / std for a uint8 batch."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x.float() / 255 - m) / s


def denormalised(view: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    """Back to [0, 255] floats."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (view * s + m) * 255


def identity_params(batch: int, height: int, width: int, **overrides) -> ViewParams:
    """Parameters that leave the images unchanged (full-image box, every op off)."""
    fields = dict(
        boxes=torch.tensor([[0, 0, height, width]]).repeat(batch, 1),
        flip=torch.zeros(batch, dtype=torch.bool),
        jitter=torch.zeros(batch, dtype=torch.bool),
        factors=torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64).repeat(batch, 1),
        order=torch.arange(4).repeat(batch, 1),
        grayscale=torch.zeros(batch, dtype=torch.bool),
        blur=torch.zeros(batch, dtype=torch.bool),
        sigma=torch.ones(batch, dtype=torch.float64),
        solarize=torch.zeros(batch, dtype=torch.bool),
    )
    fields.update(overrides)
    return ViewParams(**fields)


def within_binomial(count, n, p, sigmas=4.0):
    """|count/n - p| within `sigmas` binomial standard deviations (exact when p is 0 or 1)."""
    rate = count / n
    tol = sigmas * math.sqrt(p * (1 - p) / n)
    return abs(rate - p) <= tol, f"rate {rate:.4f} vs p={p} (tolerance {tol:.4f}, n={n})"


def assert_rate(mask: torch.Tensor, p: float, what: str):
    ok, msg = within_binomial(int(mask.sum()), mask.numel(), p)
    assert ok, f"{what}: {msg}"


# ----------------------------------------------------------------------------------------------
# shapes, channels, dtype, identity


def test_default_views_shapes_and_dtype():
    m = BatchedMultiCrop()
    views = m(images(batch=2, size=64), generator=seeded(0))
    assert len(views) == m.num_views == 10
    assert [tuple(v.shape) for v in views] == [(2, 3, 224, 224)] * 2 + [(2, 3, 96, 96)] * 8
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in views)


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("out_channels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_channel_rule_and_dtypes(in_channels, out_channels, dtype):
    x = images(channels=in_channels)
    x = x if dtype == torch.uint8 else x.float() / 255
    m = BatchedMultiCrop(**SMALL, local_crops_number=2, mean=MEAN[:out_channels], std=STD[:out_channels])
    views = m(x, generator=seeded(0))
    assert [tuple(v.shape) for v in views] == [(4, out_channels, 8, 8)] * 2 + [(4, out_channels, 4, 4)] * 2
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)


def test_grey_input_replicated_to_three_equal_channels():
    # Jitter on a replicated grey image keeps it grey, so every op may stay on. Equal to rounding, not
    # bitwise: vectorised kernels may round a channel's pixels in another lane (AVX2 vs AVX-512).
    m = BatchedMultiCrop(**SMALL, local_crops_number=2, mean=(0.5,) * 3, std=(0.5,) * 3)
    for v in m(images(channels=1), generator=seeded(1)):
        assert v.std() > 0.1  # an image, not a constant
        torch.testing.assert_close(v[:, 1], v[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(v[:, 2], v[:, 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_identity_configuration_is_normalisation(channels, interpolation):
    x = images(channels=channels)
    mean, std = MEAN[:channels], STD[:channels]
    m = off(global_crop_size=16, local_crop_size=16, local_crops_number=2, mean=mean, std=std,
            interpolation=interpolation)
    for v in m(x):
        torch.testing.assert_close(v, normalised(x, mean, std), atol=1e-5, rtol=0)
    # Floats in [0, 1] are accepted as they are.
    for v in m(x.float() / 255):
        torch.testing.assert_close(v, normalised(x, mean, std), atol=1e-5, rtol=0)


def test_rgb_input_to_grey_output_uses_pil_rounded_luma():
    x = images()
    views = off(global_crop_size=16, local_crops_number=0, mean=(0.5,), std=(0.25,))(x)
    grey = torch.stack([to_grey_image(img, channels=1) for img in x])
    for v in views:
        torch.testing.assert_close(v, normalised(grey, (0.5,), (0.25,)), atol=1e-5, rtol=0)


def test_resize_of_identity_box_matches_torchvision_antialias():
    x = images(size=32)
    for interpolation, size in [("bilinear", 12), ("bilinear", 40), ("bicubic", 12), ("bicubic", 40)]:
        view = off(global_crop_size=size, local_crops_number=0, global_crops_number=1,
                   interpolation=interpolation, mean=(0.0,) * 3, std=(1.0,) * 3)(x)[0]
        mode = InterpolationMode(interpolation)
        if interpolation == "bilinear":
            # No overshoot, so no clamping: the float resize is the same filter to rounding error.
            ref = TF.resize(x.float() / 255, [size, size], interpolation=mode, antialias=True)
            torch.testing.assert_close(view, ref, atol=1e-5, rtol=0)
        # Against torch's uint8 kernel (what MultiCropTransform runs on tensors): within its rounding.
        ref8 = TF.resize(x, [size, size], interpolation=mode, antialias=True).float()
        assert (view * 255 - ref8).abs().max() <= 1.5


def test_crop_boxes_and_flip_match_per_image_resized_crop():
    x = images(batch=4, size=24)
    boxes = torch.tensor([[0, 0, 24, 24], [3, 5, 10, 14], [10, 2, 7, 9], [1, 1, 20, 6]])
    flip = torch.tensor([False, True, False, True])
    m = off(global_crops_number=1, local_crops_number=0, global_crop_size=(8, 12), mean=(0.0,) * 3, std=(1.0,) * 3)
    view = m.apply_params(x, [identity_params(4, 24, 24, boxes=boxes, flip=flip)])[0]
    for b in range(4):
        ref = TF.resized_crop(x[b], *boxes[b].tolist(), size=[8, 12], interpolation=InterpolationMode.BICUBIC,
                              antialias=True).float()
        ref = ref.flip(-1) if flip[b] else ref
        assert (view[b] * 255 - ref).abs().max() <= 1.5, f"sample {b}"


# ----------------------------------------------------------------------------------------------
# pixel effect of each op on simple cases


def one_view(m, x, **params):
    return denormalised(m.apply_params(x, [identity_params(x.shape[0], x.shape[2], x.shape[3], **params)])[0])


ONE = dict(global_crop_size=16, global_crops_number=1, local_crops_number=0)


def test_flip_mirrors_exactly():
    x = images()
    flip = torch.tensor([True, False, True, False])
    out = off(**ONE).apply_params(x, [identity_params(4, 16, 16, flip=flip)])[0]
    expected = normalised(x)
    expected[flip] = expected[flip].flip(-1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_solarize_inverts_values_at_or_above_threshold():
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 3, 16, 16).contiguous()
    solarize = torch.tensor([True, False])
    out = one_view(off(**ONE, global_solarize_probs=1.0), levels, solarize=solarize)
    expected = torch.where(levels >= 128, 255 - levels, levels).float()
    torch.testing.assert_close(out[0], expected[0], atol=1e-3, rtol=0)
    torch.testing.assert_close(out[1], levels[1].float(), atol=1e-3, rtol=0)


def test_grayscale_is_the_per_image_luma():
    x = images()
    out = one_view(off(**ONE), x, grayscale=torch.ones(4, dtype=torch.bool))
    grey = torch.stack([to_grey_image(img, channels=3) for img in x]).float()  # PIL's rounded formula
    assert (out - grey).abs().max() <= 0.5 + 1e-3  # the batched path does not round
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-3) and torch.allclose(out[:, 1], out[:, 2], atol=1e-3)


def jitter_params(batch, factor_column, value, **extra):
    factors = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64).repeat(batch, 1)
    factors[:, factor_column] = value
    return dict(jitter=torch.ones(batch, dtype=torch.bool), factors=factors, **extra)


def test_brightness_scales_and_clamps():
    x = images()
    out = one_view(off(**ONE), x, **jitter_params(4, 0, 1.5))
    torch.testing.assert_close(out, (x.float() * 1.5).clamp(0, 255), atol=2e-3, rtol=0)


def test_contrast_blends_with_mean_luma():
    x = images()
    out = one_view(off(**ONE), x, **jitter_params(4, 1, 0.3))
    xf = x.float()
    mean = (xf[:, 0] * 0.299 + xf[:, 1] * 0.587 + xf[:, 2] * 0.114).mean(dim=(1, 2)).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, (0.3 * xf + 0.7 * mean).clamp(0, 255), atol=2e-2, rtol=0)


def test_saturation_blends_with_luma():
    x = images()
    out = one_view(off(**ONE), x, **jitter_params(4, 2, 1.7))
    xf = x.float()
    grey = (xf[:, 0] * 0.299 + xf[:, 1] * 0.587 + xf[:, 2] * 0.114).unsqueeze(1)
    torch.testing.assert_close(out, (1.7 * xf + (1 - 1.7) * grey).clamp(0, 255), atol=2e-2, rtol=0)


@pytest.mark.parametrize("shift", [-0.5, -0.1, 0.0, 0.07, 0.4])
def test_hue_matches_torchvision(shift):
    x = images()
    out = one_view(off(**ONE), x, **jitter_params(4, 3, shift))
    ref = TF.adjust_hue(x.float() / 255, shift) * 255
    assert (out - ref).abs().max() <= 2e-3


def test_jitter_follows_each_samples_own_order():
    # Brightness then contrast differs from contrast then brightness once clamping kicks in.
    x = images(batch=2)
    m = BatchedMultiCrop(**{**SMALL, **ALL_OFF, **ONE}, brightness=(1.8, 1.8), contrast=(0.4, 0.4),
                         saturation=0.0, hue=0.0)
    order = torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2]])
    factors = torch.tensor([[1.8, 0.4, 1.0, 0.0]] * 2, dtype=torch.float64)
    out = one_view(m, x, jitter=torch.ones(2, dtype=torch.bool), factors=factors, order=order)

    def brightness(v):
        return (v * 1.8).clamp(0, 255)

    def contrast(v):
        mean = (v[0] * 0.299 + v[1] * 0.587 + v[2] * 0.114).mean()
        return (0.4 * v + 0.6 * mean).clamp(0, 255)

    xf = x.float()
    torch.testing.assert_close(out[0], contrast(brightness(xf[0])), atol=2e-2, rtol=0)
    torch.testing.assert_close(out[1], brightness(contrast(xf[1])), atol=2e-2, rtol=0)
    assert (contrast(brightness(xf[1])) - out[1]).abs().max() > 1.0  # the order matters here


def test_blur_uses_each_samples_sigma_like_the_tensor_path():
    x = images(size=16)
    sigma = torch.tensor([0.3, 1.0, 1.7, 2.0], dtype=torch.float64)
    out = one_view(off(**ONE), x, blur=torch.ones(4, dtype=torch.bool), sigma=sigma)
    for b in range(4):
        k = 2 * math.ceil(3 * sigma[b].item()) + 1  # MultiCropTransform's kernel size
        ref = TF.gaussian_blur(x[b].float(), [k, k], [sigma[b].item()] * 2)
        assert (out[b] - ref).abs().max() <= 2e-3, f"sample {b}"


def test_blur_on_tiny_views_does_not_fail():
    m = off(global_crop_size=3, local_crop_size=1, local_crops_number=2, global_blur_probs=1.0,
            local_blur_prob=1.0, blur_sigma=(2.0, 2.0))
    views = m(images())
    assert [tuple(v.shape) for v in views] == [(4, 3, 3, 3)] * 2 + [(4, 3, 1, 1)] * 2


# ----------------------------------------------------------------------------------------------
# application rates, per view, from the drawn parameters


@pytest.fixture(scope="module", params=["generator", "seeds"])
def default_draws(request):
    """The default recipe (4 locals) on N tiny images, one call: from one generator for the batch, or
    from one seeded stream per image."""
    m = BatchedMultiCrop(global_crop_size=4, local_crop_size=2, local_crops_number=4)
    source = dict(generator=seeded(10)) if request.param == "generator" else dict(seeds=torch.arange(N) + 10**9)
    views, params = m(images(batch=N, size=8), **source, return_params=True)
    return m, views, params


def test_rates_per_view_match_configuration(default_draws):
    m, _, params = default_draws
    blur = [1.0, 0.1] + [0.5] * 4
    solarize = [0.0, 0.2] + [0.0] * 4
    for i, p in enumerate(params):
        assert_rate(p.flip, 0.5, f"view {i} flip")
        assert_rate(p.jitter, 0.8, f"view {i} jitter")
        assert_rate(p.grayscale, 0.2, f"view {i} grayscale")
        assert_rate(p.blur, blur[i], f"view {i} blur")
        assert_rate(p.solarize, solarize[i], f"view {i} solarize")
    # Views draw independently of each other.
    assert not torch.equal(params[0].flip, params[1].flip)


def test_grey_views_detected_from_pixels(default_draws):
    # A grey view has three equal channels whatever comes after the grey step; random colour images
    # almost never do otherwise.
    _, views, params = default_draws
    for i, (v, p) in enumerate(zip(views, params)):
        levels = denormalised(v)
        equal = ((levels[:, 0] - levels[:, 1]).abs().amax(dim=(1, 2)) < 1e-3) & (
            (levels[:, 1] - levels[:, 2]).abs().amax(dim=(1, 2)) < 1e-3
        )
        assert torch.equal(equal, p.grayscale), f"view {i}"


def test_jitter_factor_ranges_and_order(default_draws):
    _, _, params = default_draws
    factors = torch.cat([p.factors for p in params])
    for column, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        f = factors[:, column]
        assert f.min() >= lo and f.max() <= hi, f"column {column}"
        # The whole range is used (12000 uniform draws: the extremes land within 0.1% of the ends).
        assert f.min() <= lo + 0.002 * (hi - lo) and f.max() >= hi - 0.002 * (hi - lo)
        assert abs(f.mean().item() - (lo + hi) / 2) <= 4 * (hi - lo) / math.sqrt(12 * f.numel())
    order = torch.cat([p.order for p in params])
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand_as(order))
    for step in range(4):
        for op in range(4):
            assert_rate(order[:, step] == op, 0.25, f"op {op} at step {step}")
    sigma = torch.cat([p.sigma for p in params])
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0


def test_disabled_and_explicit_jitter_ranges():
    m = BatchedMultiCrop(**SMALL, local_crops_number=0, brightness=0.0, contrast=(0.5, 0.7),
                         saturation=0.9, hue=0.0)
    params = m.sample_params(500, (8, 8), generator=seeded(3))
    f = torch.cat([p.factors for p in params])
    assert (f[:, 0] == 1.0).all() and (f[:, 3] == 0.0).all()  # disabled: identity factors
    assert f[:, 1].min() >= 0.5 and f[:, 1].max() <= 0.7
    assert f[:, 2].min() >= 0.1 and f[:, 2].max() <= 1.9  # max(0, 1 - 0.9)


def test_flip_and_solarize_rates_detected_from_pixels():
    x = images(batch=N, size=6)
    m = off(global_crop_size=6, local_crop_size=6, local_crops_number=2, flip_prob=0.5,
            global_solarize_probs=(0.0, 0.2), mean=(0.0,) * 3, std=(1.0,) * 3)
    views, params = m(x, generator=seeded(11), return_params=True)
    xf = x.float() / 255
    solarized = torch.where(x >= 128, 1 - xf, xf)

    def same(a, b):
        return (a - b).abs().amax(dim=(1, 2, 3)) < 1e-5

    for i, (v, p) in enumerate(zip(views, params)):
        flipped = same(v, xf.flip(-1)) | same(v, solarized.flip(-1))
        sol = same(v, solarized) | same(v, solarized.flip(-1))
        assert (same(v, xf) | flipped | sol).all(), f"view {i}: an unexpected output"
        assert torch.equal(flipped, p.flip), f"view {i}"
        assert torch.equal(sol, p.solarize), f"view {i}"
        assert_rate(flipped, 0.5, f"view {i} flip (pixels)")
        assert_rate(sol, 0.2 if i == 1 else 0.0, f"view {i} solarize (pixels)")


def test_zero_and_one_probabilities_are_exact():
    m = BatchedMultiCrop(**SMALL, local_crops_number=2, flip_prob=1.0, color_jitter_prob=0.0,
                         grayscale_prob=1.0, global_blur_probs=0.0, local_blur_prob=1.0,
                         global_solarize_probs=1.0, local_solarize_prob=0.0)
    for i, p in enumerate(m.sample_params(300, (8, 8), generator=seeded(4))):
        assert p.flip.all() and not p.jitter.any() and p.grayscale.all()
        assert (p.blur.all() if i >= 2 else not p.blur.any())
        assert (p.solarize.all() if i < 2 else not p.solarize.any())


def test_grey_output_never_draws_the_grey_step():
    m = BatchedMultiCrop(**SMALL, local_crops_number=1, grayscale_prob=1.0, mean=(0.5,), std=(0.5,))
    assert not any(p.grayscale.any() for p in m.sample_params(50, (8, 8)))


# ----------------------------------------------------------------------------------------------
# crop geometry against MultiCropTransform.sample_crop_params

# Two-sample Kolmogorov-Smirnov: under equal distributions P(D > c * sqrt((n + m) / (n m))) <= alpha
# with c = sqrt(-ln(alpha / 2) / 2); alpha = 1e-4 gives c = 2.23, i.e. D < 0.0704 for n = m = 2000.
# Rounding to whole pixels makes the distributions discrete, which only makes the test conservative.
KS_LIMIT = math.sqrt(-math.log(1e-4 / 2) / 2) * math.sqrt(2 / N)


def ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    grid = torch.cat([a, b]).unique()
    cdf_a = torch.searchsorted(a.sort().values, grid, right=True).double() / a.numel()
    cdf_b = torch.searchsorted(b.sort().values, grid, right=True).double() / b.numel()
    return float((cdf_a - cdf_b).abs().max())


def assert_same_mean(a: torch.Tensor, b: torch.Tensor, what: str):
    se = math.sqrt(a.var().item() / a.numel() + b.var().item() / b.numel())
    diff = abs(a.mean().item() - b.mean().item())
    assert diff <= 4 * se + 1e-12, f"{what}: means differ by {diff:.5f} > 4 standard errors ({4 * se:.5f})"


@pytest.mark.parametrize(
    "height,width,local,scale",
    [
        (300, 400, False, (0.4, 1.0)),
        (300, 400, True, (0.05, 0.4)),
        (20, 200, False, (0.4, 1.0)),  # mostly the centre-crop fallback, wide
        (200, 20, False, (0.4, 1.0)),  # and tall
        (64, 48, True, (0.05, 0.4)),
    ],
)
def test_crop_statistics_match_per_image_sampler(height, width, local, scale):
    key = "local_crops_scale" if local else "global_crops_scale"
    per_image = MultiCropTransform(**{key: scale})
    torch.manual_seed(12)
    reference = torch.tensor([per_image.sample_crop_params(height, width, local=local) for _ in range(N)]).double()

    batched = BatchedMultiCrop(**{key: scale}, local_crops_number=1, global_crops_number=1)
    params = batched.sample_params(N, (height, width), generator=seeded(13))
    boxes = params[1 if local else 0].boxes.double()

    assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= height).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= width).all()
    stats = {}
    for name, b in (("batched", boxes), ("per-image", reference)):
        top, left, h, w = b.unbind(dim=1)
        stats[name] = dict(
            area=h * w / (height * width),
            log_ratio=torch.log(w / h),
            centre_y=(top + h / 2) / height,
            centre_x=(left + w / 2) / width,
        )
    area = stats["batched"]["area"]
    if height * width > 10_000:  # whole-pixel rounding moves the area by well under 1% at this size
        assert area.min() >= scale[0] * 0.99 and area.max() <= scale[1] * 1.01
    for key_ in ("area", "log_ratio", "centre_y", "centre_x"):
        assert_same_mean(stats["batched"][key_], stats["per-image"][key_], key_)
    for key_ in ("area", "log_ratio"):
        d = ks_distance(stats["batched"][key_], stats["per-image"][key_])
        assert d < KS_LIMIT, f"{key_}: KS distance {d:.4f} >= {KS_LIMIT:.4f}"


@pytest.mark.parametrize("height,width", [(10, 1000), (1000, 10)])
def test_centre_crop_fallback_on_extreme_aspect(height, width):
    m = BatchedMultiCrop(**SMALL, local_crops_number=0)
    for p in m.sample_params(50, (height, width), generator=seeded(5)):
        top, left, h, w = p.boxes.unbind(dim=1)
        assert (top >= 0).all() and (top + h <= height).all() and (left >= 0).all() and (left + w <= width).all()
        assert ((w / h >= 0.75 * 0.9) & (w / h <= 4 / 3 * 1.1)).all()
        # The centred box, as in sample_crop_params.
        assert ((top == (height - h) // 2) & (left == (width - w) // 2)).all()


# ----------------------------------------------------------------------------------------------
# crop geometry against torchvision's RandomResizedCrop.get_params (both augmenters)

TV_N = 20_000  # boxes per sampler and setting
TV_RATIO = (3.0 / 4.0, 4.0 / 3.0)
TV_SETTINGS = [  # (height, width, scale): Fashion-MNIST global and local, a large image, a wide one
    (28, 28, (0.4, 1.0)),
    (28, 28, (0.05, 0.4)),
    (300, 400, (0.14, 1.0)),
    (48, 96, (0.4, 1.0)),  # the centre-crop fallback on part of the draws
]
TV_STATS = ("area", "log_ratio", "top", "left")
TV_SAMPLERS = ("per_image", "batched_seeds", "batched_generator")
# Two-sample KS at n = m = TV_N: under equal distributions P(D > c * sqrt(2 / n)) <= alpha with
# c = sqrt(-ln(alpha / 2) / 2). Bonferroni over every comparison of the test below keeps the chance of
# a false alarm of the whole test under 1%: alpha = 0.01 / 48, c = 2.14, D < 0.0214. Whole-pixel
# rounding makes the distributions discrete, which only makes KS conservative.
TV_ALPHA = 0.01 / (len(TV_SETTINGS) * len(TV_STATS) * len(TV_SAMPLERS))
TV_KS_LIMIT = math.sqrt(-math.log(TV_ALPHA / 2) / 2) * math.sqrt(2 / TV_N)


def box_stats(boxes: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
    """Area fraction, log aspect ratio, and the offsets as a fraction of the free space (0 if none)."""
    top, left, h, w = boxes.double().unbind(dim=1)
    free_y, free_x = height - h, width - w
    return dict(area=h * w / (height * width), log_ratio=torch.log(w / h),
                top=torch.where(free_y > 0, top / free_y.clamp(min=1), 0.0),
                left=torch.where(free_x > 0, left / free_x.clamp(min=1), 0.0))


_TV_REFERENCE: dict = {}


def torchvision_stats(height: int, width: int, scale) -> dict[str, torch.Tensor]:
    from torchvision.transforms import RandomResizedCrop

    key = (height, width, scale)
    if key not in _TV_REFERENCE:
        image = torch.empty(1, height, width)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(21)
            boxes = [RandomResizedCrop.get_params(image, list(scale), list(TV_RATIO)) for _ in range(TV_N)]
        _TV_REFERENCE[key] = box_stats(torch.tensor(boxes), height, width)
    return _TV_REFERENCE[key]


def project_boxes(sampler: str, height: int, width: int, scale) -> torch.Tensor:
    if sampler == "per_image":
        t = MultiCropTransform(global_crops_scale=scale)
        torch.manual_seed(22)
        return torch.tensor([t.sample_crop_params(height, width) for _ in range(TV_N)])
    m = BatchedMultiCrop(global_crops_scale=scale, global_crops_number=1, local_crops_number=0)
    source = dict(seeds=torch.arange(TV_N) + 23 * 10**6) if sampler == "batched_seeds" else dict(generator=seeded(24))
    return m.sample_params(TV_N, (height, width), **source)[0].boxes


def mutant_boxes(height: int, width: int, scale, *, aspect: str = "log-uniform", last_offset: bool = True):
    """torchvision's scheme, re-implemented with switches for deliberate mistakes: the aspect ratio
    uniform instead of log-uniform, or offsets that never reach the last position."""
    g = seeded(25)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * torch.rand(TV_N, 10, generator=g, dtype=torch.float64))
    u = torch.rand(TV_N, 10, generator=g, dtype=torch.float64)
    lo, hi = TV_RATIO
    if aspect == "log-uniform":
        ratio = torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * u)
    else:
        ratio = lo + (hi - lo) * u
    w, h = torch.round(torch.sqrt(area * ratio)), torch.round(torch.sqrt(area / ratio))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(dim=1)
    in_ratio = width / height
    w = torch.where(found, w, float(round(height * hi) if in_ratio > hi else width))
    h = torch.where(found, h, float(round(width / lo) if in_ratio < lo else height))
    u_top, u_left = torch.rand(2, TV_N, generator=g, dtype=torch.float64)
    extra = 1 if last_offset else 0
    top = torch.where(found, torch.floor(u_top * (height - h + extra)), torch.floor((height - h) / 2))
    left = torch.where(found, torch.floor(u_left * (width - w + extra)), torch.floor((width - w) / 2))
    return torch.stack([top, left, h, w], dim=1).long()


def ks_failures(boxes: torch.Tensor, height: int, width: int, scale) -> dict[str, float]:
    """The statistics whose KS distance to torchvision's reaches the limit, with the distance."""
    ours, theirs = box_stats(boxes, height, width), torchvision_stats(height, width, scale)
    distances = {name: ks_distance(ours[name], theirs[name]) for name in TV_STATS}
    return {name: d for name, d in distances.items() if d >= TV_KS_LIMIT}


@pytest.mark.parametrize("height,width,scale", TV_SETTINGS)
def test_crop_geometry_matches_torchvision(height, width, scale):
    for sampler in TV_SAMPLERS:
        boxes = project_boxes(sampler, height, width, scale)
        assert ((boxes >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= height).all()
                and (boxes[:, 1] + boxes[:, 3] <= width).all()), sampler
        assert not ks_failures(boxes, height, width, scale), \
            f"{sampler}: KS distance >= {TV_KS_LIMIT:.4f} for {ks_failures(boxes, height, width, scale)}"


@pytest.mark.parametrize("height,width,scale", TV_SETTINGS[:3])
def test_crop_geometry_check_catches_a_wrong_sampler(height, width, scale):
    # The re-implementation passes with the right switches, so each failure below is the mistake's.
    assert not ks_failures(mutant_boxes(height, width, scale), height, width, scale)
    assert "log_ratio" in ks_failures(mutant_boxes(height, width, scale, aspect="uniform"), height, width, scale)
    assert "top" in ks_failures(mutant_boxes(height, width, scale, last_offset=False), height, width, scale)


# ----------------------------------------------------------------------------------------------
# randomness: independence, determinism, devices


def test_samples_in_a_batch_get_independent_parameters():
    x = images(batch=1).repeat(2, 1, 1, 1)  # two identical images
    views, params = BatchedMultiCrop(**SMALL, local_crops_number=2)(x, generator=seeded(6), return_params=True)
    for v, p in zip(views, params):
        assert not torch.equal(p.boxes[0], p.boxes[1]) or not torch.equal(p.factors[0], p.factors[1])
        assert not torch.equal(p.factors[0], p.factors[1])
        assert not torch.equal(v[0], v[1])


def test_seeded_generator_is_deterministic_and_leaves_global_rng_alone():
    x = images()
    m = BatchedMultiCrop(**SMALL, local_crops_number=2)
    state = torch.get_rng_state()
    a = m(x, generator=seeded(7))
    assert torch.equal(torch.get_rng_state(), state)
    b = m(x, generator=seeded(7))
    c = m(x, generator=seeded(8))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))


def test_global_rng_by_default():
    x = images()
    m = BatchedMultiCrop(**SMALL, local_crops_number=2)
    torch.manual_seed(9)
    a = m(x)
    torch.manual_seed(9)
    b = m(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_params_drawn_on_cpu_and_independent_of_the_device():
    # 'meta' stands in for an accelerator: the views land on the input's device while the
    # parameters, drawn on the CPU, are the same as for a CPU batch.
    m = BatchedMultiCrop(**SMALL, local_crops_number=2)
    x = images()
    _, cpu_params = m(x, generator=seeded(10), return_params=True)
    meta_views, meta_params = m(x.to("meta"), generator=seeded(10), return_params=True)
    assert all(v.device.type == "meta" for v in meta_views)
    assert [tuple(v.shape) for v in meta_views] == [(4, 3, 8, 8)] * 2 + [(4, 3, 4, 4)] * 2
    for p, q in zip(cpu_params, meta_params):
        assert p.boxes.device.type == "cpu"
        assert torch.equal(p.boxes, q.boxes) and torch.equal(p.factors, q.factors) and torch.equal(p.blur, q.blur)


def same_params(p: ViewParams, q: ViewParams) -> bool:
    return all(torch.equal(getattr(p, f), getattr(q, f)) for f in ViewParams.__dataclass_fields__)


def pick(p: ViewParams, rows) -> ViewParams:
    return ViewParams(**{f: getattr(p, f)[rows] for f in ViewParams.__dataclass_fields__})


def test_seeded_images_do_not_depend_on_their_batch():
    # What distributed equality rests on: an image's parameters and views are a function of its seed,
    # whatever batch it is in, wherever it sits there and however large the batch is.
    m = BatchedMultiCrop(**SMALL, local_crops_number=2)
    x, seeds = images(batch=6, seed=3), torch.tensor([5, 17, 2**62, 0, 17_000_003, 6])
    views, params = m(x, seeds=seeds, return_params=True)
    for rows in ([4, 1], [5, 0, 3, 2], [2]):
        part_views, part_params = m(x[rows], seeds=seeds[rows], return_params=True)
        for v, w, p, q in zip(views, part_views, params, part_params):
            assert same_params(pick(p, rows), q)
            torch.testing.assert_close(v[rows], w, rtol=0, atol=1e-6)
    # Row i is the stream of torch.Generator().manual_seed(seeds[i]) (the layout tests/golden pins).
    alone = m.sample_params(1, (16, 16), seeds=[int(seeds[1])])
    assert all(same_params(pick(p, [1]), q) for p, q in zip(params, alone))


def test_seeds_are_deterministic_distinct_and_leave_global_rng_alone():
    m = BatchedMultiCrop(**SMALL, local_crops_number=2)
    x = images(batch=1).repeat(4, 1, 1, 1)  # four identical images
    state = torch.get_rng_state()
    a, pa = m(x, seeds=[1, 2, 3, 4], return_params=True)
    assert torch.equal(torch.get_rng_state(), state)
    b = m(x, seeds=(1, 2, 3, 4))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    for v, p in zip(a, pa):
        assert len({tuple(f.tolist()) for f in p.factors}) == 4  # every image its own draws
        assert not torch.equal(v[0], v[1])
    # The same seed in two rows gives the same views (the seed is all there is).
    c = m(x, seeds=[9, 9, 3, 4])
    assert all(torch.equal(v[0], v[1]) for v in c)


def test_bad_seeds_raise():
    m = BatchedMultiCrop(**SMALL, local_crops_number=1)
    x = images()
    for seeds, exc, needle in [
        (torch.arange(3), ValueError, "(4,) integer tensor"),
        (torch.zeros(4), ValueError, "integer tensor"),
        (torch.zeros(4, 1, dtype=torch.long), ValueError, "shape (4, 1)"),
        ([1, 2, 3], ValueError, "expected 4 seeds"),
        ([1, 2, 3, 4.0], TypeError, "sequence of ints"),
        ("1234", TypeError, "sequence of ints"),
        ([1, 2, 3, 2**64], ValueError, "2**64"),
    ]:
        with pytest.raises(exc, match="seeds") as info:
            m(x, seeds=seeds)
        assert needle in str(info.value)
    with pytest.raises(TypeError, match="not both"):
        m(x, seeds=[1, 2, 3, 4], generator=seeded(0))


# ----------------------------------------------------------------------------------------------
# construction, DataLoader use, padding


def test_from_transform_copies_the_configuration():
    t = MultiCropTransform((0.3, 0.9), (0.1, 0.3), 3, global_crop_size=12, local_crop_size=6, hue=(-0.05, 0.2),
                           global_blur_probs=0.7, global_solarize_probs=(0.1, 0.3, 0.5), mean=(0.5,), std=(0.2,))
    m = BatchedMultiCrop.from_transform(t)
    for name in ("global_crops_scale", "local_crops_scale", "local_crops_number", "global_crop_size",
                 "local_crop_size", "hue", "global_blur_probs", "global_solarize_probs", "mean", "std",
                 "ratio", "interpolation", "flip_prob", "blur_sigma"):
        assert getattr(m, name) == getattr(t, name), name
    assert m.num_views == t.num_views == 5
    assert "local_crops_number=3" in repr(m) and "interpolation='bicubic'" in repr(m)


def test_module_apply_is_nn_module_apply():
    # apply_params holds the augmentation, so model.apply(init_fn) reaches a BatchedMultiCrop inside.
    m = BatchedMultiCrop(**SMALL)
    seen = []
    model = torch.nn.Sequential(m)
    assert model.apply(seen.append) is model
    assert seen == [m, model]


class _Images(Dataset):
    def __init__(self, sizes, with_labels=True, modes=("RGB",)):
        self.sizes, self.with_labels, self.modes = sizes, with_labels, modes

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        mode = self.modes[i % len(self.modes)]
        h, w = self.sizes[i]
        arr = torch.randint(0, 256, (h, w, 3 if mode == "RGB" else 1), dtype=torch.uint8, generator=g)
        image = Image.fromarray(arr.squeeze(-1).numpy(), mode=mode)
        return (image, i) if self.with_labels else image


def test_collate_in_dataloader_with_labels_and_mixed_sizes_and_modes():
    m = BatchedMultiCrop(**SMALL, local_crops_number=3)
    data = _Images([(16, 20), (24, 12), (16, 16), (30, 30)], modes=("RGB", "L"))
    views, labels = next(iter(DataLoader(data, batch_size=4, collate_fn=multicrop_collate(m))))
    assert [tuple(v.shape) for v in views] == [(4, 3, 8, 8)] * 2 + [(4, 3, 4, 4)] * 3
    assert labels.tolist() == [0, 1, 2, 3]
    # Images alone work too, and tensors as well as PIL images.
    only = next(iter(DataLoader(_Images([(16, 16)] * 3, with_labels=False), batch_size=3, collate_fn=m.collate)))
    assert [tuple(v.shape) for v in only] == [(3, 3, 8, 8)] * 2 + [(3, 3, 4, 4)] * 3
    tensors = [TF.pil_to_tensor(data[i][0].convert("RGB")) for i in range(4)]
    assert len(m.collate(tensors)) == 5
    pickle.loads(pickle.dumps(m.collate))  # spawn-started workers pickle the collate_fn


def test_padding_never_shows():
    # White images of different sizes, zero-padded: every crop stays inside its image.
    white = [torch.full((3, h, w), 255, dtype=torch.uint8) for h, w in [(10, 30), (30, 10), (20, 20)]]
    batch, sizes = stack_images(white)
    assert tuple(batch.shape) == (3, 3, 30, 30) and sizes.tolist() == [[10, 30], [30, 10], [20, 20]]
    m = BatchedMultiCrop(**SMALL, local_crops_number=2, color_jitter_prob=0.0, grayscale_prob=0.0,
                         global_solarize_probs=0.0, mean=(0.0,) * 3, std=(1.0,) * 3)
    views, params = m(batch, image_sizes=sizes, generator=seeded(12), return_params=True)
    for v, p in zip(views, params):
        torch.testing.assert_close(v, torch.ones_like(v), atol=1e-5, rtol=0)
        assert (p.boxes[:, 0] + p.boxes[:, 2] <= sizes[:, 0]).all()
        assert (p.boxes[:, 1] + p.boxes[:, 3] <= sizes[:, 1]).all()


# ----------------------------------------------------------------------------------------------
# errors


BAD_INPUTS = [
    ([[0, 1]], TypeError, "images"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.int64), TypeError, "uint8"),
    (torch.zeros(3, 8, 8, dtype=torch.uint8), ValueError, "(B, C, H, W)"),
    (torch.zeros(2, 2, 8, 8, dtype=torch.uint8), ValueError, "C in {1, 3}"),
    (torch.zeros(2, 4, 8, 8, dtype=torch.uint8), ValueError, "C in {1, 3}"),
    (torch.zeros(0, 3, 8, 8, dtype=torch.uint8), ValueError, "empty"),
    (torch.zeros(2, 3, 0, 8, dtype=torch.uint8), ValueError, "empty"),
]


@pytest.mark.parametrize("x,exc,needle", BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_bad_inputs_raise(x, exc, needle):
    with pytest.raises(exc, match="images") as info:
        BatchedMultiCrop(**SMALL)(x)
    assert needle in str(info.value)


def test_bad_call_arguments_raise():
    m = BatchedMultiCrop(**SMALL, local_crops_number=1)
    x = images()
    with pytest.raises(ValueError, match="image_sizes"):
        m(x, image_sizes=torch.tensor([[8, 8]] * 3))
    with pytest.raises(ValueError, match="image_sizes"):
        m(x, image_sizes=torch.tensor([[8, 8]] * 3 + [[17, 8]]))
    with pytest.raises(ValueError, match="image_sizes"):
        m(x, image_sizes=torch.tensor([[8, 8]] * 3 + [[0, 8]]))
    with pytest.raises(TypeError, match="generator"):
        m(x, generator=123)
    with pytest.raises(ValueError, match="batch_size"):
        m.sample_params(0, (8, 8))
    with pytest.raises(TypeError, match="image_size"):
        m.sample_params(2, (8.0, 8))
    params = m.sample_params(4, (16, 16))
    with pytest.raises(ValueError, match="params"):
        m.apply_params(x, params[:2])
    with pytest.raises(ValueError, match="params"):
        m.apply_params(x[:3], params)
    params[0].boxes[0] = torch.tensor([10, 0, 10, 4])
    with pytest.raises(ValueError, match="boxes"):
        m.apply_params(x, params)
    with pytest.raises(ValueError, match="images"):
        stack_images([])
    with pytest.raises(ValueError, match="channel"):
        stack_images([torch.zeros(1, 4, 4, dtype=torch.uint8), torch.zeros(3, 4, 4, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="RGBA"):
        m.collate([Image.new("RGBA", (8, 8))])
    with pytest.raises(TypeError, match="transform"):
        BatchedMultiCrop.from_transform(m)
    with pytest.raises(TypeError, match="batched"):
        multicrop_collate(MultiCropTransform())


@pytest.mark.parametrize(
    "kwargs,exc,needle",
    [
        (dict(global_crops_scale=(0.5, 0.4)), ValueError, "global_crops_scale"),
        (dict(local_crops_number=-1), ValueError, "local_crops_number"),
        (dict(flip_prob=1.5), ValueError, "flip_prob"),
        (dict(hue=0.6), ValueError, "hue"),
        (dict(mean=(0.5, 0.5), std=(0.5,)), ValueError, "mean"),
        (dict(interpolation="lanczos"), ValueError, "interpolation"),
        (dict(interpolation="box"), ValueError, "interpolation"),
    ],
)
def test_bad_constructor_arguments_raise(kwargs, exc, needle):
    with pytest.raises(exc, match=needle):
        BatchedMultiCrop(**kwargs)
