"""The random numbers behind :class:`~dino_pytorch.augment.BatchedMultiCrop`'s parameters (CPU).

Every parameter of a batch is made from uniform ``[0, 1)`` numbers taken in blocks of columns from
a :class:`Uniforms`, which has two sources:

* **one generator for the batch** (a CPU ``torch.Generator``, or torch's global RNG when None): each
  block is one ``torch.rand`` call over the whole batch, so a row's parameters depend on its
  position and on the batch size. This is the stream that ``tests/golden/multicrop_views.pt`` pins.
* **one seed per sample**: row ``i``'s numbers are the stream of
  ``torch.Generator().manual_seed(seeds[i])``, ``DRAWS_PER_VIEW`` of them per view, in view order.
  A sample's parameters then depend on its seed (and the recipe and its image size) only: not on the
  batch it is in, its position there, the batch size, the rank or the device
  (``tests/golden/keyed_views.pt``).  Seeding a generator and drawing one row costs about 5 µs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from ..validate import is_int
from .crop_box import TENSOR, centred_box, try_size
from .recipe import CROP_ATTEMPTS

__all__ = ["DRAWS_PER_VIEW", "SeedsLike", "Uniforms", "check_seeds", "sample_boxes"]

SeedsLike = Union[Tensor, Sequence[int]]

# Per view and sample: area fractions and log aspect ratios (CROP_ATTEMPTS each), top and left,
# flip, jitter, 4 jitter factors, 4 order keys, grayscale, blur, sigma, solarize.
DRAWS_PER_VIEW = 2 * CROP_ATTEMPTS + 16


class Uniforms:
    """Uniform ``[0, 1)`` numbers for a batch of ``batch`` samples, handed out in ``(B, n)`` blocks.

    From ``generator`` (the batch's stream), or from ``seeds`` (one stream per sample, all
    ``DRAWS_PER_VIEW * num_views`` numbers of a row drawn at once, float64).
    """

    def __init__(self, batch: int, generator: Optional[torch.Generator] = None,
                 seeds: Optional[list[int]] = None, num_views: int = 0) -> None:
        self.batch, self.generator, self.used = batch, generator, 0
        self.table: Optional[Tensor] = None
        if seeds is not None:
            count = DRAWS_PER_VIEW * num_views
            self.table = torch.empty(batch, count, dtype=torch.float64)
            row_generator = torch.Generator()
            for row, seed in enumerate(seeds):
                row_generator.manual_seed(seed)
                torch.rand(count, generator=row_generator, dtype=torch.float64, out=self.table[row])

    def take(self, n: int, dtype: torch.dtype = torch.float64, *, by_column: bool = False) -> Tensor:
        """The next ``(B, n)`` block.  With a batch generator, ``dtype`` is the draw's dtype and
        ``by_column`` draws ``(n, B)`` and transposes it (the golden stream's layout); per-sample
        streams always give float64 columns."""
        self.used += n
        if self.table is not None:
            return self.table[:, self.used - n: self.used]
        if by_column:
            return torch.rand(n, self.batch, generator=self.generator, dtype=dtype).T
        return torch.rand(self.batch, n, generator=self.generator, dtype=dtype)

    def uniform(self, n: int, low: float, high: float) -> Tensor:
        """``(B, n)`` float64 uniform in ``[low, high)``."""
        return low + (high - low) * self.take(n)

    def bernoulli(self, p: float, *, inclusive: bool = False) -> Tensor:
        """``(B,)`` bool: ``u < p`` (``u <= p`` with ``inclusive``, the official blur test); p = 0 never
        fires.  Draws in every case, so the stream layout does not depend on the probabilities."""
        u = self.take(1)[:, 0]
        if p <= 0.0:
            return torch.zeros(self.batch, dtype=torch.bool)
        return u <= p if inclusive else u < p

    def check_used(self, num_views: int) -> None:
        """Per-sample streams: every view took exactly its ``DRAWS_PER_VIEW`` numbers."""
        if self.table is not None and self.used != DRAWS_PER_VIEW * num_views:
            raise AssertionError(f"drew {self.used} numbers per sample, expected {DRAWS_PER_VIEW * num_views}")


def sample_boxes(sizes: Tensor, scale: tuple[float, float], ratio: tuple[float, float], draws: Uniforms) -> Tensor:
    """RandomResizedCrop boxes, vectorised over the batch: ``sizes (B, 2)`` int64 ``(H, W)`` ->
    ``(B, 4)`` int64 ``(top, left, height, width)``.

    The rule of :mod:`~dino_pytorch.augment.crop_box`, with all 10 tries drawn for every sample;
    taking the first one that fits gives the same distribution as stopping there.
    """
    height, width = sizes[:, 0:1].double(), sizes[:, 1:2].double()  # (B, 1)
    fraction = draws.uniform(CROP_ATTEMPTS, *scale)
    log_aspect = draws.uniform(CROP_ATTEMPTS, math.log(ratio[0]), math.log(ratio[1]))
    tries_h, tries_w, fits = try_size(height, width, fraction, log_aspect, TENSOR)  # (B, tries)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    found = fits.any(dim=1)
    height, width = height.squeeze(1), width.squeeze(1)
    centre_top, centre_left, centre_h, centre_w = centred_box(height, width, ratio, TENSOR)
    crop_h = torch.where(found, tries_h.gather(1, first).squeeze(1), centre_h)
    crop_w = torch.where(found, tries_w.gather(1, first).squeeze(1), centre_w)

    # Uniform integer offsets in [0, H - h] and [0, W - w]; drawn for every sample to keep the stream
    # layout independent of which samples fell back.
    u_top, u_left = draws.take(2, by_column=True).unbind(dim=1)
    top = torch.where(found, torch.floor(u_top * (height - crop_h + 1)), centre_top)
    left = torch.where(found, torch.floor(u_left * (width - crop_w + 1)), centre_left)
    return torch.stack([top, left, crop_h, crop_w], dim=1).long()


_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


def check_seeds(seeds: SeedsLike, batch_size: int) -> list[int]:
    """``seeds`` as ``batch_size`` Python ints: a 1-D integer tensor (any device) or a sequence of ints."""
    if isinstance(seeds, Tensor):
        if seeds.shape != (batch_size,) or seeds.is_floating_point() or seeds.is_complex() or seeds.dtype == torch.bool:
            raise ValueError(
                f"seeds: expected a ({batch_size},) integer tensor, one seed per image, got {seeds.dtype} of "
                f"shape {tuple(seeds.shape)}"
            )
        return [int(s) for s in seeds.tolist()]
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not all(map(is_int, seeds)):
        raise TypeError(f"seeds: expected a ({batch_size},) integer tensor or a sequence of ints, got {seeds!r}")
    if len(seeds) != batch_size:
        raise ValueError(f"seeds: expected {batch_size} seeds, one per image, got {len(seeds)}")
    values = [int(s) for s in seeds]
    if any(not _SEED_RANGE[0] <= s <= _SEED_RANGE[1] for s in values):
        raise ValueError(f"seeds: every seed must lie in [-2**63, 2**64), got {values}")
    return values
