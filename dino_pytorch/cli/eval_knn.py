"""dino-eval-knn: weighted k-NN evaluation of a frozen backbone (the official DINO protocol).

    dino-eval-knn --pretrained_weights runs/demo/checkpoint.pth     # network and data from the file
    dino-eval-knn --arch vit_small --patch_size 16 --pretrained_weights dino_deitsmall16_pretrain.pth \
        --data_path /data/imagenet
    dino-eval-knn --pretrained_weights runs/own/checkpoint.pth --train_data bank/ --val_data queries.txt

Own data (folders or file lists, labelled by class subfolders or 'path<TAB>class' lines) is read with
the checkpoint's statistics and band value range; unlabelled data is a one-line error.
"""
from __future__ import annotations

import argparse
import pickle
from collections.abc import Sequence
from typing import Optional

from ..checkpoint import refused_global
from ..data import DecodeError
from ..eval.knn import extract_features, knn_eval, load_features, save_features
from ._setup import (
    UsageError,
    add_eval_args,
    check_flags,
    eval_setup,
    make_loader,
    resolve_device,
    run_program,
    setup_phase,
)
from .eval_data import check_own_data_flags, require_labels, unreadable_file


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "dino-eval-knn", description="Weighted k-NN evaluation of a frozen backbone (official DINO protocol)."
    )
    add_eval_args(parser)
    parser.add_argument("--nb_knn", type=int, nargs="+", default=[10, 20, 100, 200],
                        help="numbers of nearest neighbours (20 is usually the best)")
    parser.add_argument("--temperature", type=float, default=0.07, help="temperature of the vote weights")
    parser.add_argument("--dump_features", default=None, help="folder to save the extracted features to")
    parser.add_argument("--load_features", default=None,
                        help="folder with trainfeat.pth, testfeat.pth, trainlabels.pth, testlabels.pth; "
                             "skips the model and the data")
    parser.add_argument("--chunk_size", type=int, default=None,
                        help="test rows per similarity matrix (default: what fits in 256 MiB)")
    return parser


def evaluate(argv: Optional[Sequence[str]] = None) -> dict[int, tuple[float, float]]:
    """The program from Python: returns ``{k: (top1, top5)}``; user errors exit 2 with one line."""
    return run_program("dino-eval-knn", _main, argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``dino-eval-knn`` (console script): exit status 0, or 2 with one line for a user error."""
    evaluate(argv)
    return 0


def _main(argv: Optional[Sequence[str]]) -> dict[int, tuple[float, float]]:
    args = build_parser().parse_args(argv)
    check_flags(args, nb_knn="int>=1", temperature=">0", chunk_size="int>=1", load_features="dir",
                dump_features="outdir")
    if args.load_features:
        device = resolve_device(args.device)
        try:
            with setup_phase():
                (train_f, train_l), (test_f, test_l) = load_features(args.load_features)
        except pickle.UnpicklingError as err:
            name = refused_global(err) or "an object that is not a tensor"
            raise UsageError(f"--load_features {args.load_features!r}: a feature file refers to {name}, which safe "
                             "loading refuses: unpickling it can run code") from None
    else:
        check_own_data_flags(args)
        model, train_set, test_set, device = eval_setup(args, train_augment=False)
        require_labels(args, train_set, test_set)
        print(f"Extracting features of {len(train_set)} train and {len(test_set)} test images.")  # type: ignore[arg-type]
        loader = lambda d: make_loader(d, args.batch_size_per_gpu, args.num_workers, device)  # noqa: E731
        try:
            train_f, train_l = extract_features(model, loader(train_set), device)
            test_f, test_l = extract_features(model, loader(test_set), device)
        except DecodeError as err:
            raise unreadable_file(err) from None
        if args.dump_features:
            save_features(args.dump_features, (train_f, train_l), (test_f, test_l))
    train_f, train_l = train_f.to(device), train_l.to(device)
    results = knn_eval(train_f, train_l, test_f, test_l, args.nb_knn, args.temperature, chunk_size=args.chunk_size)
    for k, (top1, top5) in results.items():
        print(f"{k}-NN classifier result: Top1: {top1}, Top5: {top5}")
    return results


if __name__ == "__main__":
    raise SystemExit(main())
