"""Both augmenters give, for the same seed, the views pinned in tests/golden/:

* multicrop_views.pt (make_multicrop_views.py), pinned on the code before the augment/ refactor:
  the per-image transform under torch's RNG and the batched one from a generator (one stream per batch);
* keyed_views.pt (make_keyed_views.py), pinned when the per-sample keyed draws came in: the batched
  augmenter with ``seeds=``, SeededTransform, and the training program's per-sample seeds.

The files hold what is exact on every CPU, compared bit for bit (the drawn integers and decisions,
and the per-image views as uint8 levels), and the batched augmenter's floats, compared within a
tolerance (golden/recording.py says which is which). A deliberate change of the seeding or of the
augmentation must regenerate the files in its commit (``python tests/golden/make_*.py``).
"""
from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "golden"
ENTRIES = {
    "multicrop_views": ["per_image_rgb", "per_image_rgb_continued", "per_image_grey", "per_image_pil",
                        "batched_rgb", "batched_grey", "batched_global_rng"],
    "keyed_views": ["batched_keyed_rgb", "batched_keyed_grey", "train_sample_seeds", "seeded_per_image"],
}
# The batched views are float32 sums of resampling weights times pixels (einsum: BLAS) through the
# jitter, blur and normalisation; BLAS and the vector kernels round those sums differently per CPU:
# 4.8e-7 at most between the AVX-512 Intel machine that first wrote the file, this AMD one, and an
# AVX2 one (2 ULP of values up to 2.7). 1e-5 leaves 20x that, and is still 1/1700 of one grey level
# (1 / 255 / std, std <= 0.25), the least a real change of the augmentation moves a pixel by.
VIEW_ATOL = 1e-5
# Jitter factors and blur sigmas: one multiply and one add of exact uniform draws, so equal on any
# IEEE machine today; a tolerance of 1e-12 (10^4 ULP of these O(1) numbers) keeps the test off that
# assumption, while another draw moves them by 1e-3 or more.
PARAM_ATOL = 1e-12


@pytest.fixture(scope="module")
def regenerated():
    """name -> (the stored file, the same entries made now by its script)."""
    return {name: (torch.load(GOLDEN / f"{name}.pt", weights_only=True),
                   runpy.run_path(str(GOLDEN / f"make_{name}.py"))["make"]())
            for name in ENTRIES}


def compare(where, before, now):
    assert type(before) is type(now), where
    if isinstance(before, dict):
        assert before.keys() == now.keys(), where
        for key in before:
            compare(f"{where}.{key}", before[key], now[key])
    elif isinstance(before, list):
        assert len(before) == len(now), where
        for i, (x, y) in enumerate(zip(before, now)):
            compare(f"{where}[{i}]", x, y)
    else:
        assert before.shape == now.shape and before.dtype == now.dtype, where
        if not before.is_floating_point():  # integers, decisions, uint8 levels: exact on any CPU
            differ = (before != now).sum().item()
            assert differ == 0, f"{where}: {differ} of {before.numel()} entries differ"
        else:
            atol = VIEW_ATOL if before.dtype == torch.float32 else PARAM_ATOL
            torch.testing.assert_close(now, before, rtol=0, atol=atol, msg=lambda m: f"{where}: {m}")


@pytest.mark.parametrize("name,key", [(name, key) for name, keys in ENTRIES.items() for key in keys])
def test_same_views_as_before(regenerated, name, key):
    before, now = regenerated[name]
    assert set(before) == set(ENTRIES[name]) == set(now)
    compare(f"{name}/{key}", before[key], now[key])


def test_levels_give_back_the_views_exactly():
    # The per-image entries store uint8 levels in place of the views: that loses nothing only if the
    # views are the normalised levels, i.e. the transform's last step is the normalisation.
    from PIL import Image

    from dino_pytorch import MultiCropTransform

    levels = runpy.run_path(str(GOLDEN / "recording.py"))["levels"]
    image = torch.randint(0, 256, (3, 30, 30), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    t = MultiCropTransform(global_crop_size=16, local_crop_size=8, local_crops_number=1)
    mean, std = torch.tensor(t.recipe.mean).view(-1, 1, 1), torch.tensor(t.recipe.std).view(-1, 1, 1)
    torch.manual_seed(0)
    for view in t(image) + t(Image.fromarray(image.permute(1, 2, 0).numpy())):
        level = levels(view, t.recipe.mean, t.recipe.std)
        torch.testing.assert_close(view, (level / 255 - mean) / std, rtol=0, atol=1e-6)
