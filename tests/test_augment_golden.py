"""Both augmenters give, for the same seed, bit for bit the views pinned in tests/golden/:

* multicrop_views.pt, written by make_multicrop_views.py on the code before the augment/ refactor:
  the per-image transform under torch's RNG and the batched one from a generator (one stream per batch);
* keyed_views.pt, written by make_keyed_views.py when the per-sample keyed draws came in: the batched
  augmenter with ``seeds=``, SeededTransform, and the training program's per-sample seeds.

A deliberate change of the seeding must regenerate the file in its commit."""
from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "golden"
ENTRIES = {
    "multicrop_views": ["per_image_rgb", "per_image_rgb_local", "per_image_grey", "per_image_pil",
                        "batched_rgb", "batched_grey", "batched_global_rng"],
    "keyed_views": ["batched_keyed_rgb", "batched_keyed_grey", "train_sample_seeds", "seeded_per_image"],
}


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    """name -> (the stored file, the same file regenerated now from its script in a temporary copy)."""
    files = {}
    for name in ENTRIES:
        target = tmp_path_factory.mktemp("golden") / f"make_{name}.py"
        target.write_text((GOLDEN / f"make_{name}.py").read_text())
        runpy.run_path(str(target), run_name="__main__")
        now = torch.load(target.with_name(f"{name}.pt"), weights_only=True)
        files[name] = torch.load(GOLDEN / f"{name}.pt", weights_only=True), now
    return files


@pytest.mark.parametrize("name,key", [(name, key) for name, keys in ENTRIES.items() for key in keys])
def test_same_views_as_before(regenerated, name, key):
    before, now = regenerated[name]
    assert set(before) == set(ENTRIES[name]) == set(now)
    a, b = before[key], now[key]
    if isinstance(a, torch.Tensor):
        a, b = [a], [b]
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert torch.equal(x, y), f"{name}/{key}: max diff {(x - y).abs().max().item()}"
