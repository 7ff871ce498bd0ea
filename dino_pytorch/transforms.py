"""Deprecated: the multi-crop augmentation lives in :mod:`dino_pytorch.augment`.

Import ``MultiCropTransform``, ``MultiCropRecipe``, ``IMAGENET_MEAN`` and ``IMAGENET_STD`` from
``dino_pytorch.augment`` (or ``MultiCropTransform`` from ``dino_pytorch``); this module only
re-exports them.
"""
import warnings

# `X as X`: explicit re-exports (kept out of __all__, which names only MultiCropTransform).
from .augment.functional import ImageLike as ImageLike
from .augment.per_image import MultiCropTransform
from .augment.recipe import IMAGENET_MEAN as IMAGENET_MEAN
from .augment.recipe import IMAGENET_STD as IMAGENET_STD
from .augment.recipe import JitterLike as JitterLike
from .augment.recipe import MultiCropRecipe as MultiCropRecipe
from .augment.recipe import ProbsLike as ProbsLike
from .augment.recipe import SizeLike as SizeLike

__all__ = ["MultiCropTransform"]

warnings.warn(
    "dino_pytorch.transforms is deprecated; import MultiCropTransform, IMAGENET_MEAN and IMAGENET_STD "
    "from dino_pytorch.augment",
    DeprecationWarning,
    stacklevel=2,
)
