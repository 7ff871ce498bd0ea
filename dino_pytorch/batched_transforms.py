"""Deprecated: the batched multi-crop augmentation lives in :mod:`dino_pytorch.augment`.

Import ``BatchedMultiCrop``, ``ViewParams``, ``multicrop_collate`` and ``stack_images`` from
``dino_pytorch.augment``; this module only re-exports them.  ``BatchedMultiCrop.apply`` is now
``BatchedMultiCrop.apply_params`` (``apply`` is ``nn.Module.apply`` again).
"""
import warnings

from .augment.batched import BatchedMultiCrop, ViewParams, multicrop_collate, stack_images

# `X as X`: explicit re-exports of names that the old module also offered (not in __all__).
from .augment.per_image import MultiCropTransform as MultiCropTransform
from .augment.recipe import IMAGENET_MEAN as IMAGENET_MEAN
from .augment.recipe import IMAGENET_STD as IMAGENET_STD

__all__ = ["BatchedMultiCrop", "ViewParams", "multicrop_collate", "stack_images"]

warnings.warn(
    "dino_pytorch.batched_transforms is deprecated; import BatchedMultiCrop, ViewParams, multicrop_collate "
    "and stack_images from dino_pytorch.augment",
    DeprecationWarning,
    stacklevel=2,
)
