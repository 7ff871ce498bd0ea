"""dino-train's data: the training set with its multi-crop augmenter (one recipe, per image in the
workers or per batch on the device) and the views of one micro-batch."""
from __future__ import annotations

import argparse
import os
import signal
import threading
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from ._setup import UsageError
from .train_gram import gram_teacher_scale
from .train_resolution import MixedResolutionCrops, mixed_resolution_loader, resolution_mix
from .train_sources import ReplacedFiles, TrainSource

if TYPE_CHECKING:
    from ..sampler import ResumableSampler


def quiet_stop_signals(worker_id: int) -> None:
    """DataLoader workers outlive the SIGTERM / SIGINT a cluster or a terminal sends to the whole
    process group, so the main process can finish its step (its batches still coming) and save.

    SIGINT is ignored. SIGTERM is blocked and taken by a thread that ends the worker only when the
    main process sent it (the loader's own shutdown, ``Process.terminate`` at exit) or is gone.
    Where ``sigwaitinfo`` does not exist (macOS), SIGTERM keeps its default action."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        return
    parent = os.getppid()
    # Blocked in this thread before any other starts: every later thread inherits the mask.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait_for_the_parent() -> None:
        while True:
            sender = signal.sigwaitinfo({signal.SIGTERM}).si_pid
            if sender == parent or os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=wait_for_the_parent, name="sigterm-from-parent", daemon=True).start()


class TrainData(NamedTuple):
    """The training set as dino-train reads it: ``loader`` yields (views or raw images, labels,
    keys[, replaced files]) batches (:func:`make_views`), ``sampler`` orders them and places a
    resumed epoch, ``augment_on_device`` is ``--augment batched``'s BatchedMultiCrop (None: the
    workers make the views), and ``replaced`` counts the undecodable files the items stood in for."""

    loader: DataLoader
    sampler: ResumableSampler
    augment_on_device: Optional[nn.Module]
    replaced: ReplacedFiles


def build_data(args: argparse.Namespace, source: TrainSource, rank: int, world_size: int) -> TrainData:
    """The training set's loader, sampler and on-device augmenter (or None); one recipe either way."""
    from ..augment import BatchedMultiCrop, MultiCropRecipe, MultiCropTransform
    from ..datasets import SeededTransform
    from ..sampler import ResumableSampler

    try:
        recipe = MultiCropRecipe(args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
                                 global_crop_size=args.global_crop_size, local_crop_size=args.local_crop_size,
                                 mean=tuple(source.mean), std=tuple(source.std),
                                 gram_teacher_scale=gram_teacher_scale(args))  # DINOv3's Gram crops: appended
    except ValueError as err:
        raise UsageError(f"--mean / --std of {len(source.mean)} channels: the multi-crop recipe refuses them: "
                         f"{err}") from None
    base = source.dataset
    on_device: Optional[nn.Module] = BatchedMultiCrop(recipe=recipe) if args.augment == "batched" else None
    # Items are (views or raw image, label, key[, replaced]): the key, the sample's global index
    # epoch * N + index, seeds the batched augmenter per sample in make_views, as it seeds the per-image one here.
    dataset = SeededTransform(base, MultiCropTransform(recipe=recipe) if on_device is None else None,
                              seed=args.seed, return_key=True)
    sampler = ResumableSampler(len(dataset), args.batch_size_per_gpu, seed=args.seed, rank=rank, world_size=world_size)
    options = dict(num_workers=args.num_workers, pin_memory=torch.cuda.is_available(),
                   persistent_workers=args.num_workers > 0, worker_init_fn=quiet_stop_signals)
    mix = resolution_mix(args)  # DINOv3's high-resolution stage: each batch at one drawn crop-size triple
    if mix is not None:
        loader, on_device = mixed_resolution_loader(args, mix, recipe, base, sampler, options)
    else:
        loader = DataLoader(dataset, sampler=sampler, batch_size=args.batch_size_per_gpu, drop_last=True, **options)
    return TrainData(loader, sampler, on_device, ReplacedFiles(rank == 0))


def make_views(images: Any, augment_on_device: Any, args: argparse.Namespace, step: int, micro: int, rank: int,
               device: torch.device, keys: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
    """The multi-crop views of one micro-batch on ``device``: made there (batched augmenter), or moved
    there (per-image augmenter in the workers).

    The batched augmenter draws each sample's parameters from ``sample_seed(args.seed, key)``, where
    ``keys`` are the samples' global indices (the loader's third item), as the per-image path does:
    the views depend on neither the rank nor the batch layout, so a 2-process run with batch B and a
    1-process run with 2B see the same views.  Without ``keys`` it falls back to one stream per
    (step, micro-batch, rank), which does depend on the rank.
    """
    if isinstance(augment_on_device, MixedResolutionCrops):  # the high-resolution stage: this batch's sizes
        augment_on_device = augment_on_device.at(step, micro)
    if augment_on_device is not None:
        if keys is not None:
            from ..datasets import sample_seeds

            views = augment_on_device(images.to(device, non_blocking=True), seeds=sample_seeds(args.seed, keys))
        else:
            generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 7919 + micro * 131 + rank)
            views = augment_on_device(images.to(device, non_blocking=True), generator=generator)
    else:
        views = [im.to(device, non_blocking=True) for im in images]
    if args.channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    return views
