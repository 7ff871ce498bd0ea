"""Attention maps of a DINO ViT (as the official ``visualize_attention.py``) and training curves.

The maps are the last block's CLS-query attention over the patch keys, one per head. Drawing needs
matplotlib only (no cv2 / skimage), and nothing is ever downloaded: without weights the CLI runs a
randomly initialised model and says so.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from einops import repeat
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _matplotlib():
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("dino_pytorch.visualize draws with matplotlib: pip install matplotlib") from err
    # The object-oriented API with an Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    import matplotlib.image

    return matplotlib, Figure, FigureCanvasAgg


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}, expected a positive int")
    return value


def crop_to_patches(image: Tensor, patch_size: int) -> Tensor:
    """(C, H, W) -> (C, H - H % p, W - W % p): the part the patch grid covers."""
    h, w = image.shape[-2:]
    return image[..., : h - h % patch_size, : w - w % patch_size]


def attention_maps(model: nn.Module, image: Tensor, patch_size: Optional[int] = None) -> Tensor:
    """Per-head attention of the CLS query over the patches in the last block.

    Args:
        model: a ViT with ``get_last_selfattention`` (e.g. :class:`~dino_pytorch.models.VisionTransformer`).
        image: (C, H, W), normalised as the model expects; H and W are cropped down to multiples
            of the patch size.
        patch_size: defaults to ``model.patch_size``.

    Returns: (heads, H // p, W // p) float tensor on the CPU; each head's map sums to at most 1
    (the rest of the CLS query's mass is on itself).
    """
    if not callable(getattr(model, "get_last_selfattention", None)):
        raise TypeError(f"model is a {type(model).__name__} without get_last_selfattention(x); expected a ViT")
    if patch_size is None:
        patch_size = getattr(model, "patch_size", None)
    _positive_int("patch_size", patch_size)
    if getattr(model, "patch_size", patch_size) != patch_size:
        raise ValueError(f"patch_size={patch_size} but the model's patch_size is {model.patch_size}")
    if not isinstance(image, Tensor) or image.ndim != 3:
        raise ValueError(f"image has shape {getattr(image, 'shape', type(image).__name__)}, expected (C, H, W)")
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
            attn = model.get_last_selfattention(image.unsqueeze(0))  # (1, heads, N+1, N+1)
    finally:
        model.train(was_training)
    return attn[0, :, 0, 1:].reshape(attn.shape[1], rows, cols).float().cpu()


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
    _positive_int("patch_size", patch_size)
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
    _positive_int("patch_size", patch_size)
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
    patch_size = _positive_int("model.patch_size", getattr(model, "patch_size", None))
    total = len(dataset)
    count = total if count is None else min(_positive_int("count", count), total)
    written: list[Path] = []
    for i in range(count):
        item = dataset[i]
        image = item[0] if isinstance(item, (tuple, list)) else item
        maps = attention_maps(model, image, patch_size)
        written += save_attention_pngs(Path(output_dir) / f"{i:03d}", image, maps, patch_size, threshold)
    return written


# ----------------------------------------------------------------------------------------- curves

Records = Union[str, os.PathLike, Iterable[Mapping[str, Any]]]


def read_log(path: Union[str, os.PathLike]) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL ``log.txt``, one per non-blank line.

    A malformed last line (a log being written) is skipped with a warning; a malformed line
    elsewhere raises ValueError naming the file and line.
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    records = []
    for k, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if k == len(numbered) - 1:
                warnings.warn(f"{path}: skipping the incomplete last line {number}", stacklevel=2)
                break
            raise ValueError(f"{path}: line {number} is not JSON: {err}") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {number} is a JSON {type(record).__name__}, expected an object")
        records.append(record)
    return records


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float], str]:
    rows = [r for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    for x_key in ("step", "epoch"):
        if rows and all(isinstance(r.get(x_key), (int, float)) for r in rows):
            return [r[x_key] for r in rows], [r[key] for r in rows], x_key
    return list(range(len(rows))), [r[key] for r in rows], "record"


def plot_curves(log_path_or_records: Records, out_png: Union[str, os.PathLike]) -> Path:
    """Plot ``train_loss`` (and ``knn_top1`` / ``knn_top1_subset`` / ``knn_top5`` when present) to ``out_png``.

    Args:
        log_path_or_records: a JSONL file (``log.txt``) or an iterable of dicts such as
            ``{"step": 100, "epoch": 1, "train_loss": 7.3, "knn_top1": 41.2}``; any key may be
            missing. x is ``step`` when every point has one, else ``epoch``, else the record index.
    """
    if isinstance(log_path_or_records, (str, os.PathLike)):
        records = read_log(log_path_or_records)
    else:
        records = [dict(r) for r in log_path_or_records]
    loss = _series(records, "train_loss")
    # Full-set and subset k-NN are different measurements: separate lines, never joined.
    knn = [(k, _series(records, k)) for k in ("knn_top1", "knn_top1_subset", "knn_top5")]
    knn = [(k, s) for k, s in knn if s[0]]
    if not loss[0] and not knn:
        raise ValueError(f"{log_path_or_records!r}: no train_loss or knn_top1 values to plot")
    _, Figure, FigureCanvasAgg = _matplotlib()
    panels = [p for p in (bool(loss[0]), bool(knn)) if p]
    fig = Figure(figsize=(6 * len(panels), 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    i = 0
    if loss[0]:
        xs, ys, x_key = loss
        axes[i].plot(xs, ys, lw=1)
        axes[i].set(xlabel=x_key, ylabel="train loss", title="DINO loss")
        axes[i].grid(alpha=0.3)
        i += 1
    if knn:
        for key, (xs, ys, x_key) in knn:
            axes[i].plot(xs, ys, marker="o", ms=3, label=key)
        axes[i].set(xlabel=x_key, ylabel="accuracy (%)", title="k-NN")
        axes[i].grid(alpha=0.3)
        axes[i].legend()
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


# ------------------------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dino-visualize-attention",
        description="Save the last-block CLS attention maps of a DINO ViT for one image.",
    )
    p.add_argument("--arch", default="vit_small", choices=("vit_tiny", "vit_small", "vit_base"))
    p.add_argument("--patch_size", type=int, default=8, help="patch size of the model (official default 8)")
    p.add_argument("--pretrained_weights", default=None,
                   help="our checkpoint, an official full checkpoint or a model-zoo backbone file")
    p.add_argument("--checkpoint_key", default="teacher", help="entry of a full checkpoint to use")
    p.add_argument("--trusted", action="store_true",
                   help="allow unpickling arbitrary objects (official full checkpoints); trusted files only")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image_path", help="any image file PIL can open")
    source.add_argument("--fashion_mnist_index", type=int, help="index of a Fashion-MNIST test image (1 channel)")
    p.add_argument("--image_size", type=int, nargs=2, default=(480, 480), metavar=("H", "W"))
    p.add_argument("--threshold", type=float, default=0.6,
                   help="keep this fraction of the attention mass in the masks; a negative value writes no masks")
    p.add_argument("--output_dir", default=".")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def _load_image(args: argparse.Namespace, in_chans: int) -> Tensor:
    """The (in_chans, H, W) normalised input of the CLI."""
    from torchvision.transforms import v2

    from .datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FashionMNIST

    if args.fashion_mnist_index is not None:
        data = FashionMNIST(train=False)
        if not 0 <= args.fashion_mnist_index < len(data):
            raise ValueError(f"--fashion_mnist_index={args.fashion_mnist_index}, expected 0..{len(data) - 1}")
        image = data[args.fashion_mnist_index][0].expand(in_chans, -1, -1)
        mean, std = FASHION_MNIST_MEAN * in_chans, FASHION_MNIST_STD * in_chans
    else:
        from PIL import Image

        with Image.open(args.image_path) as pil:
            pil = pil.convert("L" if in_chans == 1 else "RGB")
            image = v2.functional.pil_to_tensor(pil)
        # A greyscale photo for a 1-channel model: Fashion-MNIST statistics are the closest known.
        mean, std = (FASHION_MNIST_MEAN, FASHION_MNIST_STD) if in_chans == 1 else (IMAGENET_MEAN, IMAGENET_STD)
    transform = v2.Compose([
        v2.Resize(tuple(args.image_size), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])
    return transform(image)


def _weights_geometry(args: argparse.Namespace) -> tuple[dict[str, Tensor], int, int]:
    """Backbone state, its input channels and training image size (from patch_embed / pos_embed)."""
    from .checkpoint import CheckpointError, load_official_weights

    path = args.pretrained_weights
    try:
        state, _ = load_official_weights(path, checkpoint_key=args.checkpoint_key, trusted=args.trusted)
    except CheckpointError as err:
        raise SystemExit(f"dino-visualize-attention: {err}") from err
    proj, pos = state.get("patch_embed.proj.weight"), state.get("pos_embed")
    if proj is None or pos is None:
        raise SystemExit(f"--pretrained_weights {path!r} holds no ViT backbone (no patch_embed.proj.weight / pos_embed)")
    if proj.shape[-1] != args.patch_size:
        raise SystemExit(f"--pretrained_weights {path!r} has patch size {proj.shape[-1]}; pass --patch_size {proj.shape[-1]}")
    side = math.isqrt(pos.shape[1] - 1)
    return state, int(proj.shape[1]), side * args.patch_size


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``dino-visualize-attention``: attention maps and masks of one image, written as PNGs."""
    args = _parser().parse_args(argv)
    from .models import create_model

    kwargs: dict[str, Any] = {"patch_size": args.patch_size}
    state = None
    if args.pretrained_weights:
        state, in_chans, img_size = _weights_geometry(args)
        kwargs.update(in_chans=in_chans, img_size=img_size)
    else:
        kwargs["in_chans"] = 1 if args.fashion_mnist_index is not None else 3
        warnings.warn(
            f"no --pretrained_weights: using a randomly initialised {args.arch}/{args.patch_size}, so the maps "
            "show no learned structure (nothing is downloaded)",
            stacklevel=2,
        )
    model = create_model(args.arch, **kwargs)
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise SystemExit(
                f"--pretrained_weights {args.pretrained_weights!r} does not fit {args.arch} with "
                f"patch_size={args.patch_size}: {err}"
            ) from err
    model.to(args.device).eval()
    image = crop_to_patches(_load_image(args, kwargs["in_chans"]), args.patch_size)
    attentions = attention_maps(model, image, args.patch_size)
    threshold = args.threshold if args.threshold >= 0 else None
    written = save_attention_pngs(args.output_dir, image, attentions, args.patch_size, threshold)
    print(f"wrote {len(written)} files to {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
