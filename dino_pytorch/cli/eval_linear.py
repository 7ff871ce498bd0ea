"""dino-eval-linear: a linear probe on a frozen backbone (the official DINO recipe).

    dino-eval-linear --pretrained_weights runs/fm/checkpoint.pth --epochs 10
    dino-eval-linear --pretrained_weights runs/own/checkpoint.pth --train_data train.txt --val_data val.txt

Own data is read with the checkpoint's statistics and band value range; it needs labels.
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any, Optional

from ..data import DecodeError
from ..eval.linear import num_labels, train_linear_probe
from ._setup import (
    UsageError,
    add_eval_args,
    bool_flag,
    check_flags,
    eval_setup,
    make_loader,
    output_dir,
    run_program,
)
from .eval_data import check_own_data_flags, require_labels, unreadable_file


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "dino-eval-linear", description="Linear probe on a frozen backbone (official DINO recipe)."
    )
    add_eval_args(parser)
    parser.add_argument("--n_last_blocks", type=int, default=4,
                        help="concatenate the CLS tokens of the last n blocks (official: 4 for ViT-S, 1 for ViT-B)")
    parser.add_argument("--avgpool_patchtokens", type=bool_flag, default=False,
                        help="append the average of the last block's patch tokens "
                        "(official: False for ViT-S, True for ViT-B)")
    parser.add_argument("--official_interleave", type=bool_flag, default=False,
                        help="interleave CLS and average as the official script (n_last_blocks=1 only)")
    parser.add_argument("--epochs", type=int, default=100, help="training epochs")
    parser.add_argument("--lr", type=float, default=0.001, help="base learning rate, scaled by total batch / 256")
    parser.add_argument("--num_labels", type=int, default=None, help="number of classes (default: from the dataset)")
    parser.add_argument("--val_freq", type=int, default=1, help="epochs between evaluations")
    parser.add_argument("--output_dir", default=".", help="where checkpoint.pth.tar and log.txt go")
    parser.add_argument("--precompute_features", type=bool_flag, nargs="?", const=True, default=False,
                        help="extract features once without augmentation and train on the cache (fast, not official)")
    return parser


def evaluate(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """The program from Python: returns the probe's results (see :func:`train_linear_probe`).

    User errors exit 2 with one line.
    """
    return run_program("dino-eval-linear", _main, argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``dino-eval-linear`` (console script): exit status 0, or 2 with one line for a user error."""
    evaluate(argv)
    return 0


def _main(argv: Optional[Sequence[str]]) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    check_flags(args, n_last_blocks="int>=1", epochs="int>=1", lr=">0", num_labels="int>=1", val_freq="int>=1",
                output_dir="outdir")
    check_own_data_flags(args)
    model, train_set, val_set, device = eval_setup(args, train_augment=not args.precompute_features)
    require_labels(args, train_set, val_set)
    for flag in ("avgpool_patchtokens", "official_interleave"):
        if getattr(args, flag) and not hasattr(model, "get_intermediate_layers"):
            raise UsageError(f"--{flag} true needs a ViT (the model, {type(model).__name__}, has no patch tokens); "
                             f"expected --{flag} false")
    out = output_dir(args.output_dir)
    log_path = out / "log.txt"

    def log(stats: dict[str, Any]) -> None:
        print(json.dumps(stats))
        with open(log_path, "a") as f:
            f.write(json.dumps(stats) + "\n")

    def loader(dataset: Any, shuffle: bool = False) -> Any:
        return make_loader(dataset, args.batch_size_per_gpu, args.num_workers, device, shuffle=shuffle)

    try:
        result = train_linear_probe(
            model, loader(train_set, shuffle=not args.precompute_features), loader(val_set),
            args.num_labels or num_labels(train_set), epochs=args.epochs, lr=args.lr,
            n_last_blocks=args.n_last_blocks, avgpool_patchtokens=args.avgpool_patchtokens,
            official_interleave=args.official_interleave, device=device, val_freq=args.val_freq,
            precompute_features=args.precompute_features, checkpoint_path=os.path.join(out, "checkpoint.pth.tar"),
            log=log,
        )
    except DecodeError as err:
        raise unreadable_file(err) from None
    print(f"Training of the supervised linear classifier on frozen features completed.\n"
          f"Top-1 test accuracy: {result['best_top1']:.1f} (best), {result['final_top1']:.1f} (final)")
    return result


if __name__ == "__main__":
    raise SystemExit(main())
