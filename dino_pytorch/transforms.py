"""Multi-crop data augmentation for DINO.

:class:`MultiCropTransform` turns one image into the list of views that DINO trains on::

    [global_1, ..., global_G, local_1, ..., local_N]

Every view is a ``float32`` tensor of shape ``(C, H, W)``, normalised with ``mean`` / ``std``:

* a global view has shape ``(C, *global_crop_size)`` -- ``(3, 224, 224)`` by default;
* a local view has shape ``(C, *local_crop_size)`` -- ``(3, 96, 96)`` by default;
* ``C == len(mean)`` (1 or 3).

The defaults reproduce the official ``DataAugmentationDINO`` (facebookresearch/dino): two global
views, eight local views, the same crop scales, jitter strengths and per-view blur / solarize
probabilities.  PIL inputs go through PIL's own operations (as in the official code); uint8
tensors go through torchvision's tensor kernels.  All random draws come from torch's global RNG,
so ``torch.manual_seed`` alone reproduces the views (and DataLoader workers get distinct streams
because the DataLoader seeds torch per worker).

Batching needs no custom collate: the default ``DataLoader`` collate turns a batch of view lists
into a list of ``G + N`` tensors, the global ones of shape ``(B, C, *global_crop_size)`` and the
local ones of shape ``(B, C, *local_crop_size)``.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image, ImageFilter
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = ["MultiCropTransform"]

SizeLike = Union[int, Sequence[int]]
ProbsLike = Union[float, Sequence[float]]
ImageLike = Union[Image.Image, torch.Tensor]
JitterLike = Union[float, Tuple[float, float]]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision.transforms.RandomResizedCrop tries this many random boxes before falling back to a
# centre crop; keeping the same number keeps the crop distribution identical to the official one.
_CROP_ATTEMPTS = 10


# ---------------------------------------------------------------------------------------------
# argument checking


def _is_number(x: object) -> bool:
    # bool is an int subclass, but True as a size or probability is almost certainly a mistake.
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_size(name: str, value: SizeLike) -> Tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        pair: Tuple[object, ...] = (value, value)
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        pair = tuple(value)
    else:
        raise TypeError(f"{name}={value!r}: expected an int or a (height, width) pair of ints")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{name}={value!r}: expected an int or a (height, width) pair of ints")
    if not all(v > 0 for v in pair):  # type: ignore[operator]
        raise ValueError(f"{name}={value!r}: sizes must be positive")
    return (int(pair[0]), int(pair[1]))  # type: ignore[arg-type]


def _check_pair(name: str, value: Sequence[float]) -> Tuple[float, float]:
    if (
        not isinstance(value, Sequence)
        or isinstance(value, str)
        or len(value) != 2
        or not all(_is_number(v) for v in value)
    ):
        raise TypeError(f"{name}={value!r}: expected a (low, high) pair of numbers")
    lo, hi = float(value[0]), float(value[1])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name}={value!r}: values must be finite")
    return lo, hi


def _check_scale(name: str, value: Sequence[float]) -> Tuple[float, float]:
    lo, hi = _check_pair(name, value)
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(
            f"impossible crop scale {name}={value!r}: expected 0 < low <= high <= 1 "
            "(fractions of the image area)"
        )
    return lo, hi


def _check_prob(name: str, value: float) -> float:
    if not _is_number(value):
        raise TypeError(f"{name}={value!r}: expected a probability (a number in [0, 1])")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}={value!r}: a probability must lie in [0, 1]")
    return float(value)


def _check_probs(name: str, value: ProbsLike) -> Tuple[float, ...]:
    if _is_number(value):
        return (_check_prob(name, value),)  # type: ignore[arg-type]
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) == 0:
        raise TypeError(
            f"{name}={value!r}: expected a probability or a non-empty sequence of probabilities"
        )
    return tuple(_check_prob(f"{name}[{i}]", p) for i, p in enumerate(value))


def _check_count(name: str, value: int, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: expected an int")
    if value < minimum:
        raise ValueError(f"{name}={value!r}: expected an int >= {minimum}")
    return value


def _check_strength(name: str, value: JitterLike, center: float, bound: Tuple[float, float]) -> JitterLike:
    """A jitter strength as ColorJitter takes it: ``s`` meaning ``[center - s, center + s]``
    (clipped to ``bound``), or an explicit ``(low, high)`` range inside ``bound``."""
    lo_b, hi_b = bound
    if _is_number(value):
        s = float(value)  # type: ignore[arg-type]
        upper = min(center - lo_b, hi_b - center) if center == 0.0 else math.inf
        if not 0.0 <= s <= upper:
            limit = f"[0, {upper}]" if math.isfinite(upper) else ">= 0"
            raise ValueError(f"{name}={value!r}: expected a strength {limit} or a (low, high) range")
        return s
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        lo, hi = _check_pair(name, value)
        if not lo_b <= lo <= hi <= hi_b:
            raise ValueError(
                f"{name}={value!r}: expected a range {lo_b} <= low <= high <= {hi_b}"
            )
        return (lo, hi)
    raise TypeError(f"{name}={value!r}: expected a non-negative number or a (low, high) pair of numbers")


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    for name, value in (("mean", mean), ("std", std)):
        if (
            not isinstance(value, Sequence)
            or isinstance(value, str)
            or not all(_is_number(v) for v in value)
        ):
            raise TypeError(f"{name}={value!r}: expected a sequence of 1 or 3 numbers")
    if len(mean) != len(std) or len(mean) not in (1, 3):
        raise ValueError(
            f"mean={tuple(mean)!r} and std={tuple(std)!r}: expected equal lengths of 1 (greyscale "
            f"output) or 3 (RGB output), got {len(mean)} and {len(std)}"
        )
    if not all(float(s) > 0.0 for s in std):
        raise ValueError(f"std={tuple(std)!r}: every std must be > 0")
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _check_interpolation(value: Union[InterpolationMode, str, int]) -> InterpolationMode:
    if isinstance(value, InterpolationMode):
        return value
    try:
        if isinstance(value, str):
            return InterpolationMode(value.lower())
        if isinstance(value, int) and not isinstance(value, bool):
            # The official script passes PIL constants such as Image.BICUBIC (== 3).
            return InterpolationMode[Image.Resampling(value).name]
    except (ValueError, KeyError):
        pass
    names = ", ".join(repr(m.value) for m in InterpolationMode)
    raise ValueError(
        f"interpolation={value!r}: expected an InterpolationMode, a PIL resampling constant or one "
        f"of {names}"
    )


# ---------------------------------------------------------------------------------------------
# random draws, all from torch's global generator


def _uniform(low: float = 0.0, high: float = 1.0) -> float:
    # float64 so that probability comparisons are as fine-grained as the official random.random().
    return float(torch.empty((), dtype=torch.float64).uniform_(low, high))


def _randint(low: int, high: int) -> int:
    """An int in [low, high], inclusive."""
    return int(torch.randint(low, high + 1, size=()))


def _to_grey(image: ImageLike, channels: int) -> ImageLike:
    """ITU-R 601-2 luma with ``channels`` output channels, identical for PIL and uint8 tensors."""
    if isinstance(image, Image.Image):
        return F.rgb_to_grayscale(image, num_output_channels=channels)
    # torchvision's tensor kernel truncates (a grey 173 comes out as 172); this is PIL's own
    # fixed-point formula with rounding, so PIL and tensor inputs give the same grey levels.
    rgb = image.to(torch.int32)
    grey = (rgb[0] * 19595 + rgb[1] * 38470 + rgb[2] * 7471 + 0x8000) >> 16
    return grey.to(torch.uint8).unsqueeze(0).repeat(channels, 1, 1)


class MultiCropTransform(nn.Module):
    """DINO multi-crop augmentation: one image in, ``G + N`` normalised views out.

    ``transform(image)`` returns ``[global_1, ..., global_G, local_1, ..., local_N]`` where

    * each global view is a ``float32`` tensor of shape ``(C, gh, gw)``, ``(gh, gw) = global_crop_size``
      (``(3, 224, 224)`` by default);
    * each local view is a ``float32`` tensor of shape ``(C, lh, lw)``, ``(lh, lw) = local_crop_size``
      (``(3, 96, 96)`` by default);
    * ``C = len(mean)``: 3 gives RGB output (greyscale inputs are replicated), 1 gives greyscale
      output (RGB inputs are converted with the ITU-R 601-2 luma transform).

    Each view is drawn independently, in this order: RandomResizedCrop -> horizontal flip ->
    colour jitter -> grayscale -> Gaussian blur -> solarize -> float in [0, 1] -> normalise.

    The defaults are those of the official ``DataAugmentationDINO``; its three positional arguments
    (``global_crops_scale, local_crops_scale, local_crops_number``) come first here too, so this class
    is a drop-in replacement.

    Args:
        global_crops_scale: area fraction range ``(low, high)`` of the global crops, ``0 < low <= high <= 1``.
        local_crops_scale: the same for the local crops.
        local_crops_number: number of local views ``N`` (0 disables multi-crop).
        global_crops_number: number of global views ``G`` (at least 1).
        global_crop_size: output size of the global views, an int or ``(height, width)``.
        local_crop_size: output size of the local views, an int or ``(height, width)``.
        ratio: aspect-ratio range ``(low, high)`` of the crops before resizing, ``0 < low <= high``.
        interpolation: resize interpolation (an ``InterpolationMode``, its name, or a PIL constant).
            BOX, HAMMING and LANCZOS exist for PIL inputs only.
        flip_prob: probability of a horizontal flip.
        brightness, contrast, saturation, hue: colour-jitter strengths, as in
            ``torchvision.transforms.ColorJitter``: a number ``s`` draws the factor from
            ``[max(0, 1 - s), 1 + s]`` (hue: ``[-s, s]``, ``s <= 0.5``), a pair ``(low, high)`` gives the
            range itself; 0 disables that component.
        color_jitter_prob: probability of applying the colour jitter.
        grayscale_prob: probability of converting the view to grey (kept with ``C`` channels).
        global_blur_probs: blur probability of each global view; a single number applies to all, a
            sequence shorter than ``G`` is cycled (``G = 3`` with the default gives 1.0, 0.1, 1.0).
        local_blur_prob: blur probability of every local view.
        blur_sigma: range ``(low, high)`` of the uniformly drawn blur sigma, ``0 < low <= high``.
        global_solarize_probs: solarize probability of each global view, cycled like the blur ones.
        local_solarize_prob: solarize probability of every local view (0 in the official recipe).
        solarize_threshold: uint8 pixel values ``>= solarize_threshold`` are inverted.
        mean, std: per-channel normalisation statistics, both of length 1 or both of length 3.

    Inputs are PIL images in mode ``'RGB'`` or ``'L'``, or ``uint8`` tensors of shape ``(C, H, W)``
    with ``C`` in ``{1, 3}``.  PIL inputs use PIL's operations (official numerics, including PIL's
    ``ImageFilter.GaussianBlur`` whose radius acts as sigma); tensor inputs use torchvision's tensor
    kernels, and their blur uses an odd kernel of size ``2 * ceil(3 * sigma) + 1`` (so it covers
    about +/- 3 sigma), shrunk where needed to stay smaller than twice the view's side, as reflect
    padding requires.  The two paths draw the same distribution of views but are not bit-identical
    (resize and blur kernels differ), except for grey conversion, which uses PIL's rounded formula
    on tensors too.

    Randomness: every draw (crop box, flip, jitter factors and order, grayscale, blur and its sigma,
    solarize) comes from torch's global RNG.  An op is applied when ``u < p`` for a uniform ``u``,
    except blur, which keeps the official ``u <= p``; a probability of 0 never applies.

    The default ``DataLoader`` collate batches the returned lists into a list of ``G + N`` tensors of
    shape ``(B, C, H, W)``; no custom collate function is needed.
    """

    def __init__(
        self,
        global_crops_scale: Sequence[float] = (0.4, 1.0),
        local_crops_scale: Sequence[float] = (0.05, 0.4),
        local_crops_number: int = 8,
        *,
        global_crops_number: int = 2,
        global_crop_size: SizeLike = 224,
        local_crop_size: SizeLike = 96,
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        interpolation: Union[InterpolationMode, str, int] = InterpolationMode.BICUBIC,
        flip_prob: float = 0.5,
        brightness: JitterLike = 0.4,
        contrast: JitterLike = 0.4,
        saturation: JitterLike = 0.2,
        hue: JitterLike = 0.1,
        color_jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        global_blur_probs: ProbsLike = (1.0, 0.1),
        local_blur_prob: float = 0.5,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        global_solarize_probs: ProbsLike = (0.0, 0.2),
        local_solarize_prob: float = 0.0,
        solarize_threshold: int = 128,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.global_crops_scale = _check_scale("global_crops_scale", global_crops_scale)
        self.local_crops_scale = _check_scale("local_crops_scale", local_crops_scale)
        self.local_crops_number = _check_count("local_crops_number", local_crops_number, 0)
        self.global_crops_number = _check_count("global_crops_number", global_crops_number, 1)
        self.global_crop_size = _check_size("global_crop_size", global_crop_size)
        self.local_crop_size = _check_size("local_crop_size", local_crop_size)

        ratio_lo, ratio_hi = _check_pair("ratio", ratio)
        if not 0.0 < ratio_lo <= ratio_hi:
            raise ValueError(f"ratio={ratio!r}: expected an aspect-ratio range 0 < low <= high")
        self.ratio = (ratio_lo, ratio_hi)
        self.interpolation = _check_interpolation(interpolation)

        self.flip_prob = _check_prob("flip_prob", flip_prob)
        self.brightness = _check_strength("brightness", brightness, 1.0, (0.0, math.inf))
        self.contrast = _check_strength("contrast", contrast, 1.0, (0.0, math.inf))
        self.saturation = _check_strength("saturation", saturation, 1.0, (0.0, math.inf))
        self.hue = _check_strength("hue", hue, 0.0, (-0.5, 0.5))
        self.color_jitter_prob = _check_prob("color_jitter_prob", color_jitter_prob)
        self.grayscale_prob = _check_prob("grayscale_prob", grayscale_prob)

        self.global_blur_probs = _check_probs("global_blur_probs", global_blur_probs)
        self.local_blur_prob = _check_prob("local_blur_prob", local_blur_prob)
        sigma_lo, sigma_hi = _check_pair("blur_sigma", blur_sigma)
        if not 0.0 < sigma_lo <= sigma_hi:
            raise ValueError(f"blur_sigma={blur_sigma!r}: expected a sigma range 0 < low <= high")
        self.blur_sigma = (sigma_lo, sigma_hi)

        self.global_solarize_probs = _check_probs("global_solarize_probs", global_solarize_probs)
        self.local_solarize_prob = _check_prob("local_solarize_prob", local_solarize_prob)
        if not isinstance(solarize_threshold, int) or isinstance(solarize_threshold, bool):
            raise TypeError(f"solarize_threshold={solarize_threshold!r}: expected an int in [0, 255]")
        if not 0 <= solarize_threshold <= 255:
            raise ValueError(f"solarize_threshold={solarize_threshold!r}: expected an int in [0, 255]")
        self.solarize_threshold = solarize_threshold

        self.mean, self.std = _check_stats(mean, std)
        self.channels = len(self.mean)

        # v2.ColorJitter draws its factors and their order from torch's RNG and dispatches to PIL
        # kernels for PIL images, which is exactly the official behaviour.
        self.color_jitter = v2.ColorJitter(
            brightness=self.brightness, contrast=self.contrast, saturation=self.saturation, hue=self.hue
        )

    # -----------------------------------------------------------------------------------------
    # public helpers

    @property
    def num_views(self) -> int:
        """``G + N``, the length of the list returned for each image."""
        return self.global_crops_number + self.local_crops_number

    def global_blur_prob(self, index: int) -> float:
        """Blur probability of global view ``index`` (0-based), after cycling."""
        return self.global_blur_probs[index % len(self.global_blur_probs)]

    def global_solarize_prob(self, index: int) -> float:
        """Solarize probability of global view ``index`` (0-based), after cycling."""
        return self.global_solarize_probs[index % len(self.global_solarize_probs)]

    def sample_crop_params(self, height: int, width: int, *, local: bool = False) -> Tuple[int, int, int, int]:
        """Draw one crop box ``(top, left, crop_height, crop_width)`` for an image of this size.

        Uses the global (or, with ``local=True``, the local) crop scale and ``ratio``.  The scheme is
        the one of ``torchvision.transforms.RandomResizedCrop``: up to 10 tries of a uniform area
        fraction and a log-uniform aspect ratio, then a centre crop with the ratio clamped into range.
        """
        scale = self.local_crops_scale if local else self.global_crops_scale
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(_CROP_ATTEMPTS):
            target_area = area * _uniform(scale[0], scale[1])
            aspect = math.exp(_uniform(log_lo, log_hi))
            crop_w = int(round(math.sqrt(target_area * aspect)))
            crop_h = int(round(math.sqrt(target_area / aspect)))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                return _randint(0, height - crop_h), _randint(0, width - crop_w), crop_h, crop_w

        # Rejection failed (very elongated image or scale near 1): take the largest centred box
        # whose aspect ratio lies in range.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            crop_w, crop_h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            crop_h, crop_w = height, int(round(height * self.ratio[1]))
        else:
            crop_w, crop_h = width, height
        return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w

    # -----------------------------------------------------------------------------------------
    # the augmentation

    def forward(self, image: ImageLike) -> List[torch.Tensor]:
        """Return ``[global_1, ..., global_G, local_1, ..., local_N]`` for one image."""
        image = self._prepare(image)
        views = [
            self._view(
                image,
                self.global_crop_size,
                local=False,
                blur_prob=self.global_blur_prob(i),
                solarize_prob=self.global_solarize_prob(i),
            )
            for i in range(self.global_crops_number)
        ]
        views += [
            self._view(
                image,
                self.local_crop_size,
                local=True,
                blur_prob=self.local_blur_prob,
                solarize_prob=self.local_solarize_prob,
            )
            for _ in range(self.local_crops_number)
        ]
        return views

    def _prepare(self, image: ImageLike) -> ImageLike:
        """Check the input and give it the output's channel count, once for all views."""
        if isinstance(image, Image.Image):
            if image.mode not in ("RGB", "L"):
                raise ValueError(
                    f"image: unsupported PIL mode {image.mode!r}; expected 'RGB' or 'L' "
                    "(call image.convert('RGB') first)"
                )
            wanted = "RGB" if self.channels == 3 else "L"
            return image if image.mode == wanted else image.convert(wanted)

        if isinstance(image, torch.Tensor):
            # A tv_tensors.Image would make v2 kernels re-wrap every result; plain tensors suffice.
            image = image.as_subclass(torch.Tensor)
            if image.dtype != torch.uint8:
                raise TypeError(
                    f"image: expected a uint8 tensor with values in [0, 255], got dtype {image.dtype} "
                    "(convert with (x * 255).round().to(torch.uint8) if it holds floats in [0, 1])"
                )
            if image.ndim != 3 or image.shape[0] not in (1, 3):
                raise ValueError(
                    f"image: expected a (C, H, W) tensor with C in {{1, 3}}, got shape {tuple(image.shape)}"
                )
            if image.shape[1] == 0 or image.shape[2] == 0:
                raise ValueError(f"image: empty image of shape {tuple(image.shape)}")
            if image.shape[0] == self.channels:
                return image
            return _to_grey(image, channels=1) if self.channels == 1 else image.repeat(3, 1, 1)

        raise TypeError(
            f"image: expected a PIL.Image.Image or a uint8 torch.Tensor (C, H, W), got {type(image).__name__}"
        )

    def _view(
        self,
        image: ImageLike,
        size: Tuple[int, int],
        *,
        local: bool,
        blur_prob: float,
        solarize_prob: float,
    ) -> torch.Tensor:
        height, width = F.get_size(image)
        top, left, crop_h, crop_w = self.sample_crop_params(height, width, local=local)
        view = self._resized_crop(image, top, left, crop_h, crop_w, size)

        if _uniform() < self.flip_prob:
            view = F.horizontal_flip(view)
        if _uniform() < self.color_jitter_prob:
            view = self.color_jitter(view)
        if _uniform() < self.grayscale_prob and self.channels == 3:
            view = _to_grey(view, channels=3)
        # The official blur test is `random() <= p`; the `p > 0` guard makes p = 0 a hard off switch.
        if blur_prob > 0.0 and _uniform() <= blur_prob:
            view = self._blur(view, _uniform(*self.blur_sigma))
        if solarize_prob > 0.0 and _uniform() < solarize_prob:
            view = F.solarize(view, threshold=self.solarize_threshold)
        return self._normalize(view)

    def _resized_crop(
        self, image: ImageLike, top: int, left: int, crop_h: int, crop_w: int, size: Tuple[int, int]
    ) -> ImageLike:
        if isinstance(image, torch.Tensor) and size == (1, 1):
            # torch's uint8 antialiased resize kernel hits an internal assert for 1x1 outputs
            # (torch 2.14); the float kernel is fine, so take that detour for this corner case.
            crop = image[:, top : top + crop_h, left : left + crop_w].to(torch.float32)
            out = F.resize(crop, [1, 1], interpolation=self.interpolation, antialias=True)
            return out.round_().clamp_(0, 255).to(torch.uint8)
        return F.resized_crop(
            image, top, left, crop_h, crop_w, size=list(size), interpolation=self.interpolation, antialias=True
        )

    @staticmethod
    def _blur(view: ImageLike, sigma: float) -> ImageLike:
        if isinstance(view, Image.Image):
            # PIL's radius is the Gaussian's standard deviation; this is the official op.
            return view.filter(ImageFilter.GaussianBlur(radius=sigma))
        # Reflect padding needs pad < side, so tiny views get a truncated kernel.
        half = min(math.ceil(3.0 * sigma), min(view.shape[-2:]) - 1)
        if half < 1:
            return view
        kernel = 2 * half + 1
        return F.gaussian_blur(view, kernel_size=[kernel, kernel], sigma=[sigma, sigma])

    def _normalize(self, view: ImageLike) -> torch.Tensor:
        if isinstance(view, Image.Image):
            view = F.pil_to_tensor(view)
        # .div(255) rather than a multiply by 1/255 matches ToTensor bit for bit.
        out = view.to(torch.float32).div_(255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=out.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=out.device).view(-1, 1, 1)
        return out.sub_(mean).div_(std).contiguous()

    def extra_repr(self) -> str:
        lines = [
            f"global_crops_number={self.global_crops_number}, global_crop_size={self.global_crop_size}, "
            f"global_crops_scale={self.global_crops_scale},",
            f"local_crops_number={self.local_crops_number}, local_crop_size={self.local_crop_size}, "
            f"local_crops_scale={self.local_crops_scale},",
            f"ratio=({self.ratio[0]:.4g}, {self.ratio[1]:.4g}), interpolation={self.interpolation.value},",
            f"flip_prob={self.flip_prob}, color_jitter_prob={self.color_jitter_prob} "
            f"(brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation}, "
            f"hue={self.hue}), grayscale_prob={self.grayscale_prob},",
            f"global_blur_probs={self.global_blur_probs}, local_blur_prob={self.local_blur_prob}, "
            f"blur_sigma={self.blur_sigma},",
            f"global_solarize_probs={self.global_solarize_probs}, local_solarize_prob={self.local_solarize_prob}, "
            f"solarize_threshold={self.solarize_threshold},",
            f"mean={self.mean}, std={self.std}",
        ]
        return "\n".join(lines)
