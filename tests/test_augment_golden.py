"""Both augmenters give, for the same seed, bit for bit the views they gave before the augment/
refactor (tests/golden/multicrop_views.pt was written by tests/golden/make_multicrop_views.py on
the code before it). A deliberate change of the seeding must regenerate the file in its commit."""
from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    # Re-run the generator script, writing to a temporary copy, and read both files.
    script = (GOLDEN / "make_multicrop_views.py").read_text()
    target = tmp_path_factory.mktemp("golden") / "make_multicrop_views.py"
    target.write_text(script)
    runpy.run_path(str(target), run_name="__main__")
    now = torch.load(target.with_name("multicrop_views.pt"), weights_only=True)
    before = torch.load(GOLDEN / "multicrop_views.pt", weights_only=True)
    return before, now


@pytest.mark.parametrize("key", [
    "per_image_rgb", "per_image_rgb_local", "per_image_grey", "per_image_pil",
    "batched_rgb", "batched_grey", "batched_global_rng",
])
def test_same_views_as_before(views, key):
    before, now = views
    a, b = before[key], now[key]
    if isinstance(a, torch.Tensor):
        a, b = [a], [b]
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert torch.equal(x, y), f"{key}: max diff {(x - y).abs().max().item()}"
