"""The Gram teacher's crops (DINOv3's Gram anchoring), for both augmenters.

With ``MultiCropRecipe(gram_teacher_scale=s)`` every global view is made as DINOv3's
``DataAugmentationDINO`` makes it with ``gram_teacher_crops_size`` and ``gram_teacher_no_distortions``
(its gram-anchor config):

1. the random crop box is resized to ``s`` times the global size (:attr:`MultiCropRecipe.gram_crop_size`)
   and flipped: the *base* crop;
2. the Gram teacher's crop is the base, normalised, with no other distortion;
3. the student's (and the EMA teacher's) global view is the base resized to the global size
   (bicubic, antialiased, as DINOv3's ``v2.Resize``), then the usual colour jitter, grayscale, blur
   and solarize.

The random draws are those of the view without the option, in the same order, so local views and
every parameter are unchanged; only the global views' resampling differs (crop -> big -> small
instead of crop -> small). The outputs are ``[global_1..G, local_1..N, gram_1..G]``: split them with
``views[:recipe.num_views]`` and ``views[recipe.num_views:]`` (``DINO(views, gram_views=...)``).
"""
from __future__ import annotations

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from . import functional as AF
from .functional import ImageLike
from .recipe import MultiCropRecipe

__all__ = ["split_image", "split_batch"]


def split_image(base: ImageLike, size: tuple[int, int], recipe: MultiCropRecipe) -> tuple[Tensor, ImageLike]:
    """One image's base crop (PIL or uint8 ``(C, h', w')``) -> ``(Gram crop (C, h', w') float32 normalised,
    the student's crop resized to ``size``, still to be distorted)``."""
    pixels = TF.pil_to_tensor(base) if isinstance(base, Image.Image) else base
    gram = AF.normalize(AF.to_unit_float(pixels), recipe.mean, recipe.std)
    height, width = TF.get_size(base)
    return gram, AF.resized_crop_image(base, 0, 0, height, width, size, _interpolation(recipe))


def split_batch(base: Tensor, size: tuple[int, int], recipe: MultiCropRecipe) -> tuple[Tensor, Tensor]:
    """A batch of float base crops ``(B, C, h', w')`` in ``[0, 1]`` -> ``(Gram crops normalised, the student's
    crops (B, C, *size) in [0, 1], still to be distorted)``."""
    batch, height, width = base.shape[0], base.shape[2], base.shape[3]
    whole = torch.tensor([[0, 0, height, width]], dtype=torch.long).expand(batch, 4)
    no_flip = torch.zeros(batch, dtype=torch.bool)
    small = AF.resized_crop(base, whole, no_flip, size, _interpolation(recipe))
    return AF.normalize(base, recipe.mean, recipe.std), small


def _interpolation(recipe: MultiCropRecipe) -> InterpolationMode:
    interpolation = recipe.interpolation
    assert isinstance(interpolation, InterpolationMode)  # normalised by the recipe
    return interpolation
