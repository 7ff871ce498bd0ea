"""Batched multi-crop augmentation with per-sample randomness, on the CPU or the GPU.

:class:`BatchedMultiCrop` is the batched counterpart of
:class:`~dino_pytorch.transforms.MultiCropTransform`: it takes a whole batch of images
``(B, C, H, W)`` and returns the same list of views::

    [global_1, ..., global_G, local_1, ..., local_N]     each (B, C_out, h, w) float32, normalised

Every image of the batch gets its *own* random crop box, flip, jitter factors and order, grayscale,
blur sigma and solarize decision, drawn from the same distribution as the per-image transform.  Each
step is one vectorised op over the batch (or over the rows that the step applies to):

* crop + resize + flip: one pair of batched matrix products with per-sample resampling matrices
  (the separable antialiased filter of PIL / ``torch.nn.functional.interpolate(antialias=True)``);
* colour jitter: the four ops in a per-sample random order, each run on the rows whose current step
  it is;
* grayscale and solarize: on the rows that draw them;
* Gaussian blur: a separable grouped convolution with one kernel per sample.

All random numbers are drawn on the CPU (from a ``torch.Generator`` if one is passed, else from the
global RNG) and only the results move to the images' device, so the views do not depend on the
device or its RNG, and row selection never needs a device synchronisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import default_collate
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .transforms import (
    _CROP_ATTEMPTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    JitterLike,
    MultiCropTransform,
    ProbsLike,
    SizeLike,
)

__all__ = ["BatchedMultiCrop", "ViewParams", "multicrop_collate", "stack_images"]

# PIL's ITU-R 601-2 luma weights (L = R * 299/1000 + G * 587/1000 + B * 114/1000 in 16-bit fixed
# point), the formula transforms.py uses; all three are exact in float32 and sum to exactly 1.
_LUMA_FIXED = (19595, 38470, 7471)
_LUMA = tuple(w / 65536 for w in _LUMA_FIXED)

# Order ids of the colour-jitter ops, the same numbering as torchvision's ColorJitter.
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)
# The factor that leaves an image unchanged, per op.
_IDENTITY_FACTORS = (1.0, 1.0, 1.0, 0.0)

_SUPPORTED_INTERPOLATION = (
    InterpolationMode.NEAREST,
    InterpolationMode.NEAREST_EXACT,
    InterpolationMode.BILINEAR,
    InterpolationMode.BICUBIC,
)


@dataclass
class ViewParams:
    """The random parameters of one view for a batch of ``B`` images (all CPU tensors).

    Attributes:
        boxes: ``(B, 4)`` int64 crop boxes ``(top, left, height, width)`` in source pixels.
        flip: ``(B,)`` bool, horizontal flip.
        jitter: ``(B,)`` bool, colour jitter applied.
        factors: ``(B, 4)`` float64 jitter factors (brightness, contrast, saturation, hue); a disabled
            component holds its identity value (1, 1, 1, 0).  Only used where ``jitter``.
        order: ``(B, 4)`` int64, a permutation of ``0..3`` per sample: the order in which the jitter
            ops (0 brightness, 1 contrast, 2 saturation, 3 hue) run.
        grayscale: ``(B,)`` bool, grey conversion applied (always False for 1-channel output).
        blur: ``(B,)`` bool, Gaussian blur applied.
        sigma: ``(B,)`` float64 blur sigma.  Only used where ``blur``.
        solarize: ``(B,)`` bool, solarize applied.
    """

    boxes: Tensor
    flip: Tensor
    jitter: Tensor
    factors: Tensor
    order: Tensor
    grayscale: Tensor
    blur: Tensor
    sigma: Tensor
    solarize: Tensor

    @property
    def batch_size(self) -> int:
        return self.boxes.shape[0]


# ---------------------------------------------------------------------------------------------
# random draws (CPU)


def _uniform(shape: Tuple[int, ...], low: float, high: float, generator: Optional[torch.Generator]) -> Tensor:
    # float64 like transforms._uniform, so probability comparisons are as fine-grained.
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    return low + (high - low) * u


def _bernoulli(batch: int, p: float, generator: Optional[torch.Generator], *, inclusive: bool = False) -> Tensor:
    """``(B,)`` bool: ``u < p`` (``u <= p`` with ``inclusive``, the official blur test); p = 0 never fires."""
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    if p <= 0.0:
        return torch.zeros(batch, dtype=torch.bool)
    return u <= p if inclusive else u < p


def _sample_boxes(
    sizes: Tensor, scale: Tuple[float, float], ratio: Tuple[float, float], generator: Optional[torch.Generator]
) -> Tensor:
    """RandomResizedCrop boxes, vectorised over the batch.

    Args:
        sizes: ``(B, 2)`` int64 image sizes ``(H, W)``.
    Returns:
        ``(B, 4)`` int64 boxes ``(top, left, height, width)``.

    torchvision's scheme: up to 10 tries of an area fraction ``U(scale)`` and a log-uniform aspect
    ratio, the first box that fits wins; if none fits, the largest centred box with the aspect ratio
    clamped into ``ratio``.  All 10 tries are drawn for every sample; taking the first one that fits
    gives the same distribution as stopping there.
    """
    batch = sizes.shape[0]
    height, width = sizes[:, 0:1].double(), sizes[:, 1:2].double()  # (B, 1)
    target_area = height * width * _uniform((batch, _CROP_ATTEMPTS), *scale, generator)
    aspect = torch.exp(_uniform((batch, _CROP_ATTEMPTS), math.log(ratio[0]), math.log(ratio[1]), generator))
    # torch.round is round-half-even, like Python's round() in sample_crop_params.
    crop_w = torch.round(torch.sqrt(target_area * aspect))
    crop_h = torch.round(torch.sqrt(target_area / aspect))
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)  # (B, tries)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    crop_w = crop_w.gather(1, first).squeeze(1)
    crop_h = crop_h.gather(1, first).squeeze(1)
    found = fits.any(dim=1)

    height, width = height.squeeze(1), width.squeeze(1)
    in_ratio = width / height
    fallback_w = torch.where(in_ratio > ratio[1], torch.round(height * ratio[1]), width)
    fallback_h = torch.where(in_ratio < ratio[0], torch.round(width / ratio[0]), height)
    crop_w = torch.where(found, crop_w, fallback_w)
    crop_h = torch.where(found, crop_h, fallback_h)

    # Uniform integer offsets in [0, H - h] and [0, W - w]; draw for every sample to keep the stream
    # layout independent of which samples fell back.
    u_top, u_left = torch.rand(2, batch, generator=generator, dtype=torch.float64)
    top = torch.where(found, torch.floor(u_top * (height - crop_h + 1)), torch.floor((height - crop_h) / 2))
    left = torch.where(found, torch.floor(u_left * (width - crop_w + 1)), torch.floor((width - crop_w) / 2))
    return torch.stack([top, left, crop_h, crop_w], dim=1).long()


def _jitter_range(value: JitterLike, center: float, clip_low: bool) -> Optional[Tuple[float, float]]:
    """ColorJitter's factor range for a checked strength, or None when the component is off."""
    if isinstance(value, tuple):
        low, high = value
    else:
        low, high = center - value, center + value
        if clip_low:
            low = max(low, 0.0)
    return None if low == high == center else (float(low), float(high))


def _to_device(t: Tensor, device: torch.device, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Move a small CPU parameter tensor to ``device``.

    ``non_blocking``: a copy from pageable host memory is staged at once, so the CPU tensor may be
    reused right away, and the host does not wait for the device's queue as a blocking copy would.
    """
    return t.to(device=device, dtype=dtype, non_blocking=True)


# ---------------------------------------------------------------------------------------------
# per-op kernels on float images in [0, 1], shape (n, C, h, w)


def _luma(x: Tensor) -> Tensor:
    """``(n, 3, h, w) -> (n, 1, h, w)``: ITU-R 601-2 luma, PIL's weights (as in transforms.py)."""
    r, g, b = x.unbind(dim=1)
    return (r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2]).unsqueeze(1)


def _luma_uint8(x: Tensor) -> Tensor:
    """``(n, 3, h, w) uint8 -> (n, 1, h, w) uint8``: PIL's ``convert('L')``, rounding included."""
    r, g, b = x.to(torch.int32).unbind(dim=1)
    grey = (r * _LUMA_FIXED[0] + g * _LUMA_FIXED[1] + b * _LUMA_FIXED[2] + 0x8000) >> 16
    return grey.to(torch.uint8).unsqueeze(1)


def _bicubic_kernel(d: Tensor) -> Tensor:
    # Keys' cubic with a = -0.5, the kernel of PIL and of torch's antialiased bicubic.
    a = -0.5
    d = d.abs()
    near = ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0
    far = a * (((d - 5.0) * d + 8.0) * d - 4.0)
    return torch.where(d < 1.0, near, torch.where(d < 2.0, far, torch.zeros_like(d)))


def _triangle_kernel(d: Tensor) -> Tensor:
    return (1.0 - d.abs()).clamp_(min=0.0)


def _nearest_kernel(d: Tensor) -> Tensor:
    # Picks the source pixel that contains the sample point (PIL's NEAREST, torch's nearest-exact).
    return ((d > -0.5) & (d <= 0.5)).to(d.dtype)


# Half-width of each kernel in source pixels at scale 1 (the kernel is zero beyond it).
_SUPPORT = {
    InterpolationMode.NEAREST: 0.5,
    InterpolationMode.NEAREST_EXACT: 0.5,
    InterpolationMode.BILINEAR: 1.0,
    InterpolationMode.BICUBIC: 2.0,
}
_KERNELS = {
    InterpolationMode.NEAREST: _nearest_kernel,
    InterpolationMode.NEAREST_EXACT: _nearest_kernel,
    InterpolationMode.BILINEAR: _triangle_kernel,
    InterpolationMode.BICUBIC: _bicubic_kernel,
}


def _resample_matrix(
    start: Tensor, length: Tensor, in_size: int, out_size: int, interpolation: InterpolationMode, device: torch.device
) -> Tensor:
    """Per-sample 1-D resampling matrices for the crop ``[start, start + length)`` of each sample.

    Args:
        start, length: ``(B,)`` int64 CPU crop offset and extent along this axis.
    Returns:
        ``(B, out_size, in_size)`` float32 on ``device``: row ``i`` of sample ``b`` holds the weights of
        output pixel ``i``.

    Output pixel ``i`` samples the crop at ``start + (i + 0.5) * s`` with ``s = length / out_size``.
    When downscaling (``s > 1``) the kernel is stretched by ``s``: the antialiasing of PIL and of
    ``interpolate(antialias=True)``.  Taps outside the crop get weight 0 and each row is renormalised,
    as PIL does at the border of a crop.  The weights are computed on a band of ``K`` taps per output
    pixel (enough for the widest kernel of the batch) and then scattered into the dense matrix, which
    BLAS applies faster than K gathers would, on the CPU as on the GPU.
    """
    nearest = interpolation in (InterpolationMode.NEAREST, InterpolationMode.NEAREST_EXACT)
    support = _SUPPORT[interpolation]
    # The tap count must be a Python int; the boxes live on the CPU, so this costs no device sync.
    max_stretch = 1.0 if nearest else max(1.0, float(length.max()) / out_size)
    taps = min(math.ceil(2.0 * support * max_stretch) + 2, in_size)

    start_f = _to_device(start, device, torch.float32).unsqueeze(1)  # (B, 1)
    length_f = _to_device(length, device, torch.float32).unsqueeze(1)
    scale = length_f / out_size
    stretch = torch.ones_like(scale) if nearest else scale.clamp(min=1.0)
    centers = start_f + (torch.arange(out_size, device=device) + 0.5) * scale  # (B, out)
    # Every tap with a non-zero weight lies in [first, first + taps).
    first = torch.floor(centers - support * stretch - 0.5).clamp_(0, in_size - taps).long()
    position = first.unsqueeze(2) + torch.arange(taps, device=device)  # (B, out, K)
    distance = (position + 0.5 - centers.unsqueeze(2)) / stretch.unsqueeze(2)
    inside = (position >= start_f.unsqueeze(2)) & (position < (start_f + length_f).unsqueeze(2))
    weights = _KERNELS[interpolation](distance) * inside
    weights = weights / weights.sum(dim=2, keepdim=True).clamp(min=1e-12)
    matrix = torch.zeros(start.shape[0], out_size, in_size, device=device)
    return matrix.scatter_(2, position, weights)


def _resized_crop(
    x: Tensor, boxes: Tensor, flip: Tensor, size: Tuple[int, int], interpolation: InterpolationMode
) -> Tensor:
    """Crop, resize and flip every image with its own box: ``(B, C, H, W) -> (B, C, h, w)``.

    Args:
        boxes: ``(B, 4)`` int64 CPU ``(top, left, height, width)``; flip: ``(B,)`` bool CPU.

    A separable filter, ``out = Wy @ x @ Wx^T``, one batched matrix product per axis.  Flipping the
    rows of ``Wx`` flips the output exactly.
    """
    out_h, out_w = size
    top, left, crop_h, crop_w = boxes.unbind(dim=1)
    cols = _resample_matrix(left, crop_w, x.shape[3], out_w, interpolation, x.device)  # (B, w, W)
    rows = _resample_matrix(top, crop_h, x.shape[2], out_h, interpolation, x.device)  # (B, h, H)
    cols = torch.where(_to_device(flip, x.device).view(-1, 1, 1), cols.flip(1), cols)
    # Horizontal pass first and a clamp in between, as torch's uint8 antialiased resize does: it
    # stores the intermediate image as uint8, which clips bicubic overshoot before the vertical pass.
    out = torch.einsum("bchw,bjw->bchj", x, cols).clamp_(0.0, 1.0)
    out = torch.einsum("bih,bchj->bcij", rows, out)
    return out.clamp_(0.0, 1.0)


def _adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """``factor``: ``(n,)``.  Scales every pixel, then clamps."""
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def _adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the mean grey level of each image (PIL's ImageEnhance.Contrast, unrounded)."""
    grey = _luma(x) if x.shape[1] == 3 else x
    mean = grey.mean(dim=(1, 2, 3), keepdim=True)
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1.0 - f) * mean).clamp_(0.0, 1.0)


def _adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the grey version of each image (PIL's ImageEnhance.Color); RGB only."""
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1.0 - f) * _luma(x)).clamp_(0.0, 1.0)


def _adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of each image by ``shift`` (a fraction of the colour circle); RGB only."""
    r, g, b = x.unbind(dim=1)
    value = x.amax(dim=1)
    chroma = value - x.amin(dim=1)
    # Where chroma (or value) is 0 the numerators are 0 too, so the clamp only avoids 0 / 0.
    saturation = chroma / value.clamp(min=1e-12)
    safe_chroma = chroma.clamp(min=1e-12)
    # Hue sector in [0, 6): which channel is the maximum decides the formula.
    hue = torch.where(
        value == r,
        torch.remainder((g - b) / safe_chroma, 6.0),
        torch.where(value == g, (b - r) / safe_chroma + 2.0, (r - g) / safe_chroma + 4.0),
    )
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue))
    hue = torch.remainder(hue + 6.0 * shift.view(-1, 1, 1), 6.0)
    # HSV -> RGB without branches: channel n in (5, 3, 1) for (R, G, B).
    offsets = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1
    k = torch.remainder(offsets + hue.unsqueeze(1), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return value.unsqueeze(1) * (1.0 - saturation.unsqueeze(1) * ramp)


_JITTER_OPS: Tuple[Callable[[Tensor, Tensor], Tensor], ...] = (
    _adjust_brightness,
    _adjust_contrast,
    _adjust_saturation,
    _adjust_hue,
)


def _grayscale(x: Tensor) -> Tensor:
    """``(n, 3, h, w)``: every channel set to the luma (a copy, so later ops may write in place)."""
    return _luma(x).repeat(1, x.shape[1], 1, 1)


def _gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Blur each image with its own sigma: ``x (n, C, h, w)``, ``sigma (n,)`` float.

    Sample ``b`` uses the kernel of ``MultiCropTransform``'s tensor path, an odd size
    ``2 * ceil(3 sigma_b) + 1`` cut down to stay below twice the view's side; the batch shares one
    padded kernel width (from the largest sigma) whose extra taps are zero, so with reflect padding
    every sample gets exactly its own truncated Gaussian.
    """
    n, channels, height, width = x.shape
    limit = min(height, width) - 1  # reflect padding needs pad < side
    half_b = torch.ceil(3.0 * sigma).clamp(max=limit)  # (n,)
    half = int(half_b.max()) if n else 0
    if half < 1:
        return x
    taps = torch.arange(-half, half + 1, dtype=torch.float64)
    kernels = torch.exp(-0.5 * (taps / sigma.double().unsqueeze(1)) ** 2) * (taps.abs() <= half_b.unsqueeze(1))
    kernels = _to_device(kernels / kernels.sum(dim=1, keepdim=True), x.device, x.dtype)  # (n, K)
    weight = repeat(kernels, "n k -> (n c) 1 k", c=channels)

    # Grouped conv: every (sample, channel) plane is its own group with its own kernel.
    planes = rearrange(x, "n c h w -> 1 (n c) h w")
    planes = F.conv2d(F.pad(planes, (0, 0, half, half), mode="reflect"), weight.unsqueeze(3), groups=n * channels)
    planes = F.conv2d(F.pad(planes, (half, half, 0, 0), mode="reflect"), weight.unsqueeze(2), groups=n * channels)
    return rearrange(planes, "1 (n c) h w -> n c h w", n=n)


def _solarize(x: Tensor, threshold: int) -> Tensor:
    # uint8 pipelines round to a level and then test `level >= threshold`; a continuous value
    # rounds to such a level exactly when it is >= threshold - 0.5.
    return torch.where(x * 255.0 >= threshold - 0.5, 1.0 - x, x)


def _normalize(x: Tensor, mean: Tuple[float, ...], std: Tuple[float, ...]) -> Tensor:
    mean_t = _to_device(torch.tensor(mean), x.device, x.dtype).view(1, -1, 1, 1)
    std_t = _to_device(torch.tensor(std), x.device, x.dtype).view(1, -1, 1, 1)
    return ((x - mean_t) / std_t).contiguous()


def _apply_rows(x: Tensor, mask: Tensor, fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Replace, in place, the rows of ``x`` selected by the CPU bool ``mask`` (B,) with ``fn(x[rows], rows)``.

    ``rows`` (the selected indices) stays on the CPU for indexing parameters; the mask is known on
    the host, so selecting rows on a GPU needs no synchronisation.
    """
    rows = mask.nonzero().squeeze(1)
    if rows.numel() == 0:
        return x
    if rows.numel() == x.shape[0]:
        return fn(x, rows)
    index = _to_device(rows, x.device)
    return x.index_copy_(0, index, fn(x.index_select(0, index), rows))


# ---------------------------------------------------------------------------------------------
# batching helpers


def _match_channels(images: Tensor, channels: int) -> Tensor:
    """``(B, C, H, W) -> (B, channels, H, W)``: grey replicated, or RGB to luma (PIL's rounded
    formula for uint8, so grey levels equal the per-image transform's)."""
    if images.shape[1] == channels:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1)
    return _luma_uint8(images) if images.dtype == torch.uint8 else _luma(images.float())


def _to_uint8_tensor(image: Any, index: int) -> Tensor:
    """A PIL image ('RGB' / 'L') or uint8 ``(C, H, W)`` tensor as a plain uint8 tensor."""
    if isinstance(image, Image.Image):
        if image.mode not in ("RGB", "L"):
            raise ValueError(
                f"images[{index}]: unsupported PIL mode {image.mode!r}; expected 'RGB' or 'L' "
                "(call image.convert('RGB') first)"
            )
        return TF.pil_to_tensor(image)
    if not isinstance(image, Tensor) or image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        described = (
            f"{image.dtype} tensor of shape {tuple(image.shape)}" if isinstance(image, Tensor) else type(image).__name__
        )
        raise TypeError(
            f"images[{index}]: expected a PIL image or a uint8 (C, H, W) tensor with C in {{1, 3}}, got {described}"
        )
    return image.as_subclass(Tensor)


def stack_images(images: Sequence[Union[Tensor, Image.Image]]) -> Tuple[Tensor, Tensor]:
    """Stack images of possibly different sizes into one zero-padded uint8 batch.

    Args:
        images: uint8 tensors ``(C, H_i, W_i)`` or PIL images (mode ``'RGB'`` or ``'L'``), all with the
            same channel count.
    Returns:
        ``(batch, image_sizes)``: ``batch`` is ``(B, C, max H, max W)`` uint8 with each image in its
        top-left corner, ``image_sizes`` is ``(B, 2)`` int64 ``(H_i, W_i)``.  Pass both to
        :class:`BatchedMultiCrop`; its crop boxes stay inside each image, so the padding never shows.
    """
    if not isinstance(images, Sequence) or len(images) == 0:
        raise ValueError(f"images: expected a non-empty sequence of images, got {type(images).__name__}")
    tensors = [_to_uint8_tensor(image, i) for i, image in enumerate(images)]
    channels = {t.shape[0] for t in tensors}
    if len(channels) != 1:
        raise ValueError(f"images: all images need the same channel count, got {sorted(channels)}")
    sizes = torch.tensor([t.shape[1:] for t in tensors], dtype=torch.long)
    if sizes.eq(sizes[0]).all():
        return torch.stack(tensors), sizes
    batch = tensors[0].new_zeros((len(tensors), tensors[0].shape[0], *sizes.max(dim=0).values.tolist()))
    for out, t in zip(batch, tensors):
        out[:, : t.shape[1], : t.shape[2]] = t
    return batch, sizes


# ---------------------------------------------------------------------------------------------
# the module

# Configuration attributes shared with MultiCropTransform (same names, validated the same way).
_CONFIG = (
    "global_crops_scale",
    "local_crops_scale",
    "local_crops_number",
    "global_crops_number",
    "global_crop_size",
    "local_crop_size",
    "ratio",
    "interpolation",
    "flip_prob",
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "color_jitter_prob",
    "grayscale_prob",
    "global_blur_probs",
    "local_blur_prob",
    "blur_sigma",
    "global_solarize_probs",
    "local_solarize_prob",
    "solarize_threshold",
    "mean",
    "std",
)


class BatchedMultiCrop(nn.Module):
    """DINO multi-crop augmentation for a whole batch, with per-sample random parameters.

    ``module(images)`` with ``images`` of shape ``(B, C, H, W)`` returns
    ``[global_1, ..., global_G, local_1, ..., local_N]`` where each global view is a ``float32``
    tensor ``(B, C_out, *global_crop_size)`` and each local view ``(B, C_out, *local_crop_size)``,
    normalised with ``mean`` / ``std``; ``C_out = len(mean)`` (grey inputs are replicated to 3
    channels, RGB inputs converted with PIL's luma formula for 1 channel).

    The constructor takes exactly the arguments of :class:`~dino_pytorch.transforms.MultiCropTransform`
    (same names, defaults, checks and meaning); :meth:`from_transform` copies them from an existing
    transform.  Per view and per image, the steps and their probabilities are the same:
    RandomResizedCrop -> flip -> colour jitter (random op order) -> grayscale -> blur -> solarize ->
    normalise.  The views follow the same distribution but are not bit-identical to the per-image
    transform's: this module computes in float32 without rounding to uint8 between steps, and uses
    PIL's luma weights in contrast and saturation (torchvision's tensor kernels use 0.2989).

    Interpolation: NEAREST / NEAREST_EXACT (both pick the source pixel containing the sample point),
    BILINEAR and BICUBIC (default), always antialiased when downscaling like PIL and
    ``antialias=True``: the crop-resize is the same separable filter, in float.

    Inputs: ``uint8`` tensors with values in ``[0, 255]``, or floating tensors with values in
    ``[0, 1]`` (not checked, to avoid a device synchronisation), on any device.  The views come back
    on the input's device.

    Randomness: all parameters are drawn on the CPU from ``generator`` (a CPU ``torch.Generator``)
    or, when it is None, from torch's global RNG, which DataLoader workers seed per worker.  The same
    generator state gives the same parameters on every device.
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
        # The per-image transform owns the argument checks; reusing it keeps the two in step.
        spec = MultiCropTransform(
            global_crops_scale,
            local_crops_scale,
            local_crops_number,
            global_crops_number=global_crops_number,
            global_crop_size=global_crop_size,
            local_crop_size=local_crop_size,
            ratio=ratio,
            interpolation=interpolation,
            flip_prob=flip_prob,
            brightness=brightness,
            contrast=contrast,
            saturation=saturation,
            hue=hue,
            color_jitter_prob=color_jitter_prob,
            grayscale_prob=grayscale_prob,
            global_blur_probs=global_blur_probs,
            local_blur_prob=local_blur_prob,
            blur_sigma=blur_sigma,
            global_solarize_probs=global_solarize_probs,
            local_solarize_prob=local_solarize_prob,
            solarize_threshold=solarize_threshold,
            mean=mean,
            std=std,
        )
        for name in _CONFIG:
            setattr(self, name, getattr(spec, name))
        self.channels = spec.channels
        if self.interpolation not in _SUPPORTED_INTERPOLATION:
            names = ", ".join(repr(m.value) for m in _SUPPORTED_INTERPOLATION)
            raise ValueError(
                f"interpolation={interpolation!r}: BatchedMultiCrop supports {names}; "
                f"{self.interpolation.value!r} exists for PIL inputs of MultiCropTransform only"
            )
        self.jitter_ranges: Tuple[Optional[Tuple[float, float]], ...] = (
            _jitter_range(self.brightness, 1.0, clip_low=True),
            _jitter_range(self.contrast, 1.0, clip_low=True),
            _jitter_range(self.saturation, 1.0, clip_low=True),
            _jitter_range(self.hue, 0.0, clip_low=False),
        )

    @classmethod
    def from_transform(cls, transform: MultiCropTransform) -> "BatchedMultiCrop":
        """A batched module with the configuration of a per-image ``MultiCropTransform``."""
        if not isinstance(transform, MultiCropTransform):
            raise TypeError(f"transform: expected a MultiCropTransform, got {type(transform).__name__}")
        config = {name: getattr(transform, name) for name in _CONFIG}
        positional = [config.pop(k) for k in ("global_crops_scale", "local_crops_scale", "local_crops_number")]
        return cls(*positional, **config)

    # -----------------------------------------------------------------------------------------
    # configuration helpers

    @property
    def num_views(self) -> int:
        """``G + N``, the length of the returned list."""
        return self.global_crops_number + self.local_crops_number

    def global_blur_prob(self, index: int) -> float:
        """Blur probability of global view ``index`` (0-based), after cycling."""
        return self.global_blur_probs[index % len(self.global_blur_probs)]

    def global_solarize_prob(self, index: int) -> float:
        """Solarize probability of global view ``index`` (0-based), after cycling."""
        return self.global_solarize_probs[index % len(self.global_solarize_probs)]

    def _view_specs(self) -> List[Tuple[Tuple[int, int], bool, float, float]]:
        """``(output size, local, blur p, solarize p)`` of every view, in output order."""
        specs = [
            (self.global_crop_size, False, self.global_blur_prob(i), self.global_solarize_prob(i))
            for i in range(self.global_crops_number)
        ]
        local = (self.local_crop_size, True, self.local_blur_prob, self.local_solarize_prob)
        specs += [local] * self.local_crops_number
        return specs

    # -----------------------------------------------------------------------------------------
    # parameters

    def sample_params(
        self,
        batch_size: int,
        image_size: Union[Tuple[int, int], Tensor],
        *,
        generator: Optional[torch.Generator] = None,
    ) -> List[ViewParams]:
        """Draw the random parameters of every view for a batch, on the CPU.

        Args:
            batch_size: ``B``.
            image_size: ``(H, W)`` shared by the batch, or a ``(B, 2)`` integer tensor of per-image sizes.
            generator: a CPU ``torch.Generator``; None uses torch's global RNG.
        Returns:
            ``G + N`` :class:`ViewParams`, in view order.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: expected an int >= 1")
        sizes = self._check_sizes(image_size, batch_size)
        generator = _check_generator(generator)
        params = []
        for size, local, blur_p, solarize_p in self._view_specs():
            scale = self.local_crops_scale if local else self.global_crops_scale
            params.append(self._sample_view(sizes, scale, blur_p, solarize_p, generator))
        return params

    def _sample_view(
        self,
        sizes: Tensor,
        scale: Tuple[float, float],
        blur_prob: float,
        solarize_prob: float,
        generator: Optional[torch.Generator],
    ) -> ViewParams:
        batch = sizes.shape[0]
        boxes = _sample_boxes(sizes, scale, self.ratio, generator)
        flip = _bernoulli(batch, self.flip_prob, generator)
        jitter = _bernoulli(batch, self.color_jitter_prob, generator)
        factors = torch.empty(batch, 4, dtype=torch.float64)
        for op, bounds in enumerate(self.jitter_ranges):
            u = _uniform((batch,), *(bounds or (0.0, 1.0)), generator)
            factors[:, op] = u if bounds is not None else _IDENTITY_FACTORS[op]
        # argsort of i.i.d. uniforms is a uniformly random permutation, one per row (ColorJitter
        # draws torch.randperm(4) per image).
        order = torch.rand(batch, 4, generator=generator).argsort(dim=1)
        grayscale = _bernoulli(batch, self.grayscale_prob, generator) & (self.channels == 3)
        blur = _bernoulli(batch, blur_prob, generator, inclusive=True)
        sigma = _uniform((batch,), *self.blur_sigma, generator)
        solarize = _bernoulli(batch, solarize_prob, generator)
        return ViewParams(boxes, flip, jitter, factors, order, grayscale, blur, sigma, solarize)

    def _check_sizes(self, image_size: Union[Tuple[int, int], Tensor], batch_size: int) -> Tensor:
        """``(B, 2)`` int64 CPU sizes from a shared ``(H, W)`` or a per-image tensor."""
        if isinstance(image_size, Tensor):
            if image_size.shape != (batch_size, 2) or image_size.is_floating_point() or image_size.is_complex():
                raise ValueError(
                    f"image_sizes: expected a ({batch_size}, 2) integer tensor of (height, width), got "
                    f"{image_size.dtype} of shape {tuple(image_size.shape)}"
                )
            sizes = image_size.detach().to("cpu", torch.long)
        elif (
            isinstance(image_size, Sequence)
            and len(image_size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in image_size)
        ):
            sizes = torch.tensor([list(image_size)], dtype=torch.long).expand(batch_size, 2)
        else:
            raise TypeError(f"image_size={image_size!r}: expected (height, width) ints or a (B, 2) tensor")
        if (sizes < 1).any():
            raise ValueError(f"image_sizes: every height and width must be >= 1, got min {int(sizes.min())}")
        return sizes

    # -----------------------------------------------------------------------------------------
    # the augmentation

    def forward(
        self,
        images: Tensor,
        *,
        image_sizes: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        return_params: bool = False,
    ) -> Union[List[Tensor], Tuple[List[Tensor], List[ViewParams]]]:
        """Augment a batch: ``(B, C, H, W) -> [(B, C_out, gh, gw)] * G + [(B, C_out, lh, lw)] * N``.

        Args:
            images: ``uint8`` in ``[0, 255]`` or floating in ``[0, 1]``, ``C`` in ``{1, 3}``, any device.
            image_sizes: optional ``(B, 2)`` true ``(H_i, W_i)`` of zero-padded images (see
                :func:`stack_images`); crops stay inside each image.
            generator: a CPU ``torch.Generator`` for all draws; None uses torch's global RNG.
            return_params: also return the drawn :class:`ViewParams` (CPU tensors).
        """
        self._check_images(images)
        batch, height, width = images.shape[0], images.shape[2], images.shape[3]
        sizes: Union[Tuple[int, int], Tensor] = (height, width)
        if image_sizes is not None:
            sizes = self._check_sizes(image_sizes, batch)
            if (sizes[:, 0] > height).any() or (sizes[:, 1] > width).any():
                raise ValueError(
                    f"image_sizes: every (H_i, W_i) must fit in the batch's (H, W) = {(height, width)}"
                )
        params = self.sample_params(batch, sizes, generator=generator)
        views = self.apply(images, params)
        return (views, params) if return_params else views

    @torch.no_grad()
    def apply(self, images: Tensor, params: Sequence[ViewParams]) -> List[Tensor]:
        """Augment ``images`` with given parameters (one :class:`ViewParams` per view, in view order)."""
        self._check_images(images)
        if len(params) != self.num_views or any(p.batch_size != images.shape[0] for p in params):
            raise ValueError(
                f"params: expected {self.num_views} ViewParams of batch size {images.shape[0]}, got "
                f"{[p.batch_size for p in params]}"
            )
        height, width = images.shape[2], images.shape[3]
        for i, p in enumerate(params):
            top, left, crop_h, crop_w = p.boxes.unbind(dim=1)
            outside = (top < 0) | (left < 0) | (top + crop_h > height) | (left + crop_w > width)
            if (outside | (crop_h < 1) | (crop_w < 1)).any():
                raise ValueError(
                    f"params[{i}].boxes: every box must be non-empty and lie inside the {height}x{width} images"
                )
        x = self._prepare(images)
        specs = self._view_specs()
        return [self._view(x, p, size, solarize_p > 0.0) for p, (size, _, _, solarize_p) in zip(params, specs)]

    def _view(self, x: Tensor, p: ViewParams, size: Tuple[int, int], may_solarize: bool) -> Tensor:
        view = _resized_crop(x, p.boxes, p.flip, size, self.interpolation)
        view = self._color_jitter(view, p)
        view = _apply_rows(view, p.grayscale, lambda v, rows: _grayscale(v))
        view = _apply_rows(view, p.blur, lambda v, rows: _gaussian_blur(v, p.sigma[rows]))
        if may_solarize:
            view = _apply_rows(view, p.solarize, lambda v, rows: _solarize(v, self.solarize_threshold))
        return _normalize(view, self.mean, self.std)

    def _color_jitter(self, x: Tensor, p: ViewParams) -> Tensor:
        """Four steps; at each, every jittered row runs the op its own permutation puts there."""
        for step in range(4):
            for op, bounds in enumerate(self.jitter_ranges):
                # Disabled components, and saturation / hue on grey output, leave images unchanged.
                if bounds is None or (op in (_SATURATION, _HUE) and x.shape[1] == 1):
                    continue
                mask = p.jitter & (p.order[:, step] == op)
                x = _apply_rows(
                    x, mask, lambda v, rows: _JITTER_OPS[op](v, _to_device(p.factors[rows, op], v.device, v.dtype))
                )
        return x

    def _check_images(self, images: Any) -> None:
        if not isinstance(images, Tensor):
            raise TypeError(f"images: expected a (B, C, H, W) tensor, got {type(images).__name__}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise TypeError(
                f"images: expected uint8 values in [0, 255] or floats in [0, 1], got dtype {images.dtype}"
            )
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"images: expected a (B, C, H, W) batch with C in {{1, 3}}, got shape {tuple(images.shape)}"
            )
        if 0 in images.shape:
            raise ValueError(f"images: empty batch of shape {tuple(images.shape)}")

    def _prepare(self, images: Tensor) -> Tensor:
        """Float32 in ``[0, 1]`` with the output's channel count: ``(B, C, H, W) -> (B, C_out, H, W)``."""
        images = _match_channels(images.as_subclass(Tensor), self.channels)
        if images.dtype == torch.uint8:
            return images.to(torch.float32).div_(255.0)
        return images.to(torch.float32)

    # -----------------------------------------------------------------------------------------
    # DataLoader use

    def collate(self, batch: Sequence[Any]) -> Any:
        """A ``collate_fn`` that augments in the DataLoader worker.

        ``batch`` holds images (uint8 ``(C, H, W)`` tensors or ``'RGB'`` / ``'L'`` PIL images, sizes may
        differ) or tuples whose first element is an image.  Returns the list of views, or
        ``[views, *default_collate(rest)]`` for tuples (e.g. ``views, labels = batch``).  Draws use the
        global RNG, which the DataLoader seeds differently in every worker.
        """
        if len(batch) == 0:
            raise ValueError("batch: empty batch")
        with_rest = isinstance(batch[0], (tuple, list))
        images = [_to_uint8_tensor(sample[0] if with_rest else sample, i) for i, sample in enumerate(batch)]
        if len({im.shape[0] for im in images}) > 1:
            # Mixed grey and colour images: give each the output's channel count before stacking.
            images = [_match_channels(im.unsqueeze(0), self.channels)[0] for im in images]
        stacked, sizes = stack_images(images)
        uniform = bool((sizes == sizes[0]).all())
        views = self(stacked, image_sizes=None if uniform else sizes)
        if not with_rest:
            return views
        return [views, *default_collate([tuple(sample[1:]) for sample in batch])]

    def extra_repr(self) -> str:
        shown = {name: getattr(self, name) for name in _CONFIG}
        shown["interpolation"] = self.interpolation.value
        return ",\n".join(f"{name}={value!r}" for name, value in shown.items())


def multicrop_collate(batched: BatchedMultiCrop) -> Callable[[Sequence[Any]], Any]:
    """The ``collate_fn`` for a DataLoader whose dataset returns raw images: ``batched.collate``."""
    if not isinstance(batched, BatchedMultiCrop):
        raise TypeError(f"batched: expected a BatchedMultiCrop, got {type(batched).__name__}")
    return batched.collate


def _check_generator(generator: Optional[torch.Generator]) -> Optional[torch.Generator]:
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(
            f"generator: expected a CPU generator (parameters are drawn on the CPU), got device {generator.device}"
        )
    return generator
