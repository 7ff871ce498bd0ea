"""What the make_*.py scripts record of an augmenter's output, split by what a CPU can change.

Exact on every machine, compared bit for bit by tests/test_augment_golden.py:

* the integer draws: crop boxes, and for the batched augmenter every decision (flip, jitter, its op
  order, grayscale, blur, solarize), in ``(views, batch, ...)`` tensors;
* a per-image view as the uint8 levels it was before normalisation: the per-image transform rounds
  to uint8 (PIL, or torchvision's tensor kernels) and normalises last, so the levels come back
  exactly from its float output.

Floats, compared within a tolerance: the batched augmenter's views (it computes in float32
throughout, and the rounding of its resampling sums differs between SIMD widths) and its float64
jitter factors and blur sigmas.
"""
from __future__ import annotations

import torch

DECISIONS = ("boxes", "flip", "jitter", "order", "grayscale", "blur", "solarize")
FLOAT_PARAMS = ("factors", "sigma")


def levels(view, mean, std):
    """The uint8 levels behind a view normalised with ``mean`` / ``std``: the normalisation's float32
    error is about 1e-6 of a level, far inside the 0.5 that rounding forgives."""
    mean = torch.tensor(mean).view(-1, 1, 1)
    std = torch.tensor(std).view(-1, 1, 1)
    return (view * std + mean).mul(255).round().to(torch.uint8)


def batched(module, images, **kwargs):
    """One call of a BatchedMultiCrop: every drawn parameter and its views (float32)."""
    views, params = module(images, return_params=True, **kwargs)
    fields = {name: torch.stack([getattr(p, name) for p in params]) for name in DECISIONS + FLOAT_PARAMS}
    return {**fields, "views": views}  # the draws first: a failure names them before the pixels


def record_boxes(transform):
    """Make a MultiCropTransform log its crop boxes (the draws are its own, unchanged) into the list
    returned; the list holds ``(top, left, height, width)`` tuples in call order."""
    boxes = []
    draw = transform.sample_crop_params

    def logged(*args, **kwargs):
        boxes.append(draw(*args, **kwargs))
        return boxes[-1]

    transform.sample_crop_params = logged
    return boxes


def per_image(transform, boxes, view_lists):
    """Per-image views (one list per image) as uint8 levels, with the boxes ``record_boxes`` logged."""
    mean, std = transform.recipe.mean, transform.recipe.std
    out = {"boxes": torch.tensor(boxes, dtype=torch.int64).view(len(view_lists), -1, 4),
           "levels": [levels(v, mean, std) for views in view_lists for v in views]}
    boxes.clear()
    return out
