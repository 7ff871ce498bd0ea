"""Multi-crop augmentation for DINO: one recipe, two ways to run it.

* :class:`MultiCropRecipe` (``recipe.py``): the whole validated configuration, frozen data; the
  defaults are the official DINO recipe.
* :class:`MultiCropTransform` (``per_image.py``): runs the recipe on one image at a time, as a
  DataLoader transform (PIL images, uint8 tensors ``(C, H, W)``, or float ``(C, H, W)`` band images
  in ``[0, 1]`` with any ``C = len(mean)``).
* :class:`BatchedMultiCrop` (``batched.py``): runs it on a whole batch ``(B, C, H, W)`` with
  per-sample random parameters (:class:`ViewParams`), on the CPU or the GPU.
* ``inputs.py``: the images both accept (one set of checks: dtype, shape, channels against
  ``len(mean)``, the float range) and :func:`stack_images`, which batches images of different sizes.
* ``draws.py``: the uniform numbers behind the batched parameters (one stream per batch, or one
  seeded stream per image with ``seeds=``) and the crop-box sampler.
* ``resolution_mix.py``: DINOv3's high-resolution stage, one (global, local, Gram) crop-size triple
  drawn per batch (:class:`ResolutionMix`), the crops made at it by either augmenter.
* ``functional.py``: the kernels both use, which draw nothing (``torchvision.transforms.v2.functional``
  style: the classes draw random parameters, the functions compute).

Both augmenters take either ``recipe=`` or the recipe's arguments::

    recipe = MultiCropRecipe(local_crops_number=6)
    per_image, batched = MultiCropTransform(recipe=recipe), BatchedMultiCrop(recipe=recipe)
"""

from .batched import BatchedMultiCrop, ViewParams, multicrop_collate, stack_images
from .per_image import MultiCropTransform
from .recipe import IMAGENET_MEAN, IMAGENET_STD, MultiCropRecipe
from .resolution_mix import MixedResolutionCrops, ResolutionMix, SizeTriple

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BatchedMultiCrop",
    "MultiCropRecipe",
    "MultiCropTransform",
    "MixedResolutionCrops",
    "ResolutionMix",
    "SizeTriple",
    "ViewParams",
    "multicrop_collate",
    "stack_images",
]
