"""dino-visualize-attention: the last-block CLS attention maps of a DINO ViT for one image, as PNGs.

    dino-visualize-attention --pretrained_weights runs/demo/checkpoint.pth --image_path photo.png

A checkpoint written by dino-train describes its network, so no architecture flag is needed; for
official files (and ours before 0.2) the patch size, channels and image size are read off the
weights and ``--arch`` picks the family. Nothing is ever downloaded: without weights the program
runs a randomly initialised ViT and says so.
"""
from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..checkpoint import CheckpointError, load_into, load_official_weights, read_checkpoint
from ..model_config import build_backbone, is_vit, read_model_config
from ._setup import (
    TRUST_HELP,
    UsageError,
    add_debug_flag,
    bool_flag,
    check_flags,
    dataset_stats,
    resolve_device,
    run_program,
    setup_phase,
)

VITS = ("vit_tiny", "vit_small", "vit_base")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dino-visualize-attention",
        description="Save the last-block CLS attention maps of a DINO ViT for one image.",
    )
    p.add_argument("--arch", default=None, choices=VITS,
                   help="ViT family (default: the checkpoint's, else vit_small)")
    p.add_argument("--patch_size", type=int, default=None,
                   help="patch size (default: the checkpoint's or the weights', else the official 8)")
    p.add_argument("--pretrained_weights", default=None,
                   help="a dino-train checkpoint, an official full checkpoint or a model-zoo backbone file")
    p.add_argument("--checkpoint_key", default="teacher", help="entry of a full checkpoint to use")
    p.add_argument("--trusted_checkpoint", type=bool_flag, nargs="?", const=True, default=False, help=TRUST_HELP)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image_path", help="any image file PIL can open")
    source.add_argument("--fashion_mnist_index", type=int, help="index of a Fashion-MNIST test image")
    p.add_argument("--image_size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="resize the image to H W (default: the training image size of the checkpoint, else 480 480)")
    p.add_argument("--threshold", type=float, default=0.6,
                   help="keep this fraction of the attention mass in the masks; a negative value writes no masks")
    p.add_argument("--output_dir", default=".")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    add_debug_flag(p)
    return p


def _vit_from_weights(args: argparse.Namespace, raw: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """A file without a stored configuration: patch size, channels and image size from the weights."""
    from ..models import create_model

    path = args.pretrained_weights
    state, _ = load_official_weights(path, checkpoint_key=args.checkpoint_key, checkpoint=raw)
    proj, pos = state.get("patch_embed.proj.weight"), state.get("pos_embed")
    if proj is None or pos is None:
        raise UsageError(f"--pretrained_weights {path} holds no ViT backbone (no patch_embed / pos_embed): "
                         "attention maps need a ViT")
    patch = int(proj.shape[-1])
    if args.patch_size is not None and args.patch_size != patch:
        raise UsageError(f"--patch_size {args.patch_size}: {path} has patch size {patch}; pass --patch_size {patch}")
    arch = args.arch or "vit_small"
    channels, size = int(proj.shape[1]), math.isqrt(pos.shape[1] - 1) * patch
    # Depth and width are in the weights too (a ViT trained with non-default --vit_depth/--vit_embed_dim);
    # the head count is not, so it stays the family's.
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    model = create_model(arch, patch_size=patch, in_chans=channels, img_size=size, depth=depth,
                         embed_dim=int(proj.shape[0]))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise UsageError(f"--pretrained_weights {path} does not fit {arch} with patch_size={patch} "
                         f"({first}); pass the --arch it was trained as") from None
    mean, std = dataset_stats("fashion_mnist" if channels == 1 else "imagefolder", channels)
    return model, {"patch_size": patch, "in_chans": channels, "image_size": None, "mean": mean, "std": std}


def build_model(args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any]]:
    """The ViT and how its inputs are prepared (patch size, channels, image size, mean, std)."""
    from ..models import create_model

    path = args.pretrained_weights
    if not path:
        arch, patch = args.arch or "vit_small", args.patch_size or 8
        channels = 1 if args.fashion_mnist_index is not None else 3
        warnings.warn(f"no --pretrained_weights: using a randomly initialised {arch}/{patch}, so the maps show no "
                      "learned structure (nothing is downloaded)", stacklevel=2)
        mean, std = dataset_stats("fashion_mnist" if channels == 1 else "imagefolder", channels)
        return create_model(arch, patch_size=patch, in_chans=channels), {
            "patch_size": patch, "in_chans": channels, "image_size": None, "mean": mean, "std": std}
    raw = read_checkpoint(path, trusted=args.trusted_checkpoint)
    config = read_model_config(raw, path)
    if config is None or args.arch is not None:
        return _vit_from_weights(args, raw)
    if not is_vit(config):
        raise UsageError(f"--pretrained_weights {path} holds a {config['arch']} backbone: attention maps need a "
                         f"ViT ({', '.join(VITS)})")
    model = build_backbone(config)
    load_into(model, None, path, checkpoint_key=args.checkpoint_key, checkpoint=raw)
    data = config["data"]
    return model, {"patch_size": config["backbone_kwargs"]["patch_size"], "in_chans": data["in_chans"],
                   "image_size": data.get("image_size"), "mean": data["mean"], "std": data["std"]}


def load_image(args: argparse.Namespace, prep: dict[str, Any]) -> Tensor:
    """The (C, H, W) normalised input, C the model's channels."""
    from torchvision.transforms import v2

    channels = prep["in_chans"]
    if args.fashion_mnist_index is not None:
        from ..datasets import FashionMNIST

        data = FashionMNIST(train=False)
        if not 0 <= args.fashion_mnist_index < len(data):
            raise UsageError(f"--fashion_mnist_index {args.fashion_mnist_index}: expected 0..{len(data) - 1}")
        image = data[args.fashion_mnist_index][0].expand(channels, -1, -1)
    else:
        from PIL import Image

        try:
            with Image.open(args.image_path) as pil:
                image = v2.functional.pil_to_tensor(pil.convert("L" if channels == 1 else "RGB"))
        except OSError as err:
            raise UsageError(f"--image_path {args.image_path!r}: {err}") from None
    size = args.image_size or ([prep["image_size"]] * 2 if prep["image_size"] else [480, 480])
    transform = v2.Compose([v2.Resize(list(size), antialias=True), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(prep["mean"], prep["std"])])
    return transform(image)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``dino-visualize-attention``; returns 0 (user errors exit 2 with one line)."""
    return run_program("dino-visualize-attention", _main, argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    from ..attention import attention_maps, crop_to_patches, save_attention_pngs

    args = build_parser().parse_args(argv)
    check_flags(args, patch_size="int>=1", image_size="int>=1", threshold="<=1", fashion_mnist_index="int>=0",
                pretrained_weights="file", image_path="file", output_dir="outdir")
    device = resolve_device(args.device)
    try:
        with setup_phase():
            model, prep = build_model(args)
    except CheckpointError as err:
        raise UsageError(f"--pretrained_weights {args.pretrained_weights}: {err}") from None
    model.to(device).eval()
    patch = prep["patch_size"]
    with setup_phase():
        image = crop_to_patches(load_image(args, prep), patch)
    attentions = attention_maps(model, image, patch)
    threshold = args.threshold if args.threshold >= 0 else None
    try:
        written = save_attention_pngs(args.output_dir, image, attentions, patch, threshold)
    except ImportError as err:
        raise UsageError(f"attention PNGs need matplotlib ({err}): pip install 'dino-pytorch[train]'") from None
    print(f"wrote {len(written)} files to {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
