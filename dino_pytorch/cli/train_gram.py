"""dino-train's Gram anchoring flags (DINOv3; docs/dinov3.md, "Gram anchoring in training"): the flags,
their one-line checks, the :class:`~dino_pytorch.GramAnchor` they ask for, and the split of a batch's
views into the student's views and the Gram teacher's crops."""
from __future__ import annotations

import argparse
from typing import Optional

import torch

from ..gram_anchor import GramAnchor
from ._setup import DINOV2_PREFIX, UsageError

GRAM_FLAG_RULES = dict(gram_weight=">=0", gram_start_step="int>=0", gram_refresh_every="int>=1",
                       gram_first_refresh_step="int>=0", gram_max_refreshes="int>=0", gram_teacher_scale=">0")
GRAM_ONLY_FLAGS = ("gram_refresh_every", "gram_first_refresh_step", "gram_max_refreshes", "gram_teacher_scale")


def add_gram_args(p: argparse.ArgumentParser) -> None:
    """The Gram anchoring flags, off unless ``--gram_weight > 0``."""
    g = p.add_argument_group("DINOv3 Gram anchoring (docs/dinov3.md; needs a dinov2_vit_* arch)")
    g.add_argument("--gram_weight", default=0.0, type=float,
                   help="weight of DINOv3's Gram anchoring loss from --gram_start_step on (0: off; DINOv3: 1 to 2)")
    g.add_argument("--gram_start_step", default=0, type=int,
                   help="the step whose forward first uses it: the Gram teacher is the EMA teacher's backbone then")
    g.add_argument("--gram_refresh_every", default=None, type=int,
                   help="copy the EMA teacher into the Gram teacher again every N steps (default: never; DINOv3: "
                        "10000)")
    g.add_argument("--gram_first_refresh_step", default=None, type=int,
                   help="no refresh before this step (DINOv3's it_first_update; default 0)")
    g.add_argument("--gram_max_refreshes", default=None, type=int,
                   help="at most N refreshes (DINOv3's max_updates: 3; default: no limit)")
    g.add_argument("--gram_teacher_scale", default=None, type=float,
                   help="the Gram teacher's crops are this many times --global_crop_size, undistorted; the "
                        "student's global crops are them downsampled (default 2, DINOv3's 512 / 256)")


def check_gram_flags(args: argparse.Namespace) -> None:
    """The Gram flags against the arch and the other flags (one line naming the flag and its value),
    then their defaults filled in (None until here, so a flag given with Gram anchoring off is named)."""
    given = next((name for name in GRAM_ONLY_FLAGS if getattr(args, name) is not None), None)
    if args.gram_weight == 0:
        if given is not None:
            raise UsageError(f"--{given} {getattr(args, given)}: a Gram anchoring option, and Gram anchoring is "
                             "off; pass --gram_weight > 0 (DINOv3: 1) to turn it on")
        return
    weight = f"--gram_weight {args.gram_weight}"
    if not args.arch.startswith(DINOV2_PREFIX):
        raise UsageError(f"{weight}: Gram anchoring needs a dinov2_vit_* arch (its patch tokens), not --arch "
                         f"{args.arch}")
    for flag, value in (("fused_head_loss", args.fused_head_loss), ("fsdp", getattr(args, "fsdp", False)),
                        ("distill_from", getattr(args, "distill_from", None))):
        if value:
            raise UsageError(f"--{flag} {value} with {weight}: Gram anchoring does not run with it; expected one or "
                             "the other")
    args.gram_teacher_scale = 2.0 if args.gram_teacher_scale is None else args.gram_teacher_scale
    args.gram_first_refresh_step = args.gram_first_refresh_step or 0
    size = round(args.gram_teacher_scale * args.global_crop_size)
    if size % args.patch_size:
        raise UsageError(f"--gram_teacher_scale {args.gram_teacher_scale}: the Gram teacher's crops would be {size} "
                         f"px, not a multiple of --patch_size {args.patch_size}; expected a scale giving whole patches")


def gram_config(args: argparse.Namespace) -> Optional[GramAnchor]:
    """The Gram anchoring part of DINO the flags ask for (None: --gram_weight 0)."""
    if args.gram_weight == 0:
        return None
    return GramAnchor(weight=args.gram_weight, start_step=args.gram_start_step, refresh_every=args.gram_refresh_every,
                      first_refresh_step=args.gram_first_refresh_step, max_refreshes=args.gram_max_refreshes,
                      teacher_scale=args.gram_teacher_scale)


def gram_teacher_scale(args: argparse.Namespace) -> Optional[float]:
    """The recipe's ``gram_teacher_scale``: the flag's with Gram anchoring on, else None (no Gram crops)."""
    return args.gram_teacher_scale if getattr(args, "gram_weight", 0) > 0 else None


def split_views(views: list[torch.Tensor], args: argparse.Namespace) -> tuple[list[torch.Tensor],
                                                                             Optional[list[torch.Tensor]]]:
    """A batch's views as ``(student's views, Gram teacher's crops or None)``: the augmenters append the
    2 Gram crops after the 2 + --local_crops_number views (:mod:`~dino_pytorch.augment.gram_crops`)."""
    count = 2 + args.local_crops_number
    return views[:count], (views[count:] or None)
