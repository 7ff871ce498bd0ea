"""dino-train's high-resolution stage (DINOv3's ``high_res_adapt``; docs/dinov3.md, "A high-resolution
stage"): the flags, their one-line checks, the :class:`~dino_pytorch.augment.resolution_mix.ResolutionMix`
they ask for, and the loader that makes each batch at its drawn crop sizes."""
from __future__ import annotations

import argparse
from typing import Any, Optional

from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..augment.recipe import MultiCropRecipe
from ..augment.resolution_mix import ByTripleDataset, MixedResolutionBatchSampler, MixedResolutionCrops, ResolutionMix
from ..gram_anchor import GramAnchor
from ..sampler import ResumableSampler
from ._setup import DINOV2_PREFIX, UsageError

RESOLUTION_FLAG_RULES = dict(global_crop_sizes="int>=1", local_crop_sizes="int>=1", crop_size_ratios=">=0",
                             gram_teacher_crop_sizes="int>=1", final_momentum_teacher="[0,1]")
STAGE_ONLY_FLAGS = ("local_crop_sizes", "crop_size_ratios", "gram_teacher_crop_sizes")
VIT_PREFIXES = ("vit_", DINOV2_PREFIX)


def add_resolution_args(p: argparse.ArgumentParser) -> None:
    """The stage's flags (off unless ``--global_crop_sizes``), and the end of the momentum's cosine."""
    g = p.add_argument_group("DINOv3 high-resolution stage (docs/dinov3.md)")
    g.add_argument("--global_crop_sizes", default=None, type=int, nargs="+", metavar="SIZE",
                   help="each batch's global crops at one of these sizes (DINOv3's crops.global_crops_size list), "
                        "drawn per batch at --crop_size_ratios; the ViT's position table is interpolated")
    g.add_argument("--local_crop_sizes", default=None, type=int, nargs="+", metavar="SIZE",
                   help="the local crops' size beside each global size (default: --local_crop_size for all)")
    g.add_argument("--crop_size_ratios", default=None, type=float, nargs="+", metavar="R",
                   help="each size pair's share of the batches (DINOv3's global_local_crop_pairs_ratios; "
                        "default: equal shares)")
    g.add_argument("--gram_teacher_crop_sizes", default=None, type=int, nargs="+", metavar="SIZE",
                   help="with --gram_weight: the Gram teacher's crop size beside each global size (DINOv3's "
                        "gram_teacher_crops_size; default: --gram_teacher_scale times each global size)")
    g.add_argument("--final_momentum_teacher", default=1.0, type=float,
                   help="where the teacher momentum's cosine ends (official: 1; a constant momentum, as DINOv3's "
                        "stage: equal to --momentum_teacher)")


def _listed(values: Any) -> str:
    return " ".join(map(str, values))


def check_resolution_flags(args: argparse.Namespace) -> None:
    """The stage's flags against each other, the arch and Gram anchoring (one line naming the flag and its
    value); call before the Gram flags' defaults are filled in. Fills the local sizes and ratios' defaults."""
    if args.global_crop_sizes is None:
        given = next((name for name in STAGE_ONLY_FLAGS if getattr(args, name) is not None), None)
        if given is not None:
            raise UsageError(f"--{given} {_listed(getattr(args, given))}: a high-resolution stage option, and the "
                             "stage is off; pass --global_crop_sizes too")
        return
    sizes = list(args.global_crop_sizes)
    args.local_crop_sizes = args.local_crop_sizes or [args.local_crop_size] * len(sizes)
    args.crop_size_ratios = args.crop_size_ratios or [1.0] * len(sizes)
    named = [("local_crop_sizes", args.local_crop_sizes), ("crop_size_ratios", args.crop_size_ratios),
             ("gram_teacher_crop_sizes", args.gram_teacher_crop_sizes)]
    for name, values in named:
        if values is not None and len(values) != len(sizes):
            raise UsageError(f"--{name} {_listed(values)}: {len(values)} values, expected {len(sizes)}, one per "
                             f"--global_crop_sizes {_listed(sizes)}")
    if sum(args.crop_size_ratios) <= 0:
        raise UsageError(f"--crop_size_ratios {_listed(args.crop_size_ratios)}: expected a sum > 0")
    checked = [(f"--global_crop_sizes {_listed(sizes)}", sizes),
               (f"--local_crop_sizes {_listed(args.local_crop_sizes)}", list(args.local_crop_sizes))]
    checked += _check_gram(args, sizes)
    if args.arch.startswith(VIT_PREFIXES):
        for shown, values in checked:
            bad = next((v for v in values if v % args.patch_size), None)
            if bad is not None:
                raise UsageError(f"{shown}: {bad} is not a multiple of --patch_size {args.patch_size}; {args.arch} "
                                 "takes whole patches")


def _check_gram(args: argparse.Namespace, sizes: list[int]) -> list[tuple[str, list[int]]]:
    """``--gram_teacher_crop_sizes`` against Gram anchoring; the Gram crops' sizes to check, with their flags."""
    gram_sizes = args.gram_teacher_crop_sizes
    if args.gram_weight == 0:
        if gram_sizes is not None:
            raise UsageError(f"--gram_teacher_crop_sizes {_listed(gram_sizes)}: the Gram teacher's crops, and Gram "
                             "anchoring is off; pass --gram_weight > 0 (DINOv3's stage: 1.5) to turn it on")
        return []
    if gram_sizes is not None:
        if args.gram_teacher_scale is not None:
            raise UsageError(f"--gram_teacher_scale {args.gram_teacher_scale} with --gram_teacher_crop_sizes "
                             f"{_listed(gram_sizes)}: expected one or the other")
        return [(f"--gram_teacher_crop_sizes {_listed(gram_sizes)}", list(gram_sizes))]
    scale = GramAnchor.teacher_scale if args.gram_teacher_scale is None else args.gram_teacher_scale
    grams = [round(scale * g) for g in sizes]
    return [(f"--gram_teacher_scale {scale} with --global_crop_sizes {_listed(sizes)} (Gram crops {_listed(grams)})",
             grams)]


def resolution_mix(args: argparse.Namespace) -> Optional[ResolutionMix]:
    """The stage's size triples and ratios, seeded by ``--seed`` (None: no stage)."""
    if args.global_crop_sizes is None:
        return None
    return ResolutionMix(args.global_crop_sizes, args.local_crop_sizes, args.crop_size_ratios,
                         gram_sizes=args.gram_teacher_crop_sizes, seed=args.seed)


def mixed_resolution_loader(args: argparse.Namespace, mix: ResolutionMix, recipe: MultiCropRecipe, base: Dataset,
                            sampler: ResumableSampler,
                            options: dict[str, Any]) -> tuple[DataLoader, Optional[nn.Module]]:
    """The stage's loader and on-device augmenter: ``--augment batched`` keeps the plain loader of raw images
    and crops each batch at its triple (:class:`MixedResolutionCrops`); per image, a batch sampler hands
    each item its batch's triple, and the workers crop at that size (:class:`ByTripleDataset`).
    ``options``: the DataLoader's other keywords (workers, pinning)."""
    from ..augment import MultiCropTransform
    from ..datasets import SeededTransform

    if args.augment == "batched":
        raw = SeededTransform(base, None, seed=args.seed, return_key=True)
        loader = DataLoader(raw, sampler=sampler, batch_size=args.batch_size_per_gpu, drop_last=True, **options)
        return loader, MixedResolutionCrops(mix, recipe)
    per_triple = [SeededTransform(base, MultiCropTransform(recipe=r), seed=args.seed, return_key=True)
                  for r in mix.recipes(recipe)]
    batches = MixedResolutionBatchSampler(sampler, mix, args.grad_accum_steps)
    return DataLoader(ByTripleDataset(per_triple), batch_sampler=batches, **options), None
