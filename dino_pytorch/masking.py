"""Block masking on the patch grid, as DINOv2 draws the iBOT masks.

One mask is a union of rectangles drawn one after another until ``num_patches`` patches are masked
(the BEiT recipe). Each rectangle is tried up to 10 times: a target area ``a`` uniform between
``min_num_patches`` and the budget ``min(num_patches - masked so far, max_num_patches)``, an
aspect ratio ``r`` log-uniform in ``[min_aspect, 1 / min_aspect]``, a height ``round(sqrt(a r))``
and a width ``round(sqrt(a / r))`` strictly smaller than the grid's, a uniform position. A try
counts when it masks at least one new patch and at most the budget (overlaps with earlier
rectangles merge); the mask is finished when the count is reached or a rectangle fails 10 tries,
so a mask never holds more than ``num_patches`` patches and, on a crowded grid, may hold fewer.

A batch follows DINOv2's collate: ``n = int(num_images * mask_probability)`` images get a mask,
the i-th of them a target of ``int(h * w * u)`` patches with ``u`` uniform in the i-th of ``n``
equal slices of ``mask_ratio`` (so the ratios spread evenly over the range), the others none; then
the images are shuffled.

Every random number comes from one ``torch.Generator`` (float64 uniforms, drawn in blocks), never
from Python's ``random``: a seeded generator gives the same masks, and its state can be saved.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import torch

from .validate import check_float, check_int, check_number_pair, check_probability, is_int

__all__ = ["BlockMasking", "mask_weights"]

_TRIES = 10      # tries per rectangle before a mask is declared full (DINOv2's value)
_CHUNK = 256     # uniforms drawn from the generator at once


def _check_generator(generator: Any) -> Optional[torch.Generator]:
    if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != "cpu"):
        raise TypeError(f"generator={generator!r}, expected None or a CPU torch.Generator")
    return generator


def _uniforms(generator: Optional[torch.Generator]) -> Callable[[], float]:
    """A function returning the next float64 uniform in [0, 1) drawn from ``generator``."""
    buffer: list[float] = []

    def draw() -> float:
        if not buffer:
            buffer.extend(reversed(torch.rand(_CHUNK, dtype=torch.float64, generator=generator).tolist()))
        return buffer.pop()

    return draw


class BlockMasking:
    """Masks of rectangles on an ``(h, w)`` patch grid, drawn as DINOv2's ``MaskingGenerator``.

    Args:
        grid_size: ``(h, w)``, the patch grid (``(16, 16)`` for 224 px at patch 14); an int ``n``
            means ``(n, n)``. Both sides at least 2: a rectangle is strictly shorter and narrower
            than the grid.
        min_num_patches: The smallest target area of one rectangle (DINOv2: 4).
        min_aspect: The aspect ratios (height / width) are log-uniform in
            ``[min_aspect, 1 / min_aspect]``; a number in (0, 1] (DINOv2: 0.3).
        max_num_patches: The largest target area of one rectangle; None means half the grid,
            ``0.5 * h * w``, as DINOv2's training sets it.

    Example:
        >>> masking = BlockMasking((16, 16))
        >>> masking(50, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([16, 16])
    """

    def __init__(self, grid_size: Union[int, tuple[int, int]], min_num_patches: int = 4, min_aspect: float = 0.3,
                 max_num_patches: Optional[float] = None) -> None:
        self.height, self.width = _check_grid(grid_size)
        self.num_patches = self.height * self.width
        self.min_num_patches = check_int("min_num_patches", min_num_patches, 1, error=TypeError)
        self.min_aspect = check_float("min_aspect", min_aspect, low=0.0, high=1.0, low_open=True,
                                      what="a number in (0, 1]")
        if max_num_patches is None:
            self.max_num_patches = 0.5 * self.num_patches
        else:
            self.max_num_patches = check_float("max_num_patches", max_num_patches, low=1.0,
                                               what="None or a finite number >= 1", error=TypeError)
        self._log_aspect = math.log(self.min_aspect)

    def __repr__(self) -> str:
        return (f"BlockMasking(({self.height}, {self.width}), min_num_patches={self.min_num_patches}, "
                f"min_aspect={self.min_aspect}, max_num_patches={self.max_num_patches})")

    def __call__(self, num_patches: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """One mask of (at most) ``num_patches`` patches.

        Args:
            num_patches: The target count, an int in ``[0, h * w]``; 0 gives an empty mask.
            generator: The CPU ``torch.Generator`` to draw from; None uses torch's global one.

        Returns:
            An ``(h, w)`` bool tensor, True where a patch is masked.
        """
        num_patches = check_int("num_patches", num_patches, 0, error=TypeError)
        if num_patches > self.num_patches:
            raise ValueError(f"num_patches={num_patches!r}, expected an int in [0, {self.num_patches}] (h * w)")
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        self._fill(mask, num_patches, _uniforms(_check_generator(generator)))
        return mask

    def batch(self, num_images: int, mask_probability: float = 0.5, mask_ratio: tuple[float, float] = (0.1, 0.5),
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Masks for a batch of images, with the semantics of DINOv2's ``collate_data_and_cast``.

        ``int(num_images * mask_probability)`` images (Python's float product, as DINOv2) are
        masked; the i-th of these ``n`` gets a target of ``int(h * w * u)`` patches with ``u``
        uniform in ``[lo + (hi - lo) i / n, lo + (hi - lo) (i + 1) / n]``; the other images are
        unmasked; the order is then shuffled (``torch.randperm``). In DINOv2 the images are the
        global crops of the batch, crop-major (``2 * B`` for ``B`` images and 2 global crops).

        Distributed training: draw the masks of the *global* batch on every rank from identically
        seeded generators and let each rank take its slice,
        ``masking.batch(world_size * b, generator=g)[rank * b:(rank + 1) * b]``. Then W ranks of
        ``b`` images mask exactly what one process of ``W * b`` images masks. DINOv2 instead draws
        per rank from each rank's own random state (``int(b * p)`` masked images and the ratio
        slices per rank), so its masks depend on the number of ranks; this difference is
        deliberate.

        Args:
            num_images: The number of images (masks) in the batch, an int >= 0.
            mask_probability: The fraction of images that get a mask, in [0, 1] (DINOv2: 0.5).
            mask_ratio: ``(lo, hi)`` with ``0 <= lo <= hi <= 1``: the range of the masked
                fraction of the grid over the masked images (DINOv2: ``(0.1, 0.5)``).
            generator: The CPU ``torch.Generator`` to draw from; None uses torch's global one.

        Returns:
            A ``(num_images, h * w)`` bool tensor, True where a patch is masked (patches in
            row-major order, as a ViT flattens them).
        """
        num_images = check_int("num_images", num_images, 0, error=TypeError)
        mask_probability = check_probability("mask_probability", mask_probability)
        lo, hi = check_number_pair("mask_ratio", mask_ratio)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"mask_ratio={mask_ratio!r}, expected (lo, hi) with 0 <= lo <= hi <= 1")
        generator = _check_generator(generator)
        uniform = _uniforms(generator)
        masks = torch.zeros(num_images, self.height, self.width, dtype=torch.bool)
        num_masked = int(num_images * mask_probability)
        for i in range(num_masked):
            low = lo + (hi - lo) * i / num_masked
            high = lo + (hi - lo) * (i + 1) / num_masked
            self._fill(masks[i], int(self.num_patches * (low + (high - low) * uniform())), uniform)
        order = torch.randperm(num_images, generator=generator)
        return masks[order].flatten(1)

    # -- drawing --------------------------------------------------------------------------------
    def _fill(self, mask: torch.Tensor, target: int, uniform: Callable[[], float]) -> None:
        """Adds rectangles to ``mask`` (h, w), in place, until ``target`` patches or a failure."""
        count = 0
        while count < target:
            added = self._add_rectangle(mask, min(target - count, self.max_num_patches), uniform)
            if added == 0:
                return
            count += added

    def _add_rectangle(self, mask: torch.Tensor, budget: float, uniform: Callable[[], float]) -> int:
        """Masks one rectangle adding 1 to ``budget`` new patches; the number added (0: 10 misses)."""
        for _ in range(_TRIES):
            # between min_num_patches and the budget, in whichever order they come (as DINOv2)
            area = self.min_num_patches + (budget - self.min_num_patches) * uniform()
            aspect = math.exp(self._log_aspect * (1.0 - 2.0 * uniform()))
            rows, cols = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if rows >= self.height or cols >= self.width:
                continue
            top = int(uniform() * (self.height - rows + 1))
            left = int(uniform() * (self.width - cols + 1))
            block = mask[top:top + rows, left:left + cols]
            added = rows * cols - int(block.sum())
            if 0 < added <= budget:
                block.fill_(True)
                return added
        return 0


def mask_weights(masks: torch.Tensor) -> torch.Tensor:
    """Per masked patch, ``1 / |M_i|``: the iBOT loss weights of DINOv2's collate (``masks_weight``).

    Each image's masked patches weigh ``1 / (its number of masked patches)``, so the weighted sum
    of per-patch losses is the sum over masked images of their mean patch loss; the weights of
    one masked image sum to 1.

    Args:
        masks: A ``(B, N)`` bool tensor (or ``(B, h, w)``; flattened per image), as
            :meth:`BlockMasking.batch` returns.

    Returns:
        A ``(M,)`` float32 tensor, ``M = masks.sum()``, in the order of
        ``masks.flatten(1).nonzero()`` (image by image, patches in order).
    """
    if not isinstance(masks, torch.Tensor):
        raise TypeError(f"masks={type(masks).__name__}, expected a bool tensor of shape (B, N) or (B, h, w)")
    if masks.dtype != torch.bool or masks.dim() < 2:
        raise ValueError(f"masks=<{masks.dtype} tensor of shape {tuple(masks.shape)}>, expected a bool tensor "
                         "of shape (B, N) or (B, h, w)")
    flat = masks.flatten(1)
    per_image = 1.0 / flat.sum(dim=1).clamp(min=1).to(torch.float32)
    return per_image.unsqueeze(1).expand(flat.shape)[flat]


def _check_grid(grid_size: Any) -> tuple[int, int]:
    size = (grid_size, grid_size) if is_int(grid_size) else grid_size
    what = "an int >= 2 or an (h, w) pair of ints >= 2"
    if not isinstance(size, (tuple, list)) or len(size) != 2 or not all(is_int(s) for s in size):
        raise TypeError(f"grid_size={grid_size!r}, expected {what}")
    if min(size) < 2:
        raise ValueError(f"grid_size={grid_size!r}, expected {what} (a rectangle is narrower than the grid)")
    return int(size[0]), int(size[1])
