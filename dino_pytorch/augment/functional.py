"""Tensor kernels of the multi-crop augmenters: deterministic, no random draws, no configuration.

Two families, like ``torchvision.transforms.v2.functional``:

* ``*_image`` kernels work on one image, a PIL image or a uint8 tensor ``(C, H, W)``; they dispatch
  to PIL's or torchvision's own ops (the official numerics) for :class:`MultiCropTransform`;
* the other kernels work on a float batch ``(n, C, h, w)`` with values in ``[0, 1]``, any ``C``, and
  take one parameter per image (``(n,)`` tensors) for :class:`BatchedMultiCrop`, and for
  :class:`MultiCropTransform` on float (band) images, as a batch of one.

Channels: resize, flip, blur, brightness and solarize act on every channel alike; contrast blends
with the mean luma for 3 channels (the official rule) and each band with its own mean otherwise;
saturation, hue and grayscale are RGB ops (:func:`colour_op_applies`).

Per-image parameters arrive as CPU tensors and only their results move to the images' device, so no
kernel here needs a device synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from PIL import Image, ImageFilter
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

ImageLike = Union[Image.Image, Tensor]

# PIL's ITU-R 601-2 luma (L = R * 299/1000 + G * 587/1000 + B * 114/1000) in 16-bit fixed point.  The
# uint8 kernel is PIL's convert('L') with its rounding; the float kernel uses the same weights, which
# are exact in float32 and sum to exactly 1.
LUMA_FIXED = (19595, 38470, 7471)
LUMA = tuple(w / 65536 for w in LUMA_FIXED)


# ---------------------------------------------------------------------------------------------
# grey levels and channels


def luma_uint8(x: Tensor) -> Tensor:
    """``(..., 3, H, W) uint8 -> (..., 1, H, W) uint8``: PIL's ``convert('L')``, rounding included.

    torchvision's tensor kernel truncates (a grey 173 comes out as 172); this one gives the grey
    levels PIL gives, so PIL and tensor inputs agree.
    """
    r, g, b = x.to(torch.int32).unbind(dim=-3)
    grey = (r * LUMA_FIXED[0] + g * LUMA_FIXED[1] + b * LUMA_FIXED[2] + 0x8000) >> 16
    return grey.to(torch.uint8).unsqueeze(-3)


def luma(x: Tensor) -> Tensor:
    """``(..., 3, H, W) float -> (..., 1, H, W)``: the same luma, unrounded."""
    r, g, b = x.unbind(dim=-3)
    return (r * LUMA[0] + g * LUMA[1] + b * LUMA[2]).unsqueeze(-3)


def to_grey_image(image: ImageLike, channels: int) -> ImageLike:
    """One RGB image as grey with ``channels`` (1 or 3) equal channels; PIL or uint8 ``(3, H, W)``."""
    if isinstance(image, Image.Image):
        return TF.rgb_to_grayscale(image, num_output_channels=channels)
    return luma_uint8(image).repeat(channels, 1, 1)


def match_channels(images: Tensor, channels: int) -> Tensor:
    """``(B, C, H, W) -> (B, channels, H, W)``: unchanged when ``C == channels``, else grey replicated
    to 3 channels, or RGB to luma (rounded for uint8); the caller has checked that ``C`` suits."""
    if images.shape[1] == channels:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1)
    return luma_uint8(images) if images.dtype == torch.uint8 else luma(images.float())


def grayscale(x: Tensor) -> Tensor:
    """``(n, 3, h, w)``: every channel set to the luma (a copy, so later ops may write in place)."""
    return luma(x).repeat(1, x.shape[1], 1, 1)


# ---------------------------------------------------------------------------------------------
# crop + resize


def resized_crop_image(
    image: ImageLike, top: int, left: int, crop_h: int, crop_w: int, size: tuple[int, int],
    interpolation: InterpolationMode,
) -> ImageLike:
    """Crop the box ``(top, left, crop_h, crop_w)`` of one image and resize it to ``size``, antialiased."""
    if isinstance(image, Tensor) and size == (1, 1):
        # torch's uint8 antialiased resize kernel hits an internal assert for 1x1 outputs
        # (torch 2.14); the float kernel is fine, so take that detour for this corner case.
        crop = image[:, top : top + crop_h, left : left + crop_w].to(torch.float32)
        out = TF.resize(crop, [1, 1], interpolation=interpolation, antialias=True)
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return TF.resized_crop(
        image, top, left, crop_h, crop_w, size=list(size), interpolation=interpolation, antialias=True
    )


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


# Per mode: the kernel and its half-width in source pixels at scale 1 (zero beyond it).
RESAMPLE_KERNELS = {
    InterpolationMode.NEAREST: (_nearest_kernel, 0.5),
    InterpolationMode.NEAREST_EXACT: (_nearest_kernel, 0.5),
    InterpolationMode.BILINEAR: (_triangle_kernel, 1.0),
    InterpolationMode.BICUBIC: (_bicubic_kernel, 2.0),
}


def to_device(t: Tensor, device: torch.device, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Move a small CPU parameter tensor to ``device``.

    ``non_blocking``: a copy from pageable host memory is staged at once, so the CPU tensor may be
    reused right away, and the host does not wait for the device's queue as a blocking copy would.
    """
    return t.to(device=device, dtype=dtype, non_blocking=True)


def resample_matrix(
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
    kernel, support = RESAMPLE_KERNELS[interpolation]
    # The tap count must be a Python int; the boxes live on the CPU, so this costs no device sync.
    max_stretch = 1.0 if nearest else max(1.0, float(length.max()) / out_size)
    taps = min(math.ceil(2.0 * support * max_stretch) + 2, in_size)

    start_f = to_device(start, device, torch.float32).unsqueeze(1)  # (B, 1)
    length_f = to_device(length, device, torch.float32).unsqueeze(1)
    scale = length_f / out_size
    stretch = torch.ones_like(scale) if nearest else scale.clamp(min=1.0)
    centers = start_f + (torch.arange(out_size, device=device) + 0.5) * scale  # (B, out)
    # Every tap with a non-zero weight lies in [first, first + taps).
    first = torch.floor(centers - support * stretch - 0.5).clamp_(0, in_size - taps).long()
    position = first.unsqueeze(2) + torch.arange(taps, device=device)  # (B, out, K)
    distance = (position + 0.5 - centers.unsqueeze(2)) / stretch.unsqueeze(2)
    inside = (position >= start_f.unsqueeze(2)) & (position < (start_f + length_f).unsqueeze(2))
    weights = kernel(distance) * inside
    weights = weights / weights.sum(dim=2, keepdim=True).clamp(min=1e-12)
    matrix = torch.zeros(start.shape[0], out_size, in_size, device=device)
    return matrix.scatter_(2, position, weights)


def resized_crop(
    x: Tensor, boxes: Tensor, flip: Tensor, size: tuple[int, int], interpolation: InterpolationMode
) -> Tensor:
    """Crop, resize and flip every image with its own box: ``(B, C, H, W) -> (B, C, h, w)``.

    Args:
        boxes: ``(B, 4)`` int64 CPU ``(top, left, height, width)``; flip: ``(B,)`` bool CPU.

    A separable filter, ``out = Wy @ x @ Wx^T``, one batched matrix product per axis.  Flipping the
    rows of ``Wx`` flips the output exactly.
    """
    out_h, out_w = size
    top, left, crop_h, crop_w = boxes.unbind(dim=1)
    cols = resample_matrix(left, crop_w, x.shape[3], out_w, interpolation, x.device)  # (B, w, W)
    rows = resample_matrix(top, crop_h, x.shape[2], out_h, interpolation, x.device)  # (B, h, H)
    cols = torch.where(to_device(flip, x.device).view(-1, 1, 1), cols.flip(1), cols)
    # Horizontal pass first and a clamp in between, as torch's uint8 antialiased resize does: it
    # stores the intermediate image as uint8, which clips bicubic overshoot before the vertical pass.
    out = torch.einsum("bchw,bjw->bchj", x, cols).clamp_(0.0, 1.0)
    out = torch.einsum("bih,bchj->bcij", rows, out)
    return out.clamp_(0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# colour jitter, float batches (PIL's ImageEnhance numerics, unrounded)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """``factor``: ``(n,)``.  Scales every pixel, then clamps."""
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the mean grey level of each image (PIL's ImageEnhance.Contrast, unrounded) when it
    has 3 channels; otherwise blend each channel (band) with its own mean: ``C`` bands measure
    different things, so no weighted sum of them is a grey level (1 channel: the same rule)."""
    if x.shape[1] == 3:
        mean = luma(x).mean(dim=(1, 2, 3), keepdim=True)
    else:
        mean = x.mean(dim=(2, 3), keepdim=True)
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1.0 - f) * mean).clamp_(0.0, 1.0)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the grey version of each image (PIL's ImageEnhance.Color); RGB only."""
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1.0 - f) * luma(x)).clamp_(0.0, 1.0)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
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


# Indexed by op id, torchvision's ColorJitter numbering: 0 brightness, 1 contrast, 2 saturation, 3 hue.
JITTER_OPS: tuple[Callable[[Tensor, Tensor], Tensor], ...] = (
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    adjust_hue,
)
# The op ids that need RGB images.
RGB_JITTER_OPS = (2, 3)


def colour_op_applies(op: int, channels: int) -> bool:
    """Whether jitter op ``op`` changes a ``channels``-channel image: saturation and hue act on RGB only
    (on a grey image they change nothing, as in PIL and torchvision; band images have no hue)."""
    return op not in RGB_JITTER_OPS or channels == 3


# ---------------------------------------------------------------------------------------------
# blur, solarize, normalise


def blur_half_width(sigma: Tensor, height: int, width: int) -> Tensor:
    """Half-width of the tensor blur kernel: ``ceil(3 sigma)`` (about +/- 3 sigma), cut to stay
    below the view's side, since reflect padding needs pad < side.  Same shape as ``sigma``."""
    return torch.ceil(3.0 * sigma).clamp(max=min(height, width) - 1)


def gaussian_blur_image(view: ImageLike, sigma: float) -> ImageLike:
    """Blur one image: PIL's ``GaussianBlur`` (the official op), or torchvision's on a tensor with
    an odd kernel of :func:`blur_half_width`."""
    if isinstance(view, Image.Image):
        # PIL's radius is the Gaussian's standard deviation.
        return view.filter(ImageFilter.GaussianBlur(radius=sigma))
    half = int(blur_half_width(torch.tensor(sigma, dtype=torch.float64), *view.shape[-2:]))
    if half < 1:
        return view
    kernel = 2 * half + 1
    return TF.gaussian_blur(view, kernel_size=[kernel, kernel], sigma=[sigma, sigma])


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Blur each image with its own sigma: ``x (n, C, h, w)``, ``sigma (n,)`` float CPU.

    Sample ``b`` gets exactly the kernel of :func:`gaussian_blur_image` for ``sigma_b``: the batch
    shares one padded kernel width (from the largest sigma) whose extra taps are zero, so with
    reflect padding every sample gets its own truncated Gaussian.
    """
    n, channels, height, width = x.shape
    half_b = blur_half_width(sigma, height, width)  # (n,)
    half = int(half_b.max()) if n else 0
    if half < 1:
        return x
    taps = torch.arange(-half, half + 1, dtype=torch.float64)
    kernels = torch.exp(-0.5 * (taps / sigma.double().unsqueeze(1)) ** 2) * (taps.abs() <= half_b.unsqueeze(1))
    kernels = to_device(kernels / kernels.sum(dim=1, keepdim=True), x.device, x.dtype)  # (n, K)
    weight = repeat(kernels, "n k -> (n c) 1 k", c=channels)

    # Grouped conv: every (sample, channel) plane is its own group with its own kernel.
    planes = rearrange(x, "n c h w -> 1 (n c) h w")
    planes = F.conv2d(F.pad(planes, (0, 0, half, half), mode="reflect"), weight.unsqueeze(3), groups=n * channels)
    planes = F.conv2d(F.pad(planes, (half, half, 0, 0), mode="reflect"), weight.unsqueeze(2), groups=n * channels)
    return rearrange(planes, "1 (n c) h w -> n c h w", n=n)


def solarize(x: Tensor, threshold: int) -> Tensor:
    """``x -> 1 - x`` where ``255 x >= threshold - 0.5``, on a ``[0, 1]`` batch of any channel count.

    On the levels of uint8 data (``x = v / 255``) this is exactly the official ``v >= threshold ->
    255 - v``; a continuous value is inverted when it rounds to such a level, which keeps the float
    pipelines (they do not round between steps) on the uint8 ones.
    """
    return torch.where(x * 255.0 >= threshold - 0.5, 1.0 - x, x)


def to_unit_float(x: Tensor) -> Tensor:
    """float32 in ``[0, 1]``: uint8 divided by 255, floats taken as they are."""
    # .div(255) rather than a multiply by 1/255 matches ToTensor bit for bit.
    return x.to(torch.float32).div_(255.0) if x.dtype == torch.uint8 else x.to(torch.float32)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x - mean) / std`` per channel, for ``(C, H, W)`` or ``(B, C, H, W)``; contiguous."""
    mean_t = to_device(torch.tensor(mean, dtype=torch.float32), x.device, x.dtype).view(-1, 1, 1)
    std_t = to_device(torch.tensor(std, dtype=torch.float32), x.device, x.dtype).view(-1, 1, 1)
    return ((x - mean_t) / std_t).contiguous()


def apply_rows(x: Tensor, mask: Tensor, fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Replace, in place, the rows of ``x`` selected by the CPU bool ``mask`` (B,) with ``fn(x[rows], rows)``.

    ``rows`` (the selected indices) stays on the CPU for indexing parameters; the mask is known on
    the host, so selecting rows on a GPU needs no synchronisation.
    """
    rows = mask.nonzero().squeeze(1)
    if rows.numel() == 0:
        return x
    if rows.numel() == x.shape[0]:
        return fn(x, rows)
    index = to_device(rows, x.device)
    return x.index_copy_(0, index, fn(x.index_select(0, index), rows))
