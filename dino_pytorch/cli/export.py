"""dino-export: a sharded checkpoint folder (dino-train --fsdp) as the official single file.

    dino-export runs/vitl/checkpoint runs/vitl/checkpoint.pth
    dino-eval-knn --pretrained_weights runs/vitl/checkpoint.pth --data_path /data/imagenet

One process, no GPU and no process group, whatever world size wrote the folder: the teacher, the
student, the centre, the optimizer state and the run's configuration (``model_config``, ``args``,
``step``) in the official ``main_dino.py`` layout (dino_pytorch.export.export_official).
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Optional

from ._setup import UsageError, add_debug_flag, run_program


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = argparse.ArgumentParser("dino-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_dir",
                        help="the sharded checkpoint folder (dino-train --fsdp: output_dir/checkpoint)")
    parser.add_argument("out", help="the .pth file to write (replaced atomically if it exists)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if not os.path.isdir(args.checkpoint_dir):
        what = "is a file" if os.path.exists(args.checkpoint_dir) else "no such directory"
        raise UsageError(f"checkpoint_dir {args.checkpoint_dir!r}: {what}, expected the folder of a sharded "
                         "checkpoint (dino-train --fsdp writes output_dir/checkpoint)")
    if os.path.isdir(args.out):
        raise UsageError(f"out {args.out!r} is a directory, expected a file name (e.g. checkpoint.pth)")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent):
        raise UsageError(f"out {args.out!r}: the directory {parent!r} does not exist")
    from ..export import export_official

    print(f"wrote {export_official(args.checkpoint_dir, args.out)}", flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``dino-export``; returns the exit status: 0 written, 2 a user error (one line)."""
    return run_program("dino-export", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
