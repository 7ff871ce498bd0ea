"""The evaluation programs' own data: ``--train_data`` / ``--val_data`` checked, the labels they
need, and a file they cannot read, each as one line (exit 2)."""
from __future__ import annotations

import argparse
import os

from torch.utils.data import Dataset

from ._setup import UsageError


def check_own_data_flags(args: argparse.Namespace) -> None:
    """``--train_data`` and ``--val_data``: both or neither, existing paths, not with fashion_mnist."""
    given = [name for name in ("train_data", "val_data") if getattr(args, name)]
    if len(given) == 1:
        other = "val_data" if given[0] == "train_data" else "train_data"
        raise UsageError(f"--{given[0]} {getattr(args, given[0])!r} without --{other}: expected both")
    for name in given:
        if not os.path.exists(getattr(args, name)):
            raise UsageError(f"--{name} {getattr(args, name)!r}: no such folder or file list")
    if given and args.dataset == "fashion_mnist":
        raise UsageError(f"--train_data {args.train_data!r} with --dataset fashion_mnist: expected one or the other")


def require_labels(args: argparse.Namespace, train_set: Dataset, test_set: Dataset) -> None:
    """The k-NN and the linear probe need labels: unlabelled own data is a one-line user error."""
    from ..data import is_labelled

    for dataset, flag, folder in ((train_set, "train_data", "train"), (test_set, "val_data", "val")):
        if not is_labelled(dataset):
            given = getattr(args, flag)
            shown = f"--{flag} {given!r}" if given else f"--data_path {os.path.join(args.data_path, folder)!r}"
            raise UsageError(f"{shown} has no labels, and this evaluation needs labelled data: class subfolders "
                             "holding every image, or 'path<TAB>class' lines in a file list")


def unreadable_file(err: Exception) -> UsageError:
    """A file an evaluation cannot read (a DecodeError, raised in a DataLoader worker or not) as one line."""
    line = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return UsageError(f"cannot evaluate: {line.removeprefix('dino_pytorch.data.bands.DecodeError: ')}")
