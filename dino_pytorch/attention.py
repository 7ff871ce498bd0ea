"""Attention maps of a DINO ViT, as the official ``visualize_attention.py``: the last block's
CLS-query attention over the patch keys, one map per head, and the masks holding a fraction of
its mass; and how much of that attention falls on the object (:func:`cls_attention_foreground_share`).
Drawing needs matplotlib only (an optional extra; no cv2 / skimage).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Union

import torch
from einops import repeat
from torch import Tensor, nn

from .validate import check_positive_int

if TYPE_CHECKING:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure


def _matplotlib() -> tuple[ModuleType, type[Figure], type[FigureCanvasAgg]]:
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("dino_pytorch.attention draws with matplotlib: pip install matplotlib") from err
    # The object-oriented API with an Agg canvas: no pyplot, no global backend switch.
    import matplotlib.image
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return matplotlib, Figure, FigureCanvasAgg


def crop_to_patches(image: Tensor, patch_size: int) -> Tensor:
    """(C, H, W) -> (C, H - H % p, W - W % p): the part the patch grid covers."""
    h, w = image.shape[-2:]
    return image[..., : h - h % patch_size, : w - w % patch_size]


def attention_maps(model: nn.Module, image: Tensor, patch_size: Optional[int] = None) -> Tensor:
    """Per-head attention of the CLS query over the patches in the last block.

    Args:
        model: a ViT with ``get_last_selfattention`` (e.g. :class:`~dino_pytorch.models.VisionTransformer`,
            or DINOv2's :class:`~dino_pytorch.models.DinoVisionTransformer`, whose registers are left out).
        image: (C, H, W), or a batch (B, C, H, W), normalised as the model expects; H and W are
            cropped down to multiples of the patch size.
        patch_size: defaults to ``model.patch_size``.

    Returns: (heads, H // p, W // p), or (B, heads, H // p, W // p) for a batch, float tensor on
    the CPU; each head's map sums to at most 1 (the rest of the CLS query's mass is on itself and
    on any registers).
    """
    get_last_selfattention = getattr(model, "get_last_selfattention", None)
    if not callable(get_last_selfattention):
        raise TypeError(f"model is a {type(model).__name__} without get_last_selfattention(x); expected a ViT")
    if patch_size is None:
        patch_size = getattr(model, "patch_size", None)
    patch_size = check_positive_int("patch_size", patch_size)
    if getattr(model, "patch_size", patch_size) != patch_size:
        raise ValueError(f"patch_size={patch_size} but the model's patch_size is {model.patch_size}")
    if not isinstance(image, Tensor) or image.ndim not in (3, 4):
        raise ValueError(f"image has shape {getattr(image, 'shape', type(image).__name__)}, expected (C, H, W) "
                         "or (B, C, H, W)")
    if min(image.shape[-2:]) < patch_size:
        raise ValueError(f"image of size {tuple(image.shape[-2:])} is smaller than patch_size={patch_size}")
    image = crop_to_patches(image, patch_size)
    rows, cols = image.shape[-2] // patch_size, image.shape[-1] // patch_size
    param = next(model.parameters(), None)
    if param is not None:
        image = image.to(device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()  # no dropout in the maps
    try:
        with torch.no_grad():
            attn = get_last_selfattention(image if image.ndim == 4 else image.unsqueeze(0))  # (B, heads, T, T)
    finally:
        model.train(was_training)
    # The patch keys are the last rows * cols tokens: after CLS and, in DINOv2's ViT, its registers.
    maps = attn[:, :, 0, attn.shape[-1] - rows * cols:].reshape(*attn.shape[:2], rows, cols).float().cpu()
    return maps if image.ndim == 4 else maps[0]


class ForegroundShare(NamedTuple):
    """:func:`cls_attention_foreground_share`'s result, in percent."""

    share: float
    """The CLS query's attention on foreground patches (renormalised over the patches), mean over images."""
    uniform: float
    """What uniform attention would give: the mean fraction of foreground patches."""


def patch_foreground(pixels: Tensor, patch_size: int) -> Tensor:
    """Which patches hold any non-zero pixel (of any channel).

    Shapes: (N, C, H, W) or (N, H, W), raw or bool pixels -> bool (N, H // p, W // p); H and W are
    cropped to the patch grid as :func:`attention_maps` crops. Pass the raw images (a garment on a
    zero background) or a pixel mask, not the model's input: normalising turns zero into a float32
    ``-mean / std`` that no Python float reliably equals, and resizing blurs it.
    """
    check_positive_int("patch_size", patch_size)
    if not isinstance(pixels, Tensor) or pixels.ndim not in (3, 4):
        raise ValueError(f"pixels has shape {getattr(pixels, 'shape', type(pixels).__name__)}, expected "
                         "(N, C, H, W) or (N, H, W)")
    if min(pixels.shape[-2:]) < patch_size:
        raise ValueError(f"pixels of size {tuple(pixels.shape[-2:])} are smaller than patch_size={patch_size}")
    ink = crop_to_patches(pixels, patch_size) != 0
    if ink.ndim == 4:
        ink = ink.any(dim=1)
    n, h, w = ink.shape
    return ink.reshape(n, h // patch_size, patch_size, w // patch_size, patch_size).any(dim=4).any(dim=2)


def cls_attention_foreground_share(
    model: nn.Module, images: Tensor, foreground: Tensor, patch_size: Optional[int] = None, batch_size: int = 256,
) -> ForegroundShare:
    """How much of the last block's CLS attention falls on the object: per image, the CLS query's
    attention over the patch keys, averaged over heads and renormalised over the patches (its mass
    on itself left out), summed over the foreground patches; the mean over the images, in percent.

    Args:
        model: a ViT, as for :func:`attention_maps` (run in eval mode, without gradients).
        images: (N, C, H, W), normalised as the model expects.
        foreground: bool (N, H // p, W // p), e.g. :func:`patch_foreground` of the raw images.
        patch_size: defaults to ``model.patch_size``.
        batch_size: images per forward pass.

    Returns: a :class:`ForegroundShare`, with the uniform-attention baseline for context.
    """
    batch_size = check_positive_int("batch_size", batch_size)
    if not isinstance(images, Tensor) or images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images has shape {getattr(images, 'shape', type(images).__name__)}, expected "
                         "(N, C, H, W) with N >= 1")
    if not isinstance(foreground, Tensor) or foreground.dtype != torch.bool or foreground.ndim != 3 \
            or len(foreground) != len(images):
        raise ValueError(f"foreground is {getattr(foreground, 'dtype', type(foreground).__name__)} of shape "
                         f"{tuple(getattr(foreground, 'shape', ()))}, expected bool ({len(images)}, H // p, W // p)")
    shares = []
    for start in range(0, len(images), batch_size):
        maps = attention_maps(model, images[start:start + batch_size], patch_size).mean(dim=1)  # (B, h, w)
        mask = foreground[start:start + batch_size]
        if mask.shape != maps.shape:
            raise ValueError(f"foreground has a {tuple(mask.shape[1:])} patch grid, the images a "
                             f"{tuple(maps.shape[1:])} one")
        flat = maps.flatten(1).double()
        shares.append((flat * mask.flatten(1)).sum(dim=1) / flat.sum(dim=1))
    uniform = foreground.flatten(1).double().mean(dim=1).mean()
    return ForegroundShare(share=100.0 * torch.cat(shares).mean().item(), uniform=100.0 * uniform.item())


def threshold_masks(attn: Tensor, threshold: float = 0.6) -> Tensor:
    """Per head, the smallest set of highest-attention patches holding ``threshold`` of the mass.

    Official semantics: each head's values are sorted ascending, normalised to sum 1 and
    cumulated; a patch is kept when its cumulative mass exceeds ``1 - threshold``. The kept set
    therefore holds at least ``threshold`` of the mass, and dropping its smallest member would
    leave less.

    Shapes: (heads, h, w) -> bool (heads, h, w).
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold!r}, expected a fraction of the attention mass in [0, 1]")
    if not isinstance(attn, Tensor) or attn.ndim != 3:
        raise ValueError(f"attn has shape {getattr(attn, 'shape', type(attn).__name__)}, expected (heads, h, w)")
    flat = attn.flatten(1)
    if not flat.is_floating_point() or flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    values, order = torch.sort(flat, dim=1)
    mass = torch.cumsum(values / values.sum(dim=1, keepdim=True), dim=1)
    keep = mass > 1 - threshold
    return torch.zeros_like(keep).scatter_(1, order, keep).reshape(attn.shape)


def upsample(maps: Tensor, patch_size: int) -> Tensor:
    """Nearest-neighbour upsampling by ``patch_size``: (heads, h, w) -> (heads, h*p, w*p), same dtype."""
    check_positive_int("patch_size", patch_size)
    return repeat(maps, "n h w -> n (h p1) (w p2)", p1=patch_size, p2=patch_size)


def _display_image(image: Tensor) -> Tensor:
    """(C, H, W) normalised -> (H, W, C) or (H, W) in [0, 1] by min-max scaling (as official)."""
    image = image.detach().float().cpu()
    lo, hi = image.min(), image.max()
    image = (image - lo) / (hi - lo).clamp_min(1e-12)
    return image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)


def _save_overlay(path: Path, image: Tensor, mask: Tensor, color: Sequence[float]) -> None:
    _, Figure, FigureCanvasAgg = _matplotlib()
    h, w = mask.shape
    fig = Figure(figsize=(w / 100, h / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    ax.imshow(image.numpy(), cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    overlay = torch.zeros(h, w, 4)
    overlay[..., :3] = torch.tensor(color[:3])
    overlay[..., 3] = 0.5 * mask.float()
    ax.imshow(overlay.numpy(), interpolation="nearest")
    if mask.any() and not mask.all():
        ax.contour(mask.float().numpy(), levels=[0.5], colors=[color[:3]], linewidths=1)
    fig.savefig(path, dpi=100)


def save_attention_pngs(
    output_dir: Union[str, os.PathLike],
    image: Tensor,
    attentions: Tensor,
    patch_size: int,
    threshold: Optional[float] = 0.6,
) -> list[Path]:
    """Write ``img.png``, ``attn-head{j}.png`` and (with a threshold) ``mask_th{t}_head{j}.png``.

    Args:
        output_dir: created if needed.
        image: (C, H, W) as fed to the model (shown min-max scaled); cropped to the patch grid.
        attentions: (heads, H // p, W // p) from :func:`attention_maps`.
        threshold: mass kept by :func:`threshold_masks`; None writes no masks.

    Returns the written paths. The attention PNGs are upsampled by ``patch_size`` (nearest) and use
    matplotlib's default colormap; masks are a coloured overlay with contours on the image.
    """
    matplotlib, _, _ = _matplotlib()
    check_positive_int("patch_size", patch_size)
    image = crop_to_patches(image, patch_size)
    heads, rows, cols = attentions.shape
    if (rows * patch_size, cols * patch_size) != tuple(image.shape[-2:]):
        raise ValueError(
            f"attentions of shape {tuple(attentions.shape)} at patch_size={patch_size} do not cover an image "
            f"of size {tuple(image.shape[-2:])}"
        )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    shown = _display_image(image)
    written = [out / "img.png"]
    matplotlib.image.imsave(written[0], shown.numpy(), cmap="gray" if shown.ndim == 2 else None, vmin=0, vmax=1)
    large = upsample(attentions.detach().float().cpu(), patch_size)
    for j in range(heads):
        path = out / f"attn-head{j}.png"
        matplotlib.image.imsave(path, large[j].numpy(), format="png")
        written.append(path)
    if threshold is not None:
        masks = upsample(threshold_masks(attentions.detach().cpu(), threshold), patch_size)
        colors = matplotlib.colormaps["tab10"].colors
        for j in range(heads):
            path = out / f"mask_th{threshold}_head{j}.png"
            _save_overlay(path, shown, masks[j], colors[j % len(colors)])
            written.append(path)
    return written


def save_dataset_attention_maps(
    model: nn.Module,
    dataset: Any,
    output_dir: Union[str, os.PathLike],
    count: Optional[int] = None,
    threshold: Optional[float] = 0.6,
) -> list[Path]:
    """:func:`save_attention_pngs` for the first ``count`` images of ``dataset``, one folder each.

    Args:
        dataset: a (N, C, H, W) tensor, or anything indexable whose items are (C, H, W) tensors
            or ``(image, label)`` pairs (a map-style Dataset), normalised as the model expects.
        count: how many images (all when None).

    Writes ``output_dir/{i:03d}/`` per image and returns all written paths.
    """
    patch_size = check_positive_int("model.patch_size", getattr(model, "patch_size", None))
    total = len(dataset)
    count = total if count is None else min(check_positive_int("count", count), total)
    written: list[Path] = []
    for i in range(count):
        item = dataset[i]
        image = item[0] if isinstance(item, (tuple, list)) else item
        maps = attention_maps(model, image, patch_size)
        written += save_attention_pngs(Path(output_dir) / f"{i:03d}", image, maps, patch_size, threshold)
    return written
