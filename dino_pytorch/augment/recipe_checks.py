"""The checks of :class:`~dino_pytorch.augment.MultiCropRecipe`'s arguments, and the forms they accept.

Each check takes the argument's name and its value as given, raises a TypeError or ValueError naming
both and what was expected, and returns the value normalised (tuples of floats, ``(height, width)``
int pairs, an :class:`InterpolationMode`), which the recipe stores.  The checks specific to
multi-crop live here; the general ones come from :mod:`dino_pytorch.validate`.  One more,
:func:`check_channels`, compares an image's channel count with the recipe's (``len(mean)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Union

from PIL import Image
from torchvision.transforms import InterpolationMode

from ..validate import check_number_pair, check_probability, is_int, is_number

__all__ = [
    "SizeLike", "ProbsLike", "JitterLike", "InterpolationLike", "check_interpolation", "check_positive_range",
    "check_probs", "check_scale", "check_size", "check_stats", "check_strength", "check_channels",
]

SizeLike = Union[int, Sequence[int]]
ProbsLike = Union[float, Sequence[float]]
JitterLike = Union[float, tuple[float, float]]
InterpolationLike = Union[InterpolationMode, str, int]


def check_scale(name: str, value: Any) -> tuple[float, float]:
    lo, hi = check_number_pair(name, value)
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(
            f"impossible crop scale {name}={value!r}: expected 0 < low <= high <= 1 "
            "(fractions of the image area)"
        )
    return lo, hi


def check_positive_range(name: str, value: Any, what: str) -> tuple[float, float]:
    lo, hi = check_number_pair(name, value)
    if not 0.0 < lo <= hi:
        raise ValueError(f"{name}={value!r}, expected {what} range 0 < low <= high")
    return lo, hi


def check_size(name: str, value: Any) -> tuple[int, int]:
    pair = (value, value) if is_int(value) else value
    expected = "an int or a (height, width) pair of ints"
    if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2 or not all(map(is_int, pair)):
        raise TypeError(f"{name}={value!r}, expected {expected}")
    if not all(v > 0 for v in pair):
        raise ValueError(f"{name}={value!r}, expected {expected}, all positive")
    return int(pair[0]), int(pair[1])


def check_probs(name: str, value: Any) -> tuple[float, ...]:
    """One probability per global view (cycled), or a single one for all of them."""
    if is_number(value):
        return (check_probability(name, value, error=TypeError),)
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) == 0:
        raise TypeError(f"{name}={value!r}, expected a probability or a non-empty sequence of probabilities")
    return tuple(check_probability(f"{name}[{i}]", p, error=TypeError) for i, p in enumerate(value))


def check_strength(name: str, value: Any, center: float, bound: tuple[float, float]) -> JitterLike:
    """A jitter strength as ColorJitter takes it: ``s`` meaning ``[center - s, center + s]``
    (clipped to ``bound``), or an explicit ``(low, high)`` range inside ``bound``."""
    lo_b, hi_b = bound
    if is_number(value):
        # Hue is a shift around 0, so its strength may not reach past the colour circle's half.
        upper = min(center - lo_b, hi_b - center) if center == 0.0 else math.inf
        if not (0.0 <= value <= upper and math.isfinite(value)):
            limit = f"in [0, {upper}]" if math.isfinite(upper) else ">= 0 (finite)"
            raise ValueError(f"{name}={value!r}, expected a strength {limit} or a (low, high) range")
        return float(value)
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        lo, hi = check_number_pair(name, value)
        if not lo_b <= lo <= hi <= hi_b:
            raise ValueError(f"{name}={value!r}, expected a range {lo_b} <= low <= high <= {hi_b}")
        return (lo, hi)
    raise TypeError(f"{name}={value!r}, expected a non-negative number or a (low, high) pair of numbers")


def check_stats(mean: Any, std: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``mean`` and ``std``, one entry per output channel: 1 (grey), 3 (RGB) or C (C-band images)."""
    for name, value in (("mean", mean), ("std", std)):
        if isinstance(value, str) or not isinstance(value, Sequence) or not all(map(is_number, value)):
            raise TypeError(
                f"{name}={value!r}, expected a sequence of numbers, one per channel (1 or 3 numbers for grey "
                "or RGB images, C for C-band images)"
            )
    if len(mean) != len(std) or len(mean) == 0:
        raise ValueError(
            f"mean={tuple(mean)!r} and std={tuple(std)!r}: expected equal lengths of at least 1, one entry per "
            f"output channel (1 grey, 3 RGB, C for C bands), got {len(mean)} and {len(std)}"
        )
    if not all(0.0 < s < math.inf for s in std):
        raise ValueError(f"std={tuple(std)!r}, expected every std finite and > 0")
    if not all(0.0 <= m <= 1.0 for m in mean):
        hint = " (0-255 statistics? divide mean and std by 255)" if any(m > 1.0 for m in mean) else ""
        raise ValueError(
            f"mean={tuple(mean)!r}, expected every mean in [0, 1], the scale of the images it is "
            f"subtracted from{hint}"
        )
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def check_channels(name: str, channels: int, recipe_channels: int) -> None:
    """An image of ``channels`` channels suits a recipe of ``recipe_channels`` (``len(mean)``) when
    they are equal, or when both are grey / RGB (1 <-> 3 is converted); else a ValueError."""
    if channels == recipe_channels or {channels, recipe_channels} <= {1, 3}:
        return
    expected = "C in {1, 3}" if recipe_channels in (1, 3) else f"C = {recipe_channels}"
    raise ValueError(
        f"{name} has {channels} channels, expected {expected} for the recipe's {recipe_channels} output "
        f"channels (len(mean) = {recipe_channels}); for {channels}-band images pass mean and std with "
        f"{channels} entries"
    )


def check_interpolation(value: Any) -> InterpolationMode:
    if isinstance(value, InterpolationMode):
        return value
    try:
        if isinstance(value, str):
            return InterpolationMode(value.lower())
        if is_int(value):
            # The official script passes PIL constants such as Image.BICUBIC (== 3).
            return InterpolationMode[Image.Resampling(value).name]
    except (ValueError, KeyError):
        pass
    names = ", ".join(repr(m.value) for m in InterpolationMode)
    raise ValueError(
        f"interpolation={value!r}, expected an InterpolationMode, a PIL resampling constant or one of {names}"
    )
