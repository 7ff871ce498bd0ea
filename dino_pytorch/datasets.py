"""Datasets: Fashion-MNIST read straight from the Debian package's idx files, and the per-sample
seeding of augmentations. Any folder of images or file list: :mod:`dino_pytorch.data`."""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Mean/std of the 60k training images in [0, 1].
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

_INSTALL_HINT = (
    "install the Debian package with `sudo apt-get install -y dataset-fashion-mnist` "
    "(it puts the idx files in /usr/share/datasets/fashion-mnist), or pass root= / set "
    "FASHION_MNIST_DIR to a folder holding {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]"
)


def _open(path: Path) -> bytes:
    for candidate in (path, path.with_suffix(path.suffix + ".gz")):
        if candidate.exists():
            opener = gzip.open if candidate.suffix == ".gz" else open
            with opener(candidate, "rb") as f:
                return f.read()
    raise FileNotFoundError(f"Fashion-MNIST file {path}[.gz] not found: {_INSTALL_HINT}")


def read_idx(path: Union[str, Path]) -> np.ndarray:
    """An idx file (optionally gzipped) as a uint8 array: images (N, 28, 28) or labels (N,)."""
    data = _open(Path(path))
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise ValueError(f"{path}: not a uint8 idx file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    array = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if array.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated idx file ({array.size} values, header says {dims})")
    return array.reshape(dims)


def load_fashion_mnist(train: bool = True, root: Optional[Union[str, Path]] = None) -> tuple[Tensor, Tensor]:
    """All images as a uint8 (N, 1, 28, 28) tensor and labels as int64 (N,)."""
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    split = "train" if train else "t10k"
    images = read_idx(root / f"{split}-images-idx3-ubyte")
    labels = read_idx(root / f"{split}-labels-idx1-ubyte")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


class FashionMNIST(Dataset):
    """Fashion-MNIST from idx files; items are ``(transform(image), label)``.

    ``image`` is a uint8 (1, 28, 28) tensor, which :class:`~dino_pytorch.MultiCropTransform` and
    torchvision v2 transforms accept directly.
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(
        self, train: bool = True, transform: Optional[Callable] = None, root: Optional[Union[str, Path]] = None
    ) -> None:
        self.images, self.labels = load_fashion_mnist(train, root)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.images[index]
        return (self.transform(image) if self.transform is not None else image), int(self.labels[index])


def sample_seed(seed: int, key: int) -> int:
    """The augmentation seed of the sample with global index ``key`` (``epoch * N + index``, what
    :class:`~dino_pytorch.sampler.ResumableSampler` yields) in a run seeded with ``seed``.

    One function for both augmenters: :class:`SeededTransform` seeds torch's RNG with it around the
    per-image transform, and the training program passes it per image to
    :class:`~dino_pytorch.augment.BatchedMultiCrop` (``seeds=``). A large odd multiplier spreads the
    run seeds over the seed space.
    """
    return (int(seed) * 1_000_003 + int(key)) % (2**63 - 1)


def sample_seeds(seed: int, keys: Tensor) -> Tensor:
    """:func:`sample_seed` of every key of a ``(B,)`` integer tensor, as a ``(B,)`` int64 CPU tensor."""
    return torch.tensor([sample_seed(seed, k) for k in keys.tolist()], dtype=torch.int64)


class SeededTransform(Dataset):
    """Applies ``transform`` with torch's RNG seeded from (seed, epoch, index) for each sample.

    Fed by :class:`~dino_pytorch.sampler.ResumableSampler` (which yields ``key = epoch * N + index``),
    every sample's augmentation is a pure function of the run seed, the epoch and the index
    (:func:`sample_seed`): the same on any rank layout, worker count or after a resume.

    Items are ``(transform(image), label)``, or ``(transform(image), label, key)`` with
    ``return_key=True``: the key lets the training loop seed an on-device batched augmenter per
    sample too. Entries of the dataset's items after the label (an
    :class:`~dino_pytorch.data.ImageFiles`' replaced files) follow unchanged.  ``transform=None``
    passes images through untouched (no seeding needed).
    """

    def __init__(self, dataset: Dataset, transform: Optional[Callable], seed: int = 0, *,
                 return_key: bool = False) -> None:
        self.dataset, self.transform, self.seed, self.return_key = dataset, transform, seed, return_key

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int) -> tuple[Any, ...]:
        image, label, *extra = self.dataset[int(key) % len(self)]
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, key))
                image = self.transform(image)
        return (image, label, int(key), *extra) if self.return_key else (image, label, *extra)
