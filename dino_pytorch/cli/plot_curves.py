"""dino-plot-curves: draw a run's training curves (loss, k-NN) from its metrics.jsonl or log.txt.

    dino-plot-curves runs/demo/metrics.jsonl runs/demo/curves.png
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Optional

from ._setup import UsageError, add_debug_flag, run_program


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = argparse.ArgumentParser("dino-plot-curves", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", help="metrics.jsonl or the official log.txt (one JSON object per line)")
    parser.add_argument("out_png", help="the picture to write")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if not os.path.isfile(args.log):
        raise UsageError(f"log {args.log!r}: {'is a directory' if os.path.isdir(args.log) else 'no such file'}, "
                         "expected metrics.jsonl or log.txt")
    if os.path.isdir(args.out_png):
        raise UsageError(f"out_png {args.out_png!r} is a directory, expected a file name (e.g. curves.png)")
    try:
        from ..curves import plot_curves

        print(f"wrote {plot_curves(args.log, args.out_png)}")
    except ImportError as err:
        raise UsageError(f"curves need matplotlib ({err}): pip install 'dino-pytorch[train]'") from None
    except ValueError as err:
        raise UsageError(f"{args.log}: {err}") from None
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_program("dino-plot-curves", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
