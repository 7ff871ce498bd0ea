"""Per-image multi-crop augmentation for DINO, as a DataLoader transform.

:class:`MultiCropTransform` executes a :class:`~dino_pytorch.augment.MultiCropRecipe` on one image
and returns the list of views that DINO trains on::

    [global_1, ..., global_G, local_1, ..., local_N]

Every view is a ``float32`` tensor of shape ``(C, H, W)``, normalised with ``mean`` / ``std``:

* a global view has shape ``(C, *global_crop_size)`` -- ``(3, 224, 224)`` by default;
* a local view has shape ``(C, *local_crop_size)`` -- ``(3, 96, 96)`` by default;
* ``C == len(mean)`` (1 grey, 3 RGB, or the band count of band images).

With the default recipe this is the official ``DataAugmentationDINO`` (facebookresearch/dino).  PIL
inputs go through PIL's own operations (as in the official code); uint8 tensors go through
torchvision's tensor kernels; float tensors in ``[0, 1]`` (band images, any channel count) go through
the float kernels of :mod:`~dino_pytorch.augment.functional` that the batched augmenter runs, on a
batch of one.  All random draws come from torch's global RNG, so
``torch.manual_seed`` alone reproduces the views (and DataLoader workers get distinct streams
because the DataLoader seeds torch per worker).

Batching needs no custom collate: the default ``DataLoader`` collate turns a batch of view lists
into a list of ``G + N`` tensors, the global ones of shape ``(B, C, *global_crop_size)`` and the
local ones of shape ``(B, C, *local_crop_size)``.
"""

from __future__ import annotations

import math
from typing import Any, Optional, cast

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from . import functional as AF
from .crop_box import SCALAR, centred_box, try_size
from .functional import ImageLike
from .gram_crops import split_batch, split_image
from .inputs import check_image_tensor
from .recipe import CROP_ATTEMPTS, MultiCropRecipe, RecipeAttributes, ViewSpec, augmenter_signature

__all__ = ["MultiCropTransform"]


def _uniform(low: float = 0.0, high: float = 1.0) -> float:
    # float64 so that probability comparisons are as fine-grained as the official random.random().
    return float(torch.empty((), dtype=torch.float64).uniform_(low, high))


def _randint(low: int, high: int) -> int:
    """An int in [low, high], inclusive."""
    return int(torch.randint(low, high + 1, size=()))


def _jitter_draws(ranges: tuple[Optional[tuple[float, float]], ...]) -> tuple[list[int], list[Optional[float]]]:
    """The draws of torchvision's ``v2.ColorJitter`` (its ``make_params``), in its order: a permutation
    of the 4 op ids, then one float32 uniform per enabled factor; None for a disabled one."""
    order = torch.randperm(4).tolist()
    return order, [None if r is None else float(torch.empty(1).uniform_(*r).item()) for r in ranges]


class MultiCropTransform(RecipeAttributes, nn.Module):
    """DINO multi-crop augmentation: one image in, ``G + N`` normalised views out.

    ``transform(image)`` returns ``[global_1, ..., global_G, local_1, ..., local_N]`` where

    * each global view is a ``float32`` tensor of shape ``(C, gh, gw)``, ``(gh, gw) = global_crop_size``
      (``(3, 224, 224)`` by default);
    * each local view is a ``float32`` tensor of shape ``(C, lh, lw)``, ``(lh, lw) = local_crop_size``
      (``(3, 96, 96)`` by default);
    * ``C = len(mean)``: 3 gives RGB output (greyscale inputs are replicated), 1 gives greyscale
      output (RGB inputs are converted with the ITU-R 601-2 luma transform), any other count takes
      band images of that many channels.

    Each view is drawn independently, in this order: RandomResizedCrop -> horizontal flip ->
    colour jitter -> grayscale -> Gaussian blur -> solarize -> float in [0, 1] -> normalise.

    Construction: ``MultiCropTransform(recipe=recipe)``, or the arguments of
    :class:`~dino_pytorch.augment.MultiCropRecipe`, from which the recipe is built.  Its first three
    positional arguments are those of the official ``DataAugmentationDINO``
    (``global_crops_scale, local_crops_scale, local_crops_number``), so this class is a drop-in
    replacement.  The recipe's fields read through as attributes (``t.global_crops_scale``,
    ``t.num_views``, ``t.global_blur_prob(i)``, ...).

    Inputs are PIL images in mode ``'RGB'`` or ``'L'``, ``uint8`` tensors of shape ``(C, H, W)``
    with ``C`` in ``{1, 3}``, or floating tensors ``(C, H, W)`` with values in ``[0, 1]`` and any ``C``
    (``C == len(mean)``, or 1 / 3 for a grey or RGB recipe; a uint8 tensor of another ``C`` is taken
    as ``image / 255``), of at least
    :attr:`~dino_pytorch.augment.MultiCropRecipe.min_image_pixels` pixels (``H * W``; 20 for the
    official local scale 0.05): a smaller image raises a ValueError, as its smallest crops would
    cover no pixel.  PIL inputs use PIL's operations (official numerics, including PIL's
    ``ImageFilter.GaussianBlur`` whose radius acts as sigma); tensor inputs use torchvision's tensor
    kernels, and their blur uses an odd kernel of size ``2 * ceil(3 * sigma) + 1`` (so it covers
    about +/- 3 sigma), shrunk where needed to stay smaller than twice the view's side, as reflect
    padding requires.  The two paths draw the same distribution of views but are not bit-identical
    (resize and blur kernels differ), except for grey conversion, which uses PIL's rounded formula
    on tensors too.  Float inputs go through :class:`BatchedMultiCrop`'s float kernels (no rounding
    between steps), so for the same parameters the two augmenters give the same views; for
    ``C != 3`` saturation, hue and grayscale are skipped (their draws still taken) and contrast
    blends each band with its own mean (docs/augmentation.md, "N-channel images").

    Randomness: every draw (crop box, flip, jitter factors and order, grayscale, blur and its sigma,
    solarize) comes from torch's global RNG.  An op is applied when ``u < p`` for a uniform ``u``,
    except blur, which keeps the official ``u <= p``; a probability of 0 never applies.

    The default ``DataLoader`` collate batches the returned lists into a list of ``G + N`` tensors of
    shape ``(B, C, H, W)``; no custom collate function is needed.
    """

    def __init__(self, *args: Any, recipe: Optional[MultiCropRecipe] = None, **kwargs: Any) -> None:
        super().__init__()
        self.recipe = MultiCropRecipe.resolve(type(self).__name__, args, kwargs, recipe)
        self.recipe.note_skipped_colour_ops(type(self).__name__)
        # v2.ColorJitter draws its factors and their order from torch's RNG and dispatches to PIL
        # kernels for PIL images, which is exactly the official behaviour.
        self.color_jitter = v2.ColorJitter(*self.recipe.jitter_ranges)

    __init__.__signature__ = augmenter_signature()  # type: ignore[attr-defined]

    def sample_crop_params(self, height: int, width: int, *, local: bool = False) -> tuple[int, int, int, int]:
        """Draw one crop box ``(top, left, crop_height, crop_width)`` for an image of this size.

        Uses the global (or, with ``local=True``, the local) crop scale and ``ratio``.  The scheme is
        the one of ``torchvision.transforms.RandomResizedCrop`` (:mod:`~dino_pytorch.augment.crop_box`):
        up to 10 tries of a uniform area fraction and a log-uniform aspect ratio, drawn one try at a
        time from torch's global RNG, then a centre crop with the ratio clamped into range.
        """
        ratio = cast("tuple[float, float]", self.recipe.ratio)
        scale = self.recipe.local_crops_scale if local else self.recipe.global_crops_scale
        log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
        for _ in range(CROP_ATTEMPTS):
            fraction = _uniform(scale[0], scale[1])
            log_aspect = _uniform(log_lo, log_hi)
            crop_h, crop_w, fits = try_size(height, width, fraction, log_aspect, SCALAR)
            if fits:
                return _randint(0, height - crop_h), _randint(0, width - crop_w), crop_h, crop_w
        return centred_box(height, width, ratio, SCALAR)

    def forward(self, image: ImageLike) -> list[torch.Tensor]:
        """Return ``[global_1, ..., global_G, local_1, ..., local_N]`` for one image.

        Args:
            image: a PIL image (mode ``'RGB'`` or ``'L'``), a uint8 tensor ``(C, H, W)`` with ``C`` in
                {1, 3}, or a floating tensor ``(C, H, W)`` in ``[0, 1]`` with ``C == len(mean)``.
        Returns:
            ``G`` float32 tensors ``(C_out, *global_crop_size)`` then ``N`` of ``(C_out, *local_crop_size)``;
            with ``gram_teacher_scale``, then the ``G`` Gram teacher's crops ``(C_out, *gram_crop_size)``
            (:mod:`~dino_pytorch.augment.gram_crops`).
        """
        image = self._prepare(image)
        grams: list[torch.Tensor] = []
        if isinstance(image, torch.Tensor) and image.is_floating_point():
            return [self._float_view(image, spec, grams) for spec in self.recipe.view_specs] + grams
        return [self._view(image, spec, grams) for spec in self.recipe.view_specs] + grams

    def _prepare(self, image: ImageLike) -> ImageLike:
        """Check the input and give it the output's channel count, once for all views."""
        if isinstance(image, Image.Image):
            if image.mode not in ("RGB", "L"):
                raise ValueError(
                    f"image: unsupported PIL mode {image.mode!r}; expected 'RGB' or 'L' "
                    "(call image.convert('RGB') first)"
                )
            self.recipe.check_image_channels("image", len(image.getbands()))
            self.recipe.check_image_size("image", image.height, image.width)
            wanted = "RGB" if self.channels == 3 else "L"
            return image if image.mode == wanted else image.convert(wanted)

        if isinstance(image, torch.Tensor):
            image = check_image_tensor(image, self.recipe)
            if image.dtype == torch.uint8 and image.shape[0] not in (1, 3):
                image = AF.to_unit_float(image)  # torchvision's uint8 colour kernels take 1 or 3 channels
            if image.is_floating_point():
                # The float path: float32 (exact for float16 / bfloat16), channels as the batched path.
                return AF.match_channels(image.to(torch.float32).unsqueeze(0), self.recipe.channels)[0]
            if image.shape[0] == self.channels:
                return image
            return AF.to_grey_image(image, channels=1) if self.channels == 1 else image.repeat(3, 1, 1)

        raise TypeError(
            f"image: expected a PIL.Image.Image or a uint8 or float torch.Tensor (C, H, W), got {type(image).__name__}"
        )

    def _view(self, image: ImageLike, spec: ViewSpec, grams: list[torch.Tensor]) -> torch.Tensor:
        """One view; a global view with ``gram_teacher_scale`` appends its Gram crop to ``grams``."""
        r = self.recipe
        height, width = TF.get_size(image)
        top, left, crop_h, crop_w = self.sample_crop_params(height, width, local=spec.local)
        big = None if spec.local else r.gram_crop_size
        view = AF.resized_crop_image(image, top, left, crop_h, crop_w, big or spec.size, r.interpolation)

        if _uniform() < r.flip_prob:
            view = TF.horizontal_flip(view)
        if big is not None:
            gram, view = split_image(view, spec.size, r)
            grams.append(gram)
        if _uniform() < r.color_jitter_prob:
            view = self.color_jitter(view)
        if _uniform() < r.grayscale_prob and r.channels == 3:
            view = AF.to_grey_image(view, channels=3)
        # The official blur test is `random() <= p`; the `p > 0` guard makes p = 0 a hard off switch.
        if spec.blur_prob > 0.0 and _uniform() <= spec.blur_prob:
            view = AF.gaussian_blur_image(view, _uniform(*r.blur_sigma))
        if spec.solarize_prob > 0.0 and _uniform() < spec.solarize_prob:
            view = TF.solarize(view, threshold=r.solarize_threshold)
        if isinstance(view, Image.Image):
            view = TF.pil_to_tensor(view)
        return AF.normalize(AF.to_unit_float(view), r.mean, r.std)

    def _float_view(self, image: torch.Tensor, spec: ViewSpec, grams: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`_view` for a float32 ``(C, H, W)`` image in ``[0, 1]``: the same draws, in the same
        order, through the batched float kernels on a batch of one (so any ``C`` works)."""
        r = self.recipe
        top, left, crop_h, crop_w = self.sample_crop_params(image.shape[1], image.shape[2], local=spec.local)
        flip = torch.tensor([_uniform() < r.flip_prob])
        box = torch.tensor([[top, left, crop_h, crop_w]])
        big = None if spec.local else r.gram_crop_size
        view = AF.resized_crop(image.unsqueeze(0), box, flip, big or spec.size, r.interpolation)  # (1, C, h, w)
        if big is not None:
            gram, view = split_batch(view, spec.size, r)
            grams.append(gram[0])
        if _uniform() < r.color_jitter_prob:
            # ColorJitter's draws, so the stream matches the uint8 path's; applied by the float kernels.
            order, factors = _jitter_draws(r.jitter_ranges)
            for op in order:
                if factors[op] is not None and AF.colour_op_applies(op, view.shape[1]):
                    view = AF.JITTER_OPS[op](view, torch.tensor([factors[op]], dtype=view.dtype))
        if _uniform() < r.grayscale_prob and r.channels == 3:
            view = AF.grayscale(view)
        if spec.blur_prob > 0.0 and _uniform() <= spec.blur_prob:
            view = AF.gaussian_blur(view, torch.tensor([_uniform(*r.blur_sigma)], dtype=torch.float64))
        if spec.solarize_prob > 0.0 and _uniform() < spec.solarize_prob:
            view = AF.solarize(view, r.solarize_threshold)
        return AF.normalize(view[0], r.mean, r.std)

    def extra_repr(self) -> str:
        r = self.recipe
        interpolation = cast(InterpolationMode, r.interpolation)  # normalised by the recipe
        lines = [
            f"global_crops_number={r.global_crops_number}, global_crop_size={r.global_crop_size}, "
            f"global_crops_scale={r.global_crops_scale},",
            f"local_crops_number={r.local_crops_number}, local_crop_size={r.local_crop_size}, "
            f"local_crops_scale={r.local_crops_scale},",
            f"ratio=({r.ratio[0]:.4g}, {r.ratio[1]:.4g}), interpolation={interpolation.value},",
            f"flip_prob={r.flip_prob}, color_jitter_prob={r.color_jitter_prob} "
            f"(brightness={r.brightness}, contrast={r.contrast}, saturation={r.saturation}, "
            f"hue={r.hue}), grayscale_prob={r.grayscale_prob},",
            f"global_blur_probs={r.global_blur_probs}, local_blur_prob={r.local_blur_prob}, "
            f"blur_sigma={r.blur_sigma},",
            f"global_solarize_probs={r.global_solarize_probs}, local_solarize_prob={r.local_solarize_prob}, "
            f"solarize_threshold={r.solarize_threshold},",
            f"mean={r.mean}, std={r.std}",
        ]
        return "\n".join(lines)
