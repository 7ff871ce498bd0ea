"""The multi-crop recipe: the whole augmentation configuration, as data both augmenters read.

DINO's multi-crop augmentation is described once, by a :class:`MultiCropRecipe`: how many global and
local views, their sizes and crop scales, the colour jitter, and the blur / solarize probability of
every view.  A recipe is frozen, validated data: it draws no random numbers and touches no pixels.
The two augmenters read the same recipe and differ only in how they execute it:

* :class:`~dino_pytorch.augment.MultiCropTransform` runs it on one image at a time (DataLoader
  workers; PIL images or uint8 tensors);
* :class:`~dino_pytorch.augment.BatchedMultiCrop` runs it on a whole batch with per-sample random
  parameters (CPU or GPU).

Keeping the configuration in one object means one set of arguments, defaults and checks, and one
answer to the questions derived from them (view count, output channels, blur probability of global
view ``i``, colour-jitter ranges), so the augmenters cannot drift apart.  The defaults are the
official ``DataAugmentationDINO`` recipe (facebookresearch/dino).  A recipe compares and hashes by
value, pickles, and ``dataclasses.replace(recipe, local_crops_number=4)`` makes a checked variant.
The checks of the arguments live in :mod:`~dino_pytorch.augment.recipe_checks`.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, fields
from typing import Any, NamedTuple, Optional, cast

from torchvision.transforms import InterpolationMode

from ..validate import check_float, check_int, check_probability, is_int
from .recipe_checks import (
    InterpolationLike,
    JitterLike,
    ProbsLike,
    SizeLike,
    check_channels,
    check_interpolation,
    check_positive_range,
    check_probs,
    check_scale,
    check_size,
    check_stats,
    check_strength,
)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MultiCropRecipe", "ViewSpec", "RecipeAttributes"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision.transforms.RandomResizedCrop tries this many random boxes before falling back to a
# centre crop; both augmenters keep the number, so the crop distribution stays the official one.
CROP_ATTEMPTS = 10


class ViewSpec(NamedTuple):
    """What the recipe asks of one output view (see :attr:`MultiCropRecipe.view_specs`)."""

    size: tuple[int, int]
    """Output ``(height, width)``."""
    local: bool
    scale: tuple[float, float]
    """Crop area fraction range."""
    blur_prob: float
    solarize_prob: float


# ---------------------------------------------------------------------------------------------
# colour-jitter factor ranges


def _jitter_range(value: JitterLike, center: float, clip_low: bool) -> Optional[tuple[float, float]]:
    # torchvision's ColorJitter._check_input, so both augmenters draw factors from the same range.
    if isinstance(value, tuple):
        low, high = value
    else:
        low, high = center - value, center + value
        if clip_low:
            low = max(low, 0.0)
    return None if low == high == center else (float(low), float(high))


# ---------------------------------------------------------------------------------------------
# the recipe


@dataclass(frozen=True, repr=False)
class MultiCropRecipe:
    """The DINO multi-crop configuration, checked once; the defaults are the official recipe.

    Each image becomes ``[global_1, ..., global_G, local_1, ..., local_N]``: ``G`` global views of
    shape ``(C, *global_crop_size)`` and ``N`` local views of shape ``(C, *local_crop_size)``, with
    ``C = len(mean)``.  Every view is drawn independently: RandomResizedCrop -> horizontal flip ->
    colour jitter -> grayscale -> Gaussian blur -> solarize -> normalise.  For ``C != 3`` (grey or
    band images) saturation, hue and grayscale are skipped, their random draws still taken
    (:attr:`skipped_colour_ops`; docs/augmentation.md, "N-channel images").

    The first three arguments are positional, in the order of the official ``DataAugmentationDINO``;
    the rest are keyword-only.  After construction every field holds its normalised form (tuples of
    floats, ``(height, width)`` int pairs, an :class:`InterpolationMode`).

    Args:
        global_crops_scale: area fraction range ``(low, high)`` of the global crops, ``0 < low <= high <= 1``.
        local_crops_scale: the same for the local crops.
        local_crops_number: ``N >= 0``.
        global_crops_number: ``G >= 1``.
        global_crop_size: output size of the global views, an int or ``(height, width)``.
        local_crop_size: output size of the local views, an int or ``(height, width)``.
        ratio: aspect-ratio range ``(low, high)`` of the crops, ``0 < low <= high``.
        interpolation: an ``InterpolationMode``, its name, or a PIL resampling constant.
        flip_prob: horizontal flip probability.
        brightness: ColorJitter strength (a number ``s`` or a ``(low, high)`` range; 0 turns the
            component off).
        contrast: ColorJitter strength, like ``brightness``.
        saturation: ColorJitter strength, like ``brightness``.
        hue: ColorJitter strength, like ``brightness``.
        color_jitter_prob: probability of applying the colour jitter.
        grayscale_prob: probability of the grey conversion (RGB output only).
        global_blur_probs: blur probability of each global view, cycled when ``G`` exceeds its length.
        local_blur_prob: blur probability of every local view.
        blur_sigma: range ``(low, high)`` of the uniformly drawn blur sigma, ``0 < low <= high``.
        global_solarize_probs: solarize probability of each global view, cycled like the blur ones.
        local_solarize_prob: solarize probability of every local view (0 in the official recipe).
        solarize_threshold: uint8 pixel values ``>= solarize_threshold`` are inverted.
        mean: per-channel normalisation mean in [0, 1], one entry per output channel: 1 (grey), 3 (RGB)
            or C (C-band images); the same length as ``std``.
        std: per-channel normalisation standard deviation, of the same length as ``mean``.
        gram_teacher_scale: also make the Gram teacher's crops (DINOv3's Gram anchoring,
            :mod:`~dino_pytorch.augment.gram_crops`): each global crop is cut at this many times
            ``global_crop_size`` (:attr:`gram_crop_size`), kept undistorted for the Gram teacher, and
            downsampled for the student's global view; the augmenters then append the ``G`` Gram
            crops after the views. None (default): off, the views as without the option.

    Raises:
        TypeError, ValueError: on a bad argument; the message names the argument, the value given and
            what was expected.
    """

    global_crops_scale: Sequence[float] = (0.4, 1.0)
    local_crops_scale: Sequence[float] = (0.05, 0.4)
    local_crops_number: int = 8
    _: KW_ONLY
    global_crops_number: int = 2
    global_crop_size: SizeLike = 224
    local_crop_size: SizeLike = 96
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0)
    interpolation: InterpolationLike = InterpolationMode.BICUBIC
    flip_prob: float = 0.5
    brightness: JitterLike = 0.4
    contrast: JitterLike = 0.4
    saturation: JitterLike = 0.2
    hue: JitterLike = 0.1
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    global_blur_probs: ProbsLike = (1.0, 0.1)
    local_blur_prob: float = 0.5
    blur_sigma: Sequence[float] = (0.1, 2.0)
    global_solarize_probs: ProbsLike = (0.0, 0.2)
    local_solarize_prob: float = 0.0
    solarize_threshold: int = 128
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    gram_teacher_scale: Optional[float] = None

    def __post_init__(self) -> None:
        checked: dict[str, Any] = {
            "global_crops_scale": check_scale("global_crops_scale", self.global_crops_scale),
            "local_crops_scale": check_scale("local_crops_scale", self.local_crops_scale),
            "local_crops_number": check_int("local_crops_number", self.local_crops_number, 0, error=TypeError),
            "global_crops_number": check_int("global_crops_number", self.global_crops_number, 1, error=TypeError),
            "global_crop_size": check_size("global_crop_size", self.global_crop_size),
            "local_crop_size": check_size("local_crop_size", self.local_crop_size),
            "ratio": check_positive_range("ratio", self.ratio, "an aspect-ratio"),
            "interpolation": check_interpolation(self.interpolation),
            "brightness": check_strength("brightness", self.brightness, 1.0, (0.0, math.inf)),
            "contrast": check_strength("contrast", self.contrast, 1.0, (0.0, math.inf)),
            "saturation": check_strength("saturation", self.saturation, 1.0, (0.0, math.inf)),
            "hue": check_strength("hue", self.hue, 0.0, (-0.5, 0.5)),
            "global_blur_probs": check_probs("global_blur_probs", self.global_blur_probs),
            "blur_sigma": check_positive_range("blur_sigma", self.blur_sigma, "a sigma"),
            "global_solarize_probs": check_probs("global_solarize_probs", self.global_solarize_probs),
        }
        for name in ("flip_prob", "color_jitter_prob", "grayscale_prob", "local_blur_prob", "local_solarize_prob"):
            checked[name] = check_probability(name, getattr(self, name), error=TypeError)
        threshold = self.solarize_threshold
        if not is_int(threshold) or not 0 <= threshold <= 255:
            kind = ValueError if is_int(threshold) else TypeError
            raise kind(f"solarize_threshold={threshold!r}, expected an int in [0, 255]")
        checked["solarize_threshold"] = int(threshold)
        checked["mean"], checked["std"] = check_stats(self.mean, self.std)
        if self.gram_teacher_scale is not None:
            checked["gram_teacher_scale"] = check_float("gram_teacher_scale", self.gram_teacher_scale, low=0.0,
                                                        low_open=True, error=TypeError)
        # Frozen: the normalised values go in through object.__setattr__, once, here.
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    # -----------------------------------------------------------------------------------------
    # derived values

    @property
    def num_views(self) -> int:
        """``G + N``, the number of views per image."""
        return self.global_crops_number + self.local_crops_number

    @property
    def gram_crop_size(self) -> Optional[tuple[int, int]]:
        """``(height, width)`` of the Gram teacher's crops: ``gram_teacher_scale`` times
        ``global_crop_size``, rounded; None when the option is off."""
        if self.gram_teacher_scale is None:
            return None
        height, width = cast("tuple[int, int]", self.global_crop_size)
        return max(1, round(self.gram_teacher_scale * height)), max(1, round(self.gram_teacher_scale * width))

    @property
    def num_gram_views(self) -> int:
        """The Gram teacher's crops per image after the views: ``G`` with ``gram_teacher_scale``, else 0."""
        return 0 if self.gram_teacher_scale is None else self.global_crops_number

    @property
    def channels(self) -> int:
        """``C``, the output channel count: ``len(mean)`` (1 grey, 3 RGB, any other count for bands)."""
        return len(self.mean)

    def check_image_channels(self, name: str, channels: int) -> None:
        """Raise a ValueError naming ``name`` when an image of ``channels`` channels does not suit the
        recipe: it must have :attr:`channels` channels, or be grey / RGB for a grey / RGB recipe."""
        check_channels(name, channels, self.channels)

    @property
    def skipped_colour_ops(self) -> tuple[str, ...]:
        """The colour steps this recipe turns on that its channel count skips: saturation, hue and
        grayscale are defined for 3-channel images only.  Empty for 1 and 3 channels (grey images
        have no colour, so nothing is lost there, as in torchvision and PIL)."""
        if self.channels in (1, 3):
            return ()
        jitter = self.color_jitter_prob > 0.0
        _, _, saturation, hue = self.jitter_ranges
        wanted = (("saturation", jitter and saturation is not None), ("hue", jitter and hue is not None),
                  ("grayscale", self.grayscale_prob > 0.0))
        return tuple(name for name, on in wanted if on)

    # The fields are typed as the constructor accepts them; the casts below name the normalised
    # form that __post_init__ stores (tuples, (height, width) pairs, an InterpolationMode).

    def global_blur_prob(self, index: int) -> float:
        """Blur probability of global view ``index`` (0-based), after cycling."""
        probs = cast("tuple[float, ...]", self.global_blur_probs)
        return probs[index % len(probs)]

    def global_solarize_prob(self, index: int) -> float:
        """Solarize probability of global view ``index`` (0-based), after cycling."""
        probs = cast("tuple[float, ...]", self.global_solarize_probs)
        return probs[index % len(probs)]

    @property
    def view_specs(self) -> list[ViewSpec]:
        """One :class:`ViewSpec` per output view, in output order (globals first)."""
        global_size = cast("tuple[int, int]", self.global_crop_size)
        global_scale = cast("tuple[float, float]", self.global_crops_scale)
        specs = [
            ViewSpec(global_size, False, global_scale, self.global_blur_prob(i), self.global_solarize_prob(i))
            for i in range(self.global_crops_number)
        ]
        local = ViewSpec(cast("tuple[int, int]", self.local_crop_size), True,
                         cast("tuple[float, float]", self.local_crops_scale), self.local_blur_prob,
                         self.local_solarize_prob)
        return specs + [local] * self.local_crops_number

    @property
    def min_crop_scale(self) -> float:
        """The smallest area fraction any view may crop: ``global_crops_scale[0]``, or
        ``local_crops_scale[0]`` when smaller and there are local views."""
        scales = [cast("tuple[float, float]", self.global_crops_scale)[0]]
        if self.local_crops_number > 0:
            scales.append(cast("tuple[float, float]", self.local_crops_scale)[0])
        return min(scales)

    @property
    def min_image_pixels(self) -> int:
        """The smallest image area ``H * W`` the recipe accepts: its smallest crop,
        :attr:`min_crop_scale` of the area, must cover at least one pixel (20 pixels for the
        official local scale 0.05, e.g. 5x4; 3 for a global scale of 0.4).  Below that, the crops at
        the low end of the scale range round to empty boxes and are drawn again (or replaced by the
        centre crop), so the views would silently stop following the recipe's scale range (a 1x1
        image gives the same constant view whatever the recipe)."""
        scale = self.min_crop_scale
        pixels = math.ceil(1.0 / scale)
        while pixels > 1 and (pixels - 1) * scale >= 1.0:  # 1 / scale rounded up past an integer
            pixels -= 1
        while pixels * scale < 1.0:
            pixels += 1
        return pixels

    def check_image_size(self, name: str, height: int, width: int) -> None:
        """Raise a ValueError naming ``name`` when an image of ``height x width`` pixels is smaller
        than :attr:`min_image_pixels`."""
        if height * width * self.min_crop_scale < 1.0:
            which = ("local_crops_scale" if self.local_crops_number > 0
                     and self.min_crop_scale == cast("tuple[float, float]", self.local_crops_scale)[0]
                     else "global_crops_scale")
            area = height * width
            raise ValueError(
                f"{name}=({height}, {width}) is {area} pixel{'' if area == 1 else 's'}, expected at least "
                f"{self.min_image_pixels} (H * W): the smallest crop, {which}[0]={self.min_crop_scale} of the "
                "area, must cover one pixel"
            )

    @property
    def jitter_ranges(self) -> tuple[Optional[tuple[float, float]], ...]:
        """Factor ranges of (brightness, contrast, saturation, hue), None for a disabled component.

        Brightness, contrast and saturation factors are clipped at 0; a hue shift lies in [-0.5, 0.5].
        """
        return (
            _jitter_range(self.brightness, 1.0, clip_low=True),
            _jitter_range(self.contrast, 1.0, clip_low=True),
            _jitter_range(self.saturation, 1.0, clip_low=True),
            _jitter_range(self.hue, 0.0, clip_low=False),
        )

    def note_skipped_colour_ops(self, owner: str) -> None:
        """One warning line when :attr:`skipped_colour_ops` is not empty (Python shows a given warning
        once per place by default); ``owner`` names the augmenter."""
        skipped = self.skipped_colour_ops
        if skipped:
            warnings.warn(
                f"{owner}: {', '.join(skipped)} need 3-channel images and are skipped for the recipe's "
                f"{self.channels} channels (len(mean)); their random draws are still taken, so the other "
                "parameters are unchanged (set them to 0 to silence this note)",
                UserWarning, stacklevel=3,
            )

    def settings(self) -> dict[str, Any]:
        """Every field by name, interpolation as its name; ``MultiCropRecipe(**settings())`` is equal."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["interpolation"] = cast(InterpolationMode, self.interpolation).value
        return values

    def __repr__(self) -> str:
        return f"MultiCropRecipe({', '.join(f'{k}={v!r}' for k, v in self.settings().items())})"

    @classmethod
    def resolve(cls, owner: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                recipe: Optional[MultiCropRecipe]) -> MultiCropRecipe:
        """The recipe an augmenter's ``__init__(*args, recipe=None, **kwargs)`` asks for: ``recipe``
        itself, or one built from the arguments; giving both is an error."""
        if recipe is None:
            return cls(*args, **kwargs)
        if not isinstance(recipe, cls):
            raise TypeError(f"recipe={recipe!r}, expected a MultiCropRecipe")
        if args or kwargs:
            given = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
            raise TypeError(
                f"{owner}: pass either recipe= or the recipe's arguments, not both "
                f"(got recipe= and {', '.join(given)}); use dataclasses.replace(recipe, ...) for a variant"
            )
        return recipe


# ---------------------------------------------------------------------------------------------
# read access for the augmenters

_DERIVED = ("num_views", "gram_crop_size", "num_gram_views", "channels", "global_blur_prob", "global_solarize_prob",
            "view_specs", "jitter_ranges", "min_crop_scale", "min_image_pixels", "check_image_size",
            "check_image_channels", "skipped_colour_ops")


class RecipeAttributes:
    """Mixin for the augmenters: ``augmenter.<name>`` reads ``augmenter.recipe.<name>``.

    Covers every recipe field and derived helper (``t.global_crops_scale``, ``t.num_views``,
    ``t.global_blur_prob(0)``, ...).  The attributes are read-only, as the recipe is frozen: build a
    new augmenter from ``dataclasses.replace(t.recipe, ...)`` for a variant.  Class-level properties
    rather than ``__getattr__``, which ``nn.Module`` already uses for parameters and submodules.
    """

    recipe: MultiCropRecipe


def _read_through(name: str) -> property:
    def get(self: RecipeAttributes) -> Any:
        return getattr(self.recipe, name)

    return property(get, doc=f"``self.recipe.{name}`` (read-only).")


for _name in [f.name for f in fields(MultiCropRecipe)] + list(_DERIVED):
    setattr(RecipeAttributes, _name, _read_through(_name))


def augmenter_signature() -> inspect.Signature:
    """``(self, <the recipe's arguments>, *, recipe=None)``, for ``help()`` and IDEs on the augmenters,
    whose ``__init__`` forwards ``*args, **kwargs`` to :class:`MultiCropRecipe`."""
    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    recipe = inspect.Parameter("recipe", inspect.Parameter.KEYWORD_ONLY, default=None,
                               annotation="Optional[MultiCropRecipe]")
    return inspect.Signature([this, *inspect.signature(MultiCropRecipe).parameters.values(), recipe])
