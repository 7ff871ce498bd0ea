"""Tests for dino_pytorch.augment.MultiCropTransform (the per-image augmenter).

Images are tiny (32x32 in, 16/8 out) so the statistical tests can afford ~1000 draws each.  Every
statistical test runs under a fixed seed, so it is deterministic; the tolerances (4 binomial
standard deviations) are what a correct implementation passes for almost every seed.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from augment_cases import ALL_OFF, MEAN, STD
from dino_pytorch.augment import MultiCropTransform

SMALL = dict(global_crop_size=16, local_crop_size=8)


def off(**overrides):
    """Small views, every op off, then the given overrides."""
    return MultiCropTransform(**{**SMALL, **ALL_OFF, **overrides})


def random_pil(mode="RGB", size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    channels = 3 if mode == "RGB" else 1
    arr = torch.randint(0, 256, (size, size, channels), dtype=torch.uint8, generator=g)
    return Image.fromarray(arr.squeeze(-1).numpy(), mode=mode)


def random_tensor(channels=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, size, size), dtype=torch.uint8, generator=g)


def within_binomial(count, n, p, sigmas=4.0):
    """|count/n - p| within `sigmas` binomial standard deviations (exact when p is 0 or 1)."""
    rate = count / n
    tol = sigmas * math.sqrt(p * (1 - p) / n)
    return abs(rate - p) <= tol, f"rate {rate:.4f} vs p={p} (tolerance {tol:.4f}, n={n})"


INPUTS = {
    "pil_rgb": lambda: random_pil("RGB"),
    "pil_l": lambda: random_pil("L"),
    "tensor3": lambda: random_tensor(3),
    "tensor1": lambda: random_tensor(1),
}


# ----------------------------------------------------------------------------------------------
# shapes, channels, dtype


def test_default_views_shapes_and_dtype():
    torch.manual_seed(0)
    t = MultiCropTransform()
    views = t(random_pil("RGB", size=256))
    assert len(views) == t.num_views == 10
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 8
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in views)


@pytest.mark.parametrize("g,n", [(1, 0), (2, 0), (3, 5), (4, 2)])
def test_custom_counts_and_sizes(g, n):
    t = MultiCropTransform(
        global_crops_number=g, local_crops_number=n, global_crop_size=(16, 12), local_crop_size=6
    )
    views = t(random_tensor())
    assert len(views) == g + n == t.num_views
    assert [tuple(v.shape) for v in views] == [(3, 16, 12)] * g + [(3, 6, 6)] * n


@pytest.mark.parametrize("kind", list(INPUTS))
@pytest.mark.parametrize("channels", [1, 3])
def test_channel_rule(kind, channels):
    mean, std = MEAN[:channels], STD[:channels]
    torch.manual_seed(0)
    views = MultiCropTransform(**SMALL, local_crops_number=2, mean=mean, std=std)(INPUTS[kind]())
    assert [tuple(v.shape) for v in views] == [(channels, 16, 16)] * 2 + [(channels, 8, 8)] * 2
    assert all(v.dtype == torch.float32 for v in views)
    assert all(torch.isfinite(v).all() for v in views)


def test_grey_input_replicated_to_three_equal_channels():
    torch.manual_seed(0)
    for image in (random_pil("L"), random_tensor(1)):
        # Colour jitter on a replicated grey image keeps it grey, so all ops may stay on.
        for v in MultiCropTransform(**SMALL, local_crops_number=2, mean=(0.5,) * 3, std=(0.5,) * 3)(image):
            assert torch.equal(v[0], v[1]) and torch.equal(v[1], v[2])


def test_tv_tensor_image_input_returns_plain_tensors():
    from torchvision import tv_tensors

    views = MultiCropTransform(**SMALL, local_crops_number=1)(tv_tensors.Image(random_tensor()))
    assert all(type(v) is torch.Tensor for v in views)


# ----------------------------------------------------------------------------------------------
# numerics of the individual ops


@pytest.mark.parametrize("kind", ["pil_rgb", "pil_l", "tensor3", "tensor1"])
@pytest.mark.parametrize("channels", [1, 3])
def test_normalisation_of_constant_image(kind, channels):
    value = 173
    if kind.startswith("pil"):
        mode = "RGB" if kind == "pil_rgb" else "L"
        image = Image.new(mode, (32, 32), (value,) * 3 if mode == "RGB" else value)
    else:
        image = torch.full((3 if kind == "tensor3" else 1, 32, 32), value, dtype=torch.uint8)
    mean, std = MEAN[:channels], STD[:channels]
    views = off(local_crops_number=3, mean=mean, std=std)(image)
    expected = (value / 255 - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    for v in views:
        torch.testing.assert_close(v, expected.expand_as(v), atol=1e-6, rtol=0)


def test_pil_path_matches_totensor_normalize_exactly():
    # With an identity crop at the input size, the result must equal ToTensor + Normalize bit for bit.
    image = random_pil("RGB", size=16)
    views = off(local_crops_number=0)(image)
    ref = torch.from_numpy(__import__("numpy").array(image)).permute(2, 0, 1).float().div(255)
    ref = (ref - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    for v in views:
        assert torch.equal(v, ref)


@pytest.mark.parametrize("overrides", [dict(mean=(0.5,), std=(0.25,)), dict(grayscale_prob=1.0)])
def test_grey_conversion_identical_for_pil_and_tensor(overrides):
    # Both the input conversion (len(mean) == 1) and the RandomGrayscale op use PIL's luma formula,
    # rounding included, on tensors too.
    tensor = random_tensor(3, size=16)
    t = off(local_crops_number=0, **overrides)
    from_pil, from_tensor = t(TF.to_pil_image(tensor)), t(tensor)
    for a, b in zip(from_pil, from_tensor):
        assert torch.equal(a, b)
        if a.shape[0] == 3:
            levels = _denormalise(a)
            assert torch.equal(levels[0], levels[1]) and torch.equal(levels[1], levels[2])


def _denormalise(view, channels=3):
    mean = torch.tensor(MEAN[:channels]).view(-1, 1, 1)
    std = torch.tensor(STD[:channels]).view(-1, 1, 1)
    return (view * std + mean).mul(255).round().to(torch.uint8)


def test_pil_blur_is_pil_gaussian_blur():
    image = random_pil("RGB", size=16)
    views = off(local_crops_number=0, global_blur_probs=1.0, blur_sigma=(1.5, 1.5))(image)
    expected = TF.pil_to_tensor(image.filter(ImageFilter.GaussianBlur(radius=1.5)))
    for v in views:
        assert torch.equal(_denormalise(v), expected)


def test_tensor_blur_kernel_covers_three_sigma():
    image = random_tensor(3, size=16)
    views = off(local_crops_number=0, global_blur_probs=1.0, blur_sigma=(1.5, 1.5))(image)
    expected = TF.gaussian_blur(image, kernel_size=[11, 11], sigma=[1.5, 1.5])  # 2 * ceil(4.5) + 1
    for v in views:
        assert torch.equal(_denormalise(v), expected)


def test_tensor_blur_on_tiny_views_does_not_fail():
    t = off(global_crop_size=3, local_crop_size=1, local_crops_number=2, global_blur_probs=1.0,
            local_blur_prob=1.0, blur_sigma=(2.0, 2.0))
    views = t(random_tensor())
    assert [tuple(v.shape) for v in views] == [(3, 3, 3)] * 2 + [(3, 1, 1)] * 2


@pytest.mark.parametrize("kind", ["pil_rgb", "tensor3"])
def test_solarize_inverts_pixels_at_or_above_threshold(kind):
    pixels = torch.arange(256).to(torch.uint8).view(16, 16)
    rgb = pixels.expand(3, 16, 16).contiguous()
    image = TF.to_pil_image(rgb) if kind == "pil_rgb" else rgb
    views = off(local_crops_number=0, global_solarize_probs=1.0)(image)
    expected = torch.where(rgb >= 128, 255 - rgb, rgb)
    for v in views:
        assert torch.equal(_denormalise(v), expected)


# ----------------------------------------------------------------------------------------------
# randomness: determinism and application rates


@pytest.mark.parametrize("kind", ["pil_rgb", "tensor3"])
def test_same_seed_same_views(kind):
    image = INPUTS[kind]()
    t = MultiCropTransform(**SMALL, local_crops_number=3)
    torch.manual_seed(123)
    a = t(image)
    torch.manual_seed(123)
    b = t(image)
    torch.manual_seed(124)
    c = t(image)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # Views are drawn independently of each other.
    assert not torch.equal(a[0], a[1])


def test_python_random_is_not_used():
    import random

    image = random_pil("RGB")
    t = MultiCropTransform(**SMALL, local_crops_number=3)
    torch.manual_seed(5)
    random.seed(1)
    a = t(image)
    torch.manual_seed(5)
    random.seed(2)
    b = t(image)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def count_changes(transform, image, reference, draws):
    """Per view position, how many of `draws` calls returned something other than `reference`."""
    counts = torch.zeros(len(reference), dtype=torch.long)
    for _ in range(draws):
        for i, (v, r) in enumerate(zip(transform(image), reference)):
            counts[i] += int(not torch.equal(v, r))
    return counts.tolist()


def assert_rates(counts, probs, draws, n_globals):
    """Globals are checked one by one; all locals share one pooled rate."""
    for i in range(n_globals):
        ok, msg = within_binomial(counts[i], draws, probs[i])
        assert ok, f"global {i + 1}: {msg}"
    if len(counts) > n_globals:
        ok, msg = within_binomial(sum(counts[n_globals:]), draws * (len(counts) - n_globals), probs[-1])
        assert ok, f"locals: {msg}"


DRAWS = 1000


def test_blur_rates_official_defaults():
    # Blur probabilities stay at their defaults (1.0, 0.1, locals 0.5); sigma >= 1 makes every
    # blur visible on a high-contrast pattern.
    torch.manual_seed(0)
    image = random_pil("RGB")
    t = off(local_crops_number=4, global_blur_probs=(1.0, 0.1), local_blur_prob=0.5, blur_sigma=(1.0, 2.0))
    reference = off(local_crops_number=4)(image)
    counts = count_changes(t, image, reference, DRAWS)
    assert counts[0] == DRAWS  # p = 1 always blurs
    assert_rates(counts, [1.0, 0.1, 0.5], DRAWS, 2)


def test_blur_probs_cycle_over_extra_globals():
    torch.manual_seed(0)
    image = random_tensor()
    t = off(global_crops_number=4, local_crops_number=0, global_blur_probs=(1.0, 0.0), blur_sigma=(1.0, 2.0))
    counts = count_changes(t, image, off(global_crops_number=4, local_crops_number=0)(image), 50)
    assert counts == [50, 0, 50, 0]
    assert [t.global_blur_prob(i) for i in range(4)] == [1.0, 0.0, 1.0, 0.0]


def test_solarize_rates_official_defaults():
    torch.manual_seed(1)
    image = random_tensor()  # uniform random pixels: about half are >= 128, so solarize always shows
    t = off(local_crops_number=4, global_solarize_probs=(0.0, 0.2))
    reference = off(local_crops_number=4)(image)
    counts = count_changes(t, image, reference, DRAWS)
    assert counts[0] == 0 and sum(counts[2:]) == 0
    assert_rates(counts, [0.0, 0.2, 0.0], DRAWS, 2)


def test_default_solarize_probs():
    t = MultiCropTransform(global_crops_number=3)
    assert [t.global_solarize_prob(i) for i in range(3)] == [0.0, 0.2, 0.0]
    assert t.local_solarize_prob == 0.0


def test_flip_rate():
    torch.manual_seed(2)
    image = random_tensor()
    t = off(local_crops_number=4, flip_prob=0.5)
    counts = count_changes(t, image, off(local_crops_number=4)(image), DRAWS)
    assert_rates(counts, [0.5, 0.5, 0.5], DRAWS, 2)


@pytest.mark.parametrize("kind", ["pil_rgb", "tensor3"])
def test_color_jitter_rate(kind):
    torch.manual_seed(3)
    image = INPUTS[kind]()
    # A brightness range away from 1 makes every applied jitter visible.
    jitter = dict(brightness=(1.5, 1.6), contrast=0.0, saturation=0.0, hue=0.0)
    t = off(local_crops_number=2, color_jitter_prob=0.8, **jitter)
    counts = count_changes(t, image, off(local_crops_number=2)(image), DRAWS // 2)
    assert_rates(counts, [0.8, 0.8, 0.8], DRAWS // 2, 2)


def test_grayscale_rate_and_effect():
    torch.manual_seed(4)
    image = Image.new("RGB", (32, 32), (200, 30, 90))
    t = off(local_crops_number=4, grayscale_prob=0.2)
    counts = [0] * t.num_views
    for _ in range(DRAWS):
        for i, v in enumerate(t(image)):
            grey = _denormalise(v)
            counts[i] += int(torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2]))
    assert_rates(counts, [0.2, 0.2, 0.2], DRAWS, 2)


def test_zero_and_one_probabilities_are_exact():
    torch.manual_seed(5)
    image = random_tensor()
    reference = off(local_crops_number=2)(image)
    never = off(local_crops_number=2, blur_sigma=(1.0, 2.0))
    always = off(local_crops_number=2, global_blur_probs=1.0, local_blur_prob=1.0, blur_sigma=(1.0, 2.0))
    assert count_changes(never, image, reference, 100) == [0, 0, 0, 0]
    assert count_changes(always, image, reference, 100) == [100, 100, 100, 100]


# ----------------------------------------------------------------------------------------------
# crop geometry


@pytest.mark.parametrize("local,scale", [(False, (0.4, 1.0)), (True, (0.05, 0.4)), (True, (0.14, 0.14))])
def test_crop_area_fraction_within_scale(local, scale):
    torch.manual_seed(6)
    key = "local_crops_scale" if local else "global_crops_scale"
    t = MultiCropTransform(**{key: scale})
    height, width = 900, 1200
    fractions, ratios = [], []
    for _ in range(2000):
        top, left, h, w = t.sample_crop_params(height, width, local=local)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        fractions.append(h * w / (height * width))
        ratios.append(w / h)
    fractions_t = torch.tensor(fractions)
    # Rounding the sides to whole pixels moves the area by well under 1% at this size.
    assert fractions_t.min() >= scale[0] * 0.99 and fractions_t.max() <= scale[1] * 1.01
    # The whole range is used, not just a corner of it.
    span = scale[1] - scale[0]
    assert fractions_t.min() <= scale[0] + 0.05 * span + 0.01 * scale[0]
    assert fractions_t.max() >= scale[1] - 0.2 * span - 0.01 * scale[1]
    assert min(ratios) >= 0.75 * 0.99 and max(ratios) <= 4 / 3 * 1.01


@pytest.mark.parametrize("kind", ["pil_rgb", "tensor3"])
def test_forward_crops_with_sample_crop_params(kind, monkeypatch):
    # The statistics above are only meaningful if forward() really draws its boxes there.
    image = INPUTS[kind]()
    t = off(local_crops_number=1)
    calls = []

    def fixed_box(height, width, *, local=False):
        calls.append(local)
        return (3, 5, 10, 12) if local else (0, 0, 20, 20)

    monkeypatch.setattr(t, "sample_crop_params", fixed_box)
    views = t(image)
    assert calls == [False, False, True]
    for v, (box, size) in zip(views, [((0, 0, 20, 20), 16)] * 2 + [((3, 5, 10, 12), 8)]):
        crop = TF.resized_crop(image, *box, size=[size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
        crop = TF.pil_to_tensor(crop) if isinstance(crop, Image.Image) else crop
        assert torch.equal(_denormalise(v), crop)


def test_crop_falls_back_to_centre_crop_on_extreme_aspect():
    torch.manual_seed(7)
    t = MultiCropTransform()
    for _ in range(20):
        top, left, h, w = t.sample_crop_params(10, 1000, local=False)
        assert 0 <= top and top + h <= 10 and 0 <= left and left + w <= 1000
        assert 0.75 * 0.9 <= w / h <= 4 / 3 * 1.1
    views = MultiCropTransform(**SMALL, local_crops_number=1)(random_tensor().repeat(1, 1, 1)[:, :2, :])
    assert [tuple(v.shape) for v in views] == [(3, 16, 16)] * 2 + [(3, 8, 8)]


@pytest.mark.parametrize("kind", ["pil", "tensor"])
def test_smallest_image_is_the_recipes_min_image_pixels(kind):
    """20 pixels (5x4) is the least the official local scale 0.05 takes, so that its smallest crop
    covers a pixel; 19 pixels raise, as in BatchedMultiCrop (a 1x1 image gave constant views)."""
    t = MultiCropTransform(**SMALL, local_crops_number=1)
    assert t.min_image_pixels == 20

    def image(height, width):
        return Image.new("RGB", (width, height)) if kind == "pil" else torch.zeros(3, height, width, dtype=torch.uint8)

    assert [tuple(v.shape) for v in t(image(5, 4))] == [(3, 16, 16)] * 2 + [(3, 8, 8)]
    with pytest.raises(ValueError, match=r"image=\(19, 1\) is 19 pixels, expected at least 20"):
        t(image(19, 1))


# ----------------------------------------------------------------------------------------------
# batching, pickling, repr


class _Images(torch.utils.data.Dataset):
    def __init__(self, transform):
        self.transform = transform

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return self.transform(random_pil("RGB", seed=i)), i


def test_default_collate_gives_list_of_batched_views():
    t = MultiCropTransform(**SMALL, local_crops_number=3)
    views, labels = next(iter(DataLoader(_Images(t), batch_size=4)))
    assert isinstance(views, list) and len(views) == 5
    assert [tuple(v.shape) for v in views] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 3
    assert labels.tolist() == [0, 1, 2, 3]


def test_pickle_roundtrip_keeps_behaviour():
    t = MultiCropTransform(**SMALL, local_crops_number=2, global_solarize_probs=(0.3, 0.7))
    t2 = pickle.loads(pickle.dumps(t))
    image = random_pil("RGB")
    torch.manual_seed(8)
    a = t(image)
    torch.manual_seed(8)
    b = t2(image)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_repr_shows_configuration():
    text = repr(MultiCropTransform(local_crops_number=6, global_blur_probs=(1.0, 0.5), interpolation="bilinear"))
    for needle in ("local_crops_number=6", "global_blur_probs=(1.0, 0.5)", "global_crops_scale=(0.4, 1.0)",
                   "interpolation=bilinear", "mean=(0.485, 0.456, 0.406)", "solarize"):
        assert needle in text


def test_positional_arguments_match_official_signature():
    t = MultiCropTransform((0.14, 1.0), (0.05, 0.14), 6)
    assert t.global_crops_scale == (0.14, 1.0) and t.local_crops_scale == (0.05, 0.14)
    assert t.local_crops_number == 6


@pytest.mark.parametrize("value", [InterpolationMode.BICUBIC, "bicubic", "BICUBIC", 3, Image.Resampling.BICUBIC])
def test_interpolation_spellings(value):
    assert MultiCropTransform(interpolation=value).interpolation is InterpolationMode.BICUBIC


# ----------------------------------------------------------------------------------------------
# errors


BAD_ARGS = [
    (dict(global_crops_scale=(0.5, 0.4)), ValueError, "global_crops_scale"),
    (dict(global_crops_scale=(0.0, 1.0)), ValueError, "impossible crop scale"),
    (dict(local_crops_scale=(0.05, 1.5)), ValueError, "local_crops_scale"),
    (dict(local_crops_scale=0.4), TypeError, "local_crops_scale"),
    (dict(ratio=(4 / 3, 3 / 4)), ValueError, "ratio"),
    (dict(ratio=(0.0, 1.0)), ValueError, "ratio"),
    (dict(ratio=(1.0,)), TypeError, "ratio"),
    (dict(global_crop_size=0), ValueError, "global_crop_size"),
    (dict(local_crop_size=(8, -1)), ValueError, "local_crop_size"),
    (dict(local_crop_size=8.0), TypeError, "local_crop_size"),
    (dict(local_crops_number=-1), ValueError, "local_crops_number"),
    (dict(global_crops_number=0), ValueError, "global_crops_number"),
    (dict(global_crops_number=1.5), TypeError, "global_crops_number"),
    (dict(flip_prob=1.5), ValueError, "flip_prob"),
    (dict(color_jitter_prob=-0.1), ValueError, "color_jitter_prob"),
    (dict(grayscale_prob=2), ValueError, "grayscale_prob"),
    (dict(local_blur_prob=-1.0), ValueError, "local_blur_prob"),
    (dict(global_blur_probs=(1.0, 1.1)), ValueError, "global_blur_probs[1]"),
    (dict(global_blur_probs=()), TypeError, "global_blur_probs"),
    (dict(global_solarize_probs=(0.0, -0.2)), ValueError, "global_solarize_probs[1]"),
    (dict(local_solarize_prob=7), ValueError, "local_solarize_prob"),
    (dict(blur_sigma=(2.0, 0.1)), ValueError, "blur_sigma"),
    (dict(blur_sigma=(0.0, 2.0)), ValueError, "blur_sigma"),
    (dict(brightness=-0.4), ValueError, "brightness"),
    (dict(hue=0.6), ValueError, "hue"),
    (dict(saturation=(1.2, 0.8)), ValueError, "saturation"),
    (dict(solarize_threshold=300), ValueError, "solarize_threshold"),
    (dict(mean=(0.5, 0.5, 0.5), std=(0.5,)), ValueError, "mean"),
    (dict(mean=(), std=()), ValueError, "mean"),
    (dict(mean=(0.5,), std=(0.0,)), ValueError, "std"),
    (dict(std=(0.2, -0.2, 0.2)), ValueError, "std"),
    (dict(interpolation="cubic-ish"), ValueError, "interpolation"),
]


@pytest.mark.parametrize(
    "kwargs,exc,needle", BAD_ARGS, ids=[next(iter(k)) + str(i) for i, (k, _, _) in enumerate(BAD_ARGS)]
)
def test_bad_arguments_raise(kwargs, exc, needle):
    with pytest.raises(exc) as info:
        MultiCropTransform(**kwargs)
    assert needle in str(info.value)


def test_crop_scale_message_is_explicit():
    with pytest.raises(ValueError, match="impossible crop scale.*0 < low <= high <= 1"):
        MultiCropTransform(global_crops_scale=(0.9, 0.2))


BAD_INPUTS = [
    (torch.rand(3, 32, 32) * 2, ValueError, "[0, 1]"),
    (torch.zeros(3, 32, 32, dtype=torch.int64), TypeError, "uint8"),
    (torch.zeros(2, 32, 32, dtype=torch.uint8), ValueError, "C in {1, 3}"),
    (torch.zeros(4, 32, 32, dtype=torch.uint8), ValueError, "C in {1, 3}"),
    (torch.zeros(32, 32, dtype=torch.uint8), ValueError, "(C, H, W)"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), ValueError, "(C, H, W)"),
    (Image.new("RGBA", (32, 32)), ValueError, "RGBA"),
    (Image.new("I", (32, 32)), ValueError, "mode"),
    ([[0, 1], [2, 3]], TypeError, "list"),
    (__import__("numpy").zeros((32, 32, 3), dtype="uint8"), TypeError, "ndarray"),
]


@pytest.mark.parametrize("image,exc,needle", BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_bad_inputs_raise(image, exc, needle):
    with pytest.raises(exc) as info:
        MultiCropTransform(**SMALL)(image)
    assert "image" in str(info.value) and needle in str(info.value)
