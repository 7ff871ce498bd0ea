"""dino-train's data: the training set with its multi-crop augmenter (one recipe, per image in the
workers or per batch on the device) and the views of one micro-batch."""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from ._setup import UsageError


def build_data(
    args: argparse.Namespace, mean: Sequence[float], std: Sequence[float], rank: int, world_size: int
) -> tuple[DataLoader, Any, Optional[nn.Module]]:
    """(loader, sampler, on-device augmenter or None) of the training set; one recipe either way."""
    from ..augment import BatchedMultiCrop, MultiCropRecipe, MultiCropTransform
    from ..datasets import FashionMNIST, SeededTransform
    from ..sampler import ResumableSampler

    recipe = MultiCropRecipe(args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
                             global_crop_size=args.global_crop_size, local_crop_size=args.local_crop_size,
                             mean=tuple(mean), std=tuple(std))
    if args.dataset == "fashion_mnist":
        base = FashionMNIST(train=True)
    else:
        from torchvision.datasets import ImageFolder

        if not os.path.isdir(args.data_path):
            raise UsageError(f"--data_path {args.data_path!r}: not a directory of image folders")
        base = ImageFolder(args.data_path)
    on_device = BatchedMultiCrop(recipe=recipe) if args.augment == "batched" else None
    dataset = SeededTransform(base, MultiCropTransform(recipe=recipe) if on_device is None else (lambda x: x),
                              seed=args.seed)
    sampler = ResumableSampler(len(dataset), args.batch_size_per_gpu, seed=args.seed, rank=rank, world_size=world_size)
    loader = DataLoader(dataset, sampler=sampler, batch_size=args.batch_size_per_gpu, drop_last=True,
                        num_workers=args.num_workers, pin_memory=torch.cuda.is_available(),
                        persistent_workers=args.num_workers > 0)
    return loader, sampler, on_device


def make_views(images: Any, augment_on_device: Any, args: argparse.Namespace, step: int, micro: int, rank: int,
               device: torch.device) -> list[torch.Tensor]:
    """The multi-crop views of one micro-batch on ``device``: made there (batched augmenter, seeded by
    step), or moved there (per-image augmenter in the workers)."""
    if augment_on_device is not None:
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 7919 + micro * 131 + rank)
        views = augment_on_device(images.to(device, non_blocking=True), generator=generator)
    else:
        views = [im.to(device, non_blocking=True) for im in images]
    if args.channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    return views
