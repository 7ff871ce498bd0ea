"""The images the augmenters take: one set of input checks, and the stacking of a batch.

Both augmenters accept the same three kinds of image:

* PIL images in mode ``'RGB'`` or ``'L'`` (photos; the official numerics);
* ``uint8`` tensors ``(C, H, W)`` with values in ``[0, 255]`` (decoded photos);
* floating tensors ``(C, H, W)`` with values in ``[0, 1]``, any ``C >= 1`` (band images, e.g. the
  ``.npy`` / TIFF readers of :mod:`dino_pytorch.data`);

and :class:`~dino_pytorch.augment.BatchedMultiCrop` takes the last two stacked as ``(B, C, H, W)``.
The channel count must suit the recipe (``len(mean)``: equal, or grey / RGB converted to grey /
RGB; :meth:`MultiCropRecipe.check_image_channels`).  The checks run once, here, at the boundary; the
kernels of :mod:`~dino_pytorch.augment.functional` trust their inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from .functional import to_unit_float
from .recipe import MultiCropRecipe

__all__ = ["check_batch", "check_float_range", "check_image_tensor", "stack_images", "to_image_tensor"]


def check_float_range(name: str, x: Tensor) -> None:
    """A floating CPU tensor must hold values in ``[0, 1]`` (one min/max pass); else a ValueError naming
    ``name``, the range found and the likely cause.  GPU tensors are not read: that would synchronise
    the device every batch (there the crop-resize clips values outside ``[0, 1]``)."""
    if not x.is_floating_point() or x.device.type != "cpu" or x.numel() == 0:
        return
    low, high = (float(v) for v in torch.aminmax(x.as_subclass(Tensor)))
    if not (low >= 0.0 and high <= 1.0):  # NaN fails both
        hint = ("; 0-255 floats: divide by 255 or pass uint8" if high > 1.0 and low >= 0.0 else
                "; already normalised? the recipe's mean/std are applied here" if low < 0.0 else "")
        raise ValueError(
            f"{name} has {x.dtype} values in [{low:.4g}, {high:.4g}], expected floats in [0, 1] "
            f"(or uint8 in [0, 255]){hint}"
        )


def _check_dtype(name: str, x: Tensor) -> None:
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise TypeError(
            f"{name}: expected uint8 values in [0, 255] or floats in [0, 1], got dtype {x.dtype} "
            "(band images: convert to float32 in [0, 1])"
        )


def check_image_tensor(image: Tensor, recipe: MultiCropRecipe) -> Tensor:
    """One image for :class:`~dino_pytorch.augment.MultiCropTransform`: a uint8 or floating ``(C, H, W)``
    tensor of a channel count that suits ``recipe``, big enough for its smallest crop, floats in
    ``[0, 1]``.  Returns it as a plain tensor (a ``tv_tensors.Image`` would make v2 kernels re-wrap
    every result)."""
    image = image.as_subclass(Tensor)
    _check_dtype("image", image)
    if image.ndim != 3:
        raise ValueError(f"image: expected a (C, H, W) tensor, got shape {tuple(image.shape)}")
    recipe.check_image_channels("image", image.shape[0])
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"image: empty image of shape {tuple(image.shape)}")
    recipe.check_image_size("image", image.shape[1], image.shape[2])
    check_float_range("image", image)
    return image


def check_batch(images: Any, recipe: MultiCropRecipe) -> None:
    """A batch for :class:`~dino_pytorch.augment.BatchedMultiCrop`: a uint8 or floating ``(B, C, H, W)``
    tensor, not empty, of a channel count that suits ``recipe``, floats in ``[0, 1]`` (CPU only)."""
    if not isinstance(images, Tensor):
        raise TypeError(f"images: expected a (B, C, H, W) tensor, got {type(images).__name__}")
    _check_dtype("images", images)
    if images.ndim != 4:
        raise ValueError(f"images: expected a (B, C, H, W) batch, got shape {tuple(images.shape)}")
    recipe.check_image_channels("images", images.shape[1])
    if 0 in images.shape:
        raise ValueError(f"images: empty batch of shape {tuple(images.shape)}")
    check_float_range("images", images)


def to_image_tensor(image: Any, index: int) -> Tensor:
    """A PIL image ('RGB' / 'L') as a uint8 ``(C, H, W)`` tensor; a uint8 or floating ``(C, H, W)``
    tensor as a plain tensor.  ``index`` names the image in errors (``images[index]``)."""
    if isinstance(image, Image.Image):
        if image.mode not in ("RGB", "L"):
            raise ValueError(
                f"images[{index}]: unsupported PIL mode {image.mode!r}; expected 'RGB' or 'L' "
                "(call image.convert('RGB') first)"
            )
        return TF.pil_to_tensor(image)
    usable = isinstance(image, Tensor) and (image.dtype == torch.uint8 or image.is_floating_point())
    if not usable or image.ndim != 3:
        described = (
            f"{image.dtype} tensor of shape {tuple(image.shape)}" if isinstance(image, Tensor) else type(image).__name__
        )
        raise TypeError(
            f"images[{index}]: expected a PIL image, a uint8 (C, H, W) tensor or a float (C, H, W) tensor in "
            f"[0, 1], got {described}"
        )
    return image.as_subclass(Tensor)


def stack_images(images: Sequence[Union[Tensor, Image.Image]]) -> tuple[Tensor, Tensor]:
    """Stack images of possibly different sizes into one zero-padded batch.

    Args:
        images: PIL images (mode ``'RGB'`` or ``'L'``), uint8 tensors ``(C, H_i, W_i)`` or floating
            tensors ``(C, H_i, W_i)`` in ``[0, 1]``, all with the same channel count ``C``.
    Returns:
        ``(batch, image_sizes)``: ``batch`` is ``(B, C, max H, max W)`` with each image in its top-left
        corner, uint8 when every image is uint8 (or PIL), else float32 (uint8 images divided by 255,
        exactly what :class:`BatchedMultiCrop` does to a uint8 batch); ``image_sizes`` is ``(B, 2)``
        int64 ``(H_i, W_i)``.  Pass both to :class:`BatchedMultiCrop`; its crop boxes stay inside
        each image, so the padding never shows.
    """
    if not isinstance(images, Sequence) or len(images) == 0:
        raise ValueError(f"images: expected a non-empty sequence of images, got {type(images).__name__}")
    tensors = [to_image_tensor(image, i) for i, image in enumerate(images)]
    channels = {t.shape[0] for t in tensors}
    if len(channels) != 1:
        raise ValueError(f"images: all images need the same channel count, got {sorted(channels)}")
    if len({t.dtype for t in tensors}) > 1:
        tensors = [to_unit_float(t) for t in tensors]
    sizes = torch.tensor([t.shape[1:] for t in tensors], dtype=torch.long)
    if sizes.eq(sizes[0]).all():
        return torch.stack(tensors), sizes
    batch = tensors[0].new_zeros((len(tensors), tensors[0].shape[0], *sizes.max(dim=0).values.tolist()))
    for out, t in zip(batch, tensors):
        out[:, : t.shape[1], : t.shape[2]] = t
    return batch, sizes
