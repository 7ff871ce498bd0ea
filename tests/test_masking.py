"""BlockMasking against DINOv2's MaskingGenerator + collate (tests/reference_dinov2_masking.py).

The two draw from different random sources (a torch.Generator here, Python's random there), so
they are compared in distribution, over 2,000 masked images per grid, with fixed seeds (the
outcome is deterministic, not flaky). Grids: 16 x 16 (224 px at patch 14) and 7 x 7 (28 px at
patch 4, the Fashion-MNIST ViT).
"""
from __future__ import annotations

import math
import random

import pytest
import torch

import dino_pytorch
from dino_pytorch.masking import BlockMasking, mask_weights
from reference_dinov2_masking import MaskingGenerator, collate_masks

GRIDS = [(16, 16), (7, 7)]
NUM_IMAGES = 4000            # mask_probability 0.5: 2,000 masked images per implementation


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def regions(masks: torch.Tensor, h: int, w: int) -> list[int]:
    """Number of 4-connected masked regions of each (h * w,) mask: a flood fill per region."""
    out = []
    for row in masks.tolist():
        seen, count = [False] * (h * w), 0
        for start in range(h * w):
            if not row[start] or seen[start]:
                continue
            count, seen[start], stack = count + 1, True, [start]
            while stack:
                k = stack.pop()
                i, j = divmod(k, w)
                for nk, inside in ((k - w, i > 0), (k + w, i < h - 1), (k - 1, j > 0), (k + 1, j < w - 1)):
                    if inside and row[nk] and not seen[nk]:
                        seen[nk] = True
                        stack.append(nk)
        out.append(count)
    return out


def boundary(masks: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Boundary length of each (h * w,) mask: patch sides between masked and unmasked (or the edge)."""
    grid = masks.view(-1, h, w).long()
    shared = (grid[:, 1:] & grid[:, :-1]).flatten(1).sum(1) + (grid[:, :, 1:] & grid[:, :, :-1]).flatten(1).sum(1)
    return 4 * grid.flatten(1).sum(1) - 2 * shared


def summary(masks: torch.Tensor, h: int, w: int) -> dict[str, torch.Tensor]:
    """Masked counts, region counts and boundary lengths of the masked images, float64."""
    masked = masks[masks.any(dim=1)]
    return {"count": masked.sum(dim=1).double(), "regions": torch.tensor(regions(masked, h, w), dtype=torch.float64),
            "boundary": boundary(masked, h, w).double()}


def quantile_se(x: torch.Tensor, q: float) -> float:
    """Distribution-free standard error of the q-quantile: half the spread of the sample quantiles at
    q -+ sqrt(q (1 - q) / n), the binomial standard deviation of the rank (Price & Bonett 2001)."""
    d = math.sqrt(q * (1 - q) / len(x))
    lo, hi = torch.quantile(x, torch.tensor([q - d, q + d], dtype=torch.float64)).tolist()
    return (hi - lo) / 2


@pytest.fixture(scope="module", params=GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def drawn(request: pytest.FixtureRequest) -> tuple[tuple[int, int], dict, dict]:
    h, w = request.param
    ours = BlockMasking((h, w)).batch(NUM_IMAGES, generator=seeded(0))
    rng = random.Random(0)
    generator = MaskingGenerator((h, w), max_num_patches=0.5 * h * w, rng=rng)   # train.py: 0.5 * h * w
    theirs, _, _ = collate_masks(NUM_IMAGES, (0.1, 0.5), 0.5, h * w, generator, rng)
    return (h, w), summary(ours, h, w), summary(theirs, h, w)


# -- the distribution against DINOv2 ----------------------------------------------------------------
def test_masked_count_mean_matches_dinov2(drawn: tuple) -> None:
    _, ours, theirs = drawn
    a, b = ours["count"], theirs["count"]
    assert len(a) == len(b) == NUM_IMAGES // 2
    # the i.i.d. standard error; the stratified draw varies less, so 4 SE is a loose-enough bound
    se = math.sqrt(a.var() / len(a) + b.var() / len(b))
    assert abs(a.mean() - b.mean()) < 4 * se, (a.mean(), b.mean(), se)


@pytest.mark.parametrize("q", [0.25, 0.5, 0.75])
def test_masked_count_quartiles_match_dinov2(drawn: tuple, q: float) -> None:
    _, ours, theirs = drawn
    a, b = ours["count"], theirs["count"]
    se = math.sqrt(quantile_se(a, q) ** 2 + quantile_se(b, q) ** 2)
    qa, qb = torch.quantile(a, q).item(), torch.quantile(b, q).item()
    # 4 SE, plus 1 for the counts being integers (a quantile can sit between two of them)
    assert abs(qa - qb) <= 4 * se + 1, (qa, qb, se)


def test_connected_regions_match_dinov2(drawn: tuple) -> None:
    _, ours, theirs = drawn
    a, b = ours["regions"], theirs["regions"]
    se = math.sqrt(a.var() / len(a) + b.var() / len(b))
    assert abs(a.mean() - b.mean()) < 4 * se, (a.mean(), b.mean(), se)
    assert a.min() >= 1


def test_boundary_length_matches_dinov2(drawn: tuple) -> None:
    """The shapes: the mean count and region number barely see the aspect range or the per-block
    cap (min_aspect 0.5 instead of 0.3 moves the regions by ~3 SE); the boundary length moves by
    ~5 SE for min_aspect 0.5 or 0.2, by ~3 SE for a cap of 30 % instead of 50 %."""
    _, ours, theirs = drawn
    a, b = ours["boundary"], theirs["boundary"]
    se = math.sqrt(a.var() / len(a) + b.var() / len(b))
    assert abs(a.mean() - b.mean()) < 4 * se, (a.mean(), b.mean(), se)


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_one_mask_matches_dinov2_at_a_fixed_target(grid: tuple[int, int]) -> None:
    """The single-mask draw alone: a target of 30 % of the grid, 1,000 masks each."""
    h, w = grid
    target, n = int(0.3 * h * w), 1000
    masking, g = BlockMasking(grid), seeded(1)
    ours = torch.stack([masking(target, generator=g).flatten() for _ in range(n)])
    reference = MaskingGenerator(grid, max_num_patches=0.5 * h * w, rng=random.Random(1))
    theirs = torch.stack([torch.from_numpy(reference(target)).flatten() for _ in range(n)])
    for key in ("count", "regions", "boundary"):
        a, b = summary(ours, h, w)[key], summary(theirs, h, w)[key]
        se = math.sqrt(a.var() / n + b.var() / n)
        assert abs(a.mean() - b.mean()) < 4 * se, (key, a.mean(), b.mean(), se)
    assert ours.sum(dim=1).max() <= target                 # never more than asked


# -- the batch semantics -----------------------------------------------------------------------------
@pytest.mark.parametrize("num_images, p", [(10, 0.5), (7, 0.3), (100, 0.29), (5, 1.0), (5, 0.0), (0, 0.5)])
def test_number_of_masked_images_is_int_n_p(num_images: int, p: float) -> None:
    masks = BlockMasking((7, 7)).batch(num_images, mask_probability=p, generator=seeded(0))
    assert masks.shape == (num_images, 49) and masks.dtype == torch.bool
    assert int(masks.any(dim=1).sum()) == int(num_images * p)


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_masked_counts_lie_in_the_stratified_ranges(grid: tuple[int, int]) -> None:
    """The k-th smallest count lies in the k-th ratio slice [int(N e_k), int(N e_k+1)], e = linspace.

    A mask holds at most its target, so the upper end is exact. It may fall short when a rectangle
    misses 10 times (about 8 % of masks here, in DINOv2 too); the shortfall is at most 3 patches
    with these seeds, hence the slack below the lower end."""
    h, w = grid
    n, lo, hi = 400, 0.1, 0.5
    masks = BlockMasking(grid).batch(n, mask_probability=1.0, mask_ratio=(lo, hi), generator=seeded(2))
    counts = sorted(masks.sum(dim=1).tolist())
    edges = [lo + (hi - lo) * i / n for i in range(n + 1)]
    for k, count in enumerate(counts):
        assert int(h * w * edges[k]) - 3 <= count <= int(h * w * edges[k + 1]), (k, count)


def test_images_are_shuffled() -> None:
    counts = BlockMasking((16, 16)).batch(200, generator=seeded(3)).sum(dim=1)
    masked = counts > 0
    assert masked[:100].any() and masked[100:].any() and not masked[:100].all()


def test_reproducible_from_a_seeded_generator() -> None:
    masking = BlockMasking((16, 16))
    a, b = masking.batch(64, generator=seeded(5)), masking.batch(64, generator=seeded(5))
    assert torch.equal(a, b)
    torch.manual_seed(5)
    c = masking.batch(64)
    torch.manual_seed(5)
    assert torch.equal(c, masking.batch(64))                # generator=None: torch's global RNG
    assert torch.equal(masking(40, generator=seeded(6)), masking(40, generator=seeded(6)))


def test_a_different_seed_or_a_later_draw_differs() -> None:
    masking, g = BlockMasking((16, 16)), seeded(5)
    first = masking.batch(64, generator=g)
    assert not torch.equal(first, masking.batch(64, generator=g))
    assert not torch.equal(first, masking.batch(64, generator=seeded(6)))


def test_distributed_slices_equal_the_global_draw() -> None:
    masking, world, b = BlockMasking((7, 7)), 2, 16
    single = masking.batch(world * b, generator=seeded(7))
    ranks = [masking.batch(world * b, generator=seeded(7))[r * b:(r + 1) * b] for r in range(world)]
    assert torch.equal(torch.cat(ranks), single)
    assert not torch.equal(ranks[0], ranks[1])


# -- the weights -------------------------------------------------------------------------------------
def test_weights_sum_to_one_per_masked_image() -> None:
    masks = BlockMasking((16, 16)).batch(32, generator=seeded(8))
    weights = mask_weights(masks)
    assert weights.shape == (int(masks.sum()),) and weights.dtype == torch.float32
    image = masks.nonzero()[:, 0]
    per_image = torch.zeros(32).index_add_(0, image, weights)
    torch.testing.assert_close(per_image[masks.any(dim=1)], torch.ones(16))
    assert torch.equal(mask_weights(masks.view(32, 16, 16)), weights)


def test_weights_equal_dinov2s_masks_weight() -> None:
    rng = random.Random(9)
    masks, masks_weight, _ = collate_masks(32, (0.1, 0.5), 0.5, 256, MaskingGenerator((16, 16), max_num_patches=128,
                                                                                         rng=rng), rng)
    torch.testing.assert_close(mask_weights(masks), masks_weight, rtol=0, atol=0)


# -- the interface -----------------------------------------------------------------------------------
def test_exported_and_defaults() -> None:
    assert dino_pytorch.BlockMasking is BlockMasking and "BlockMasking" in dino_pytorch.__all__
    masking = BlockMasking(16)
    assert (masking.height, masking.width, masking.max_num_patches) == (16, 16, 128.0)
    assert BlockMasking((7, 5)).max_num_patches == 17.5
    assert masking(0).sum() == 0 and masking(50).shape == (16, 16)


@pytest.mark.parametrize("build, error, words", [
    (lambda: BlockMasking((16,)), TypeError, "grid_size=(16,), expected"),
    (lambda: BlockMasking((1, 16)), ValueError, "grid_size=(1, 16), expected"),
    (lambda: BlockMasking(16, min_num_patches=0), ValueError, "min_num_patches=0, expected an int >= 1"),
    (lambda: BlockMasking(16, min_aspect=1.5), ValueError, "min_aspect=1.5, expected a number in (0, 1]"),
    (lambda: BlockMasking(16, min_aspect=0), ValueError, "min_aspect=0, expected"),
    (lambda: BlockMasking(16, max_num_patches=0.5), ValueError, "max_num_patches=0.5, expected"),
    (lambda: BlockMasking(16, max_num_patches=True), TypeError, "max_num_patches=True, expected"),
    (lambda: BlockMasking(4)(17), ValueError, "num_patches=17, expected an int in [0, 16]"),
    (lambda: BlockMasking(4)(-1), ValueError, "num_patches=-1, expected"),
    (lambda: BlockMasking(4)(2.0), TypeError, "num_patches=2.0, expected"),
    (lambda: BlockMasking(4)(2, generator=0), TypeError, "generator=0, expected None or a CPU torch.Generator"),
    (lambda: BlockMasking(4).batch(-1), ValueError, "num_images=-1, expected"),
    (lambda: BlockMasking(4).batch(4, mask_probability=1.5), ValueError, "mask_probability=1.5, expected"),
    (lambda: BlockMasking(4).batch(4, mask_ratio=0.3), TypeError, "mask_ratio=0.3, expected"),
    (lambda: BlockMasking(4).batch(4, mask_ratio=(0.5, 0.1)), ValueError, "mask_ratio=(0.5, 0.1), expected"),
    (lambda: BlockMasking(4).batch(4, mask_ratio=(0.1, 1.2)), ValueError, "mask_ratio=(0.1, 1.2), expected"),
    (lambda: mask_weights(torch.ones(2, 3)), ValueError, "masks=<torch.float32 tensor of shape (2, 3)>, expected"),
    (lambda: mask_weights([[True]]), TypeError, "masks=list, expected"),
])
def test_bad_arguments_name_the_argument(build, error: type, words: str) -> None:
    with pytest.raises(error) as info:
        build()
    assert words in str(info.value)
