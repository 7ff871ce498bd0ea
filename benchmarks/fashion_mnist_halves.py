"""Fashion-MNIST split by class into two halves, written as idx files that every program reads.

Issue 20's experiment trains on classes 0-4, continues on classes 5-9 and measures the k-NN within
each half. Each half is a folder with the four idx files of the original layout (train and test,
images and labels, only that half's classes, original order kept), so ``FASHION_MNIST_DIR=<folder>``
points ``dino-train --dataset fashion_mnist`` and ``dino-eval-knn`` at one half with no new flag.

    python benchmarks/fashion_mnist_halves.py runs/fashion_mnist_halves/data
"""
from __future__ import annotations

import gzip
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout, not installed
from dino_pytorch.datasets import FASHION_MNIST_DIR, read_idx  # noqa: E402

HALVES = {"classes_0-4": range(0, 5), "classes_5-9": range(5, 10)}


def write_idx(path: str, array: np.ndarray) -> None:
    """A uint8 idx file (gzipped), the header as the original: magic 0x08 << 8 | ndim, then the dims."""
    header = (0x08 << 8 | array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def main(out: str) -> None:
    for name, classes in HALVES.items():
        folder = os.path.join(out, name)
        os.makedirs(folder, exist_ok=True)
        for split in ("train", "t10k"):
            images = read_idx(FASHION_MNIST_DIR / f"{split}-images-idx3-ubyte")
            labels = read_idx(FASHION_MNIST_DIR / f"{split}-labels-idx1-ubyte")
            keep = np.isin(labels, list(classes))
            write_idx(os.path.join(folder, f"{split}-images-idx3-ubyte.gz"), images[keep])
            write_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte.gz"), labels[keep])
            print(f"{folder}: {split} {int(keep.sum())} images of classes {list(classes)}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/fashion_mnist_halves/data")
