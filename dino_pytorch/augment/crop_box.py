"""The RandomResizedCrop box, one rule for both augmenters.

torchvision's scheme: up to ``CROP_ATTEMPTS`` tries of an area fraction ``U(scale)`` and a
log-uniform aspect ratio, each rounded to whole pixels; the first box that fits in the image wins;
if none fits, the largest centred box whose aspect ratio is clamped into ``ratio``.

The two augmenters draw the random numbers differently (that is what pins their views), and hand
them to the same two functions here:

* :meth:`MultiCropTransform.sample_crop_params <dino_pytorch.augment.MultiCropTransform.sample_crop_params>`
  draws one try at a time from torch's global RNG and stops at the first fit: Python numbers, with
  :data:`SCALAR` arithmetic;
* :func:`~dino_pytorch.augment.draws.sample_boxes` draws all tries of a batch at once: ``(B, tries)``
  float64 tensors, with :data:`TENSOR` arithmetic.

Each keeps its own ``exp``: ``math.exp`` and torch's differ in the last bit for about 1 input in 200,
which moves a rounded side by a pixel now and then, and the golden views of both augmenters
(tests/golden) are bit for bit. ``sqrt``, rounding (half to even in both) and ``+ - * /`` are
correctly rounded either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["Arithmetic", "SCALAR", "TENSOR", "try_size", "centred_box"]

# A Python number, or a float64 tensor on which every operation below acts elementwise.
Values = Any


@dataclass(frozen=True)
class Arithmetic:
    """The operations of the crop rule that Python numbers and tensors spell differently."""

    exp: Callable[[Values], Values]
    sqrt: Callable[[Values], Values]
    round: Callable[[Values], Values]
    floor: Callable[[Values], Values]
    where: Callable[[Values, Values, Values], Values]


SCALAR = Arithmetic(exp=math.exp, sqrt=math.sqrt, round=round, floor=math.floor,
                    where=lambda condition, a, b: a if condition else b)
TENSOR = Arithmetic(exp=torch.exp, sqrt=torch.sqrt, round=torch.round, floor=torch.floor, where=torch.where)


def try_size(height: Values, width: Values, fraction: Values, log_aspect: Values,
             xp: Arithmetic) -> tuple[Values, Values, Values]:
    """One try's box: ``(crop_h, crop_w, fits)``.

    Args:
        height: image height, an int or a ``(B, 1)`` float64 tensor.
        width: image width, like ``height``.
        fraction: the drawn share of the image's area, in ``scale``; a float or ``(B, tries)``.
        log_aspect: the drawn log aspect ratio (width / height), in ``log(ratio)``; like ``fraction``.
        xp: :data:`SCALAR` for Python numbers, :data:`TENSOR` for tensors.

    Returns:
        The box's height and width in whole pixels (int, or float64 tensors shaped like ``fraction``),
        and whether it lies inside the image (bool, or a bool tensor).
    """
    target_area = height * width * fraction
    aspect = xp.exp(log_aspect)
    crop_w = xp.round(xp.sqrt(target_area * aspect))
    crop_h = xp.round(xp.sqrt(target_area / aspect))
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    return crop_h, crop_w, fits


def centred_box(height: Values, width: Values, ratio: tuple[float, float],
                xp: Arithmetic) -> tuple[Values, Values, Values, Values]:
    """The box when no try fits: ``(top, left, crop_h, crop_w)``, the whole image with its aspect
    ratio clamped into ``ratio`` (``ratio[0] <= ratio[1]``), centred.

    Args:
        height: image height, an int or a ``(B,)`` float64 tensor.
        width: image width, like ``height``.
        ratio: the aspect-ratio range (width / height).
        xp: :data:`SCALAR` for Python numbers, :data:`TENSOR` for tensors.
    """
    in_ratio = width / height
    crop_w = xp.where(in_ratio > ratio[1], xp.round(height * ratio[1]), width)
    crop_h = xp.where(in_ratio < ratio[0], xp.round(width / ratio[0]), height)
    return xp.floor((height - crop_h) / 2), xp.floor((width - crop_w) / 2), crop_h, crop_w
