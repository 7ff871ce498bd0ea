"""dino-train's ``--distill_from``: the frozen teacher a run distils from (DINOv3's distillation)."""
from __future__ import annotations

import argparse
from typing import Optional

from ..distill import FrozenTeacher, teacher_from_checkpoint
from ..safe_load import CheckpointError
from ._setup import UsageError, check_flags


def distill_teacher_from_flags(args: argparse.Namespace, announce: bool) -> Optional[FrozenTeacher]:
    """The teacher network of the ``--distill_from`` checkpoint, frozen; ``--out_dim`` and
    ``--ibot_out_dim`` default to its prototype counts (given, they must equal them). None without
    the flag. Every problem is a one-line error naming the flag and the value."""
    path = args.distill_from
    if path is None:
        args.out_dim = 65536 if args.out_dim is None else args.out_dim
        return None
    check_flags(args, distill_from="file")
    if args.fsdp:
        raise UsageError(f"--distill_from {path} with --fsdp: the frozen teacher is not sharded; expected "
                         "DDP (torchrun without --fsdp) for distillation")
    try:
        teacher = teacher_from_checkpoint(path)
    except (CheckpointError, ValueError, TypeError) as err:
        raise UsageError(f"--distill_from {path}: {err}") from None
    wanted = {"out_dim": teacher.out_dim}
    if args.ibot_weight > 0:
        if teacher.patch_out_dim is None:
            raise UsageError(f"--ibot_weight {args.ibot_weight} with --distill_from {path}: that teacher was "
                             "trained without iBOT and gives no patch targets; expected --ibot_weight 0")
        wanted["ibot_out_dim"] = teacher.patch_out_dim
    for flag, value in wanted.items():
        given = getattr(args, flag)
        if given is not None and given != value:
            raise UsageError(f"--{flag} {given} with --distill_from {path}: the student's head must match the "
                             f"teacher's {value} prototypes; drop --{flag} or pass {value}")
        setattr(args, flag, value)
    if announce:
        print(f"Distilling from the frozen teacher of {path} ({teacher.out_dim} prototypes"
              + (f", patch head {teacher.patch_out_dim}" if teacher.patch_out_dim else "") + ").", flush=True)
    return teacher
