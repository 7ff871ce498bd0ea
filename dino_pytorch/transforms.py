"""Deprecated: the multi-crop augmentation lives in :mod:`dino_pytorch.augment`.

Import ``MultiCropTransform``, ``MultiCropRecipe``, ``IMAGENET_MEAN`` and ``IMAGENET_STD`` from
``dino_pytorch.augment`` (or ``MultiCropTransform`` from ``dino_pytorch``); this module only
re-exports them.
"""
import warnings

from .augment.functional import ImageLike
from .augment.per_image import MultiCropTransform
from .augment.recipe import IMAGENET_MEAN, IMAGENET_STD, JitterLike, MultiCropRecipe, ProbsLike, SizeLike

__all__ = ["MultiCropTransform"]

warnings.warn(
    "dino_pytorch.transforms is deprecated; import MultiCropTransform, IMAGENET_MEAN and IMAGENET_STD "
    "from dino_pytorch.augment",
    DeprecationWarning,
    stacklevel=2,
)
