"""Tests for dino_pytorch.augment.MultiCropRecipe, the configuration both augmenters read."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
import subprocess
import sys

import pytest
import torch
from torchvision.transforms import InterpolationMode

import dino_pytorch
from dino_pytorch.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchedMultiCrop,
    MultiCropRecipe,
    MultiCropTransform,
)

OFFICIAL = dict(
    global_crops_scale=(0.4, 1.0),
    local_crops_scale=(0.05, 0.4),
    local_crops_number=8,
    global_crops_number=2,
    global_crop_size=(224, 224),
    local_crop_size=(96, 96),
    ratio=(3.0 / 4.0, 4.0 / 3.0),
    interpolation=InterpolationMode.BICUBIC,
    flip_prob=0.5,
    brightness=0.4,
    contrast=0.4,
    saturation=0.2,
    hue=0.1,
    color_jitter_prob=0.8,
    grayscale_prob=0.2,
    global_blur_probs=(1.0, 0.1),
    local_blur_prob=0.5,
    blur_sigma=(0.1, 2.0),
    global_solarize_probs=(0.0, 0.2),
    local_solarize_prob=0.0,
    solarize_threshold=128,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    gram_teacher_scale=None,  # DINOv3's Gram teacher's crops: off
)


def test_official_defaults():
    r = MultiCropRecipe()
    assert {f.name: getattr(r, f.name) for f in dataclasses.fields(r)} == OFFICIAL
    assert (IMAGENET_MEAN, IMAGENET_STD) == (OFFICIAL["mean"], OFFICIAL["std"])
    assert r.num_views == 10 and r.channels == 3
    assert [r.global_blur_prob(i) for i in range(3)] == [1.0, 0.1, 1.0]
    assert [r.global_solarize_prob(i) for i in range(3)] == [0.0, 0.2, 0.0]
    assert r.jitter_ranges == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
    specs = r.view_specs
    assert [(s.size, s.local, s.blur_prob, s.solarize_prob) for s in specs[:2]] == [
        ((224, 224), False, 1.0, 0.0), ((224, 224), False, 0.1, 0.2)]
    assert all(s == ((96, 96), True, (0.05, 0.4), 0.5, 0.0) for s in specs[2:]) and len(specs) == 10


def test_positional_arguments_and_normalised_fields():
    r = MultiCropRecipe([0.14, 1], (0.05, 0.14), 6, global_crop_size=(32, 24), local_crop_size=8,
                        interpolation="BILINEAR", global_blur_probs=0.3, mean=[0.5], std=[0.25])
    assert r.global_crops_scale == (0.14, 1.0) and r.local_crops_number == 6
    assert r.global_crop_size == (32, 24) and r.local_crop_size == (8, 8)
    assert r.interpolation is InterpolationMode.BILINEAR
    assert r.global_blur_probs == (0.3,) and r.channels == 1 and r.mean == (0.5,)
    assert MultiCropRecipe(brightness=0.0, hue=(0.0, 0.0)).jitter_ranges[::3] == (None, None)


def test_recipe_is_frozen_hashable_and_round_trips():
    r = MultiCropRecipe(local_crops_number=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.local_crops_number = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.mean = (0.5,)
    assert r == MultiCropRecipe(local_crops_number=4) and hash(r) == hash(MultiCropRecipe(local_crops_number=4))
    assert r != MultiCropRecipe()
    assert MultiCropRecipe(**r.settings()) == r
    assert pickle.loads(pickle.dumps(r)) == r
    assert "local_crops_number=4" in repr(r) and "interpolation='bicubic'" in repr(r)
    # replace() builds a new recipe through the same checks.
    assert dataclasses.replace(r, local_crops_number=2).local_crops_number == 2
    with pytest.raises(ValueError, match="local_crops_number=-2"):
        dataclasses.replace(r, local_crops_number=-2)


def test_both_augmenters_share_one_recipe():
    recipe = MultiCropRecipe(local_crops_number=3, global_crop_size=16, local_crop_size=8)
    per_image, batched = MultiCropTransform(recipe=recipe), BatchedMultiCrop(recipe=recipe)
    assert per_image.recipe is recipe and batched.recipe is recipe
    assert BatchedMultiCrop.from_transform(per_image).recipe is recipe
    # Built from the same arguments, the two build equal recipes.
    assert MultiCropTransform(local_crops_number=3).recipe == BatchedMultiCrop(local_crops_number=3).recipe
    for t in (per_image, batched):
        assert t.local_crops_number == 3 and t.num_views == 5 and t.channels == 3
        assert t.global_blur_prob(1) == 0.1 and t.mean == IMAGENET_MEAN
    views = per_image(torch.zeros(3, 20, 20, dtype=torch.uint8))
    assert [tuple(v.shape) for v in views] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 3


def test_augmenter_attributes_are_read_only():
    t = MultiCropTransform()
    with pytest.raises(AttributeError):
        t.local_crops_number = 3
    with pytest.raises(AttributeError):
        BatchedMultiCrop().flip_prob = 0.0


def test_recipe_and_arguments_together_is_an_error():
    recipe = MultiCropRecipe()
    for cls in (MultiCropTransform, BatchedMultiCrop):
        with pytest.raises(TypeError, match=rf"{cls.__name__}: pass either recipe= or .*local_crops_number=4"):
            cls(recipe=recipe, local_crops_number=4)
        with pytest.raises(TypeError, match="recipe="):
            cls((0.4, 1.0), recipe=recipe)
        with pytest.raises(TypeError, match="expected a MultiCropRecipe"):
            cls(recipe=dict(local_crops_number=4))


def test_augmenter_signature_lists_the_recipe_arguments():
    for cls in (MultiCropTransform, BatchedMultiCrop):
        params = inspect.signature(cls).parameters
        assert list(params)[:3] == ["global_crops_scale", "local_crops_scale", "local_crops_number"]
        assert "solarize_threshold" in params and params["recipe"].default is None


BAD = [
    (dict(global_crops_scale=(0.5, 0.4)), ValueError, "global_crops_scale=(0.5, 0.4)", "0 < low <= high <= 1"),
    (dict(local_crops_scale="ab"), TypeError, "local_crops_scale='ab'", "pair of numbers"),
    (dict(local_crops_number=-1), ValueError, "local_crops_number=-1", "int >= 0"),
    (dict(global_crops_number=True), TypeError, "global_crops_number=True", "int >= 1"),
    (dict(global_crop_size=(8, 0)), ValueError, "global_crop_size=(8, 0)", "positive"),
    (dict(local_crop_size="96"), TypeError, "local_crop_size='96'", "(height, width)"),
    (dict(ratio=(2.0, 1.0)), ValueError, "ratio=(2.0, 1.0)", "0 < low <= high"),
    (dict(ratio=(1.0, float("inf"))), ValueError, "ratio=(1.0, inf)", "finite"),
    (dict(interpolation="cubic"), ValueError, "interpolation='cubic'", "'bicubic'"),
    (dict(flip_prob=1.5), ValueError, "flip_prob=1.5", "[0, 1]"),
    (dict(grayscale_prob="0.2"), TypeError, "grayscale_prob='0.2'", "[0, 1]"),
    (dict(local_solarize_prob=float("nan")), ValueError, "local_solarize_prob=nan", "[0, 1]"),
    (dict(global_blur_probs=(1.0, 1.1)), ValueError, "global_blur_probs[1]=1.1", "[0, 1]"),
    (dict(global_solarize_probs=[]), TypeError, "global_solarize_probs=[]", "non-empty sequence"),
    (dict(blur_sigma=(0.0, 2.0)), ValueError, "blur_sigma=(0.0, 2.0)", "0 < low <= high"),
    (dict(brightness=-0.4), ValueError, "brightness=-0.4", ">= 0"),
    (dict(hue=0.6), ValueError, "hue=0.6", "[0, 0.5]"),
    (dict(saturation=(1.2, 0.8)), ValueError, "saturation=(1.2, 0.8)", "low <= high"),
    (dict(contrast="x"), TypeError, "contrast='x'", "non-negative number"),
    (dict(solarize_threshold=256), ValueError, "solarize_threshold=256", "[0, 255]"),
    (dict(solarize_threshold=12.5), TypeError, "solarize_threshold=12.5", "[0, 255]"),
    (dict(mean=(0.5,), std=(0.5, 0.5)), ValueError, "mean=(0.5,)", "equal lengths"),
    (dict(mean="rgb"), TypeError, "mean='rgb'", "1 or 3 numbers"),
    (dict(std=(0.2, 0.0, 0.2)), ValueError, "std=(0.2, 0.0, 0.2)", "> 0"),
]


@pytest.mark.parametrize("kwargs,exc,name_value,expected", BAD, ids=[str(i) for i in range(len(BAD))])
def test_errors_name_the_argument_the_value_and_what_was_expected(kwargs, exc, name_value, expected):
    with pytest.raises(exc) as info:
        MultiCropRecipe(**kwargs)
    message = str(info.value)
    assert name_value in message and expected in message, message


def test_package_import_does_not_warn():
    # A fresh interpreter: in this one the package and its submodules are imported already.
    code = "import dino_pytorch, dino_pytorch.augment"
    subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", code], check=True)
    assert dino_pytorch.MultiCropRecipe is MultiCropRecipe and "MultiCropRecipe" in dino_pytorch.__all__
