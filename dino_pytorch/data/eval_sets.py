"""Own data on the evaluation side: the official evaluation transform for any channel count, and the
(train, val) pair of sets the k-NN and the linear probe read.

**Transform** (:class:`EvalTransform`), the official one scaled to the crop size: resize the short
side to ``round(size * 256 / 224)`` (bicubic), centre-crop ``size`` (224 gives the official 256 /
224), values in ``[0, 1]``, normalise; with ``train_augment`` the linear probe's RandomResizedCrop
and horizontal flip instead. PIL photos take torchvision's PIL path (the official numerics); band
tensors the same steps on the tensor (antialiased bicubic, clamped back into ``[0, 1]``).

**Sets** (:func:`own_eval_sets`): ``val`` given, the two folders or file lists; else ``path/train``
and ``path/val`` when both exist; else the files of ``path`` split by position, every
:data:`VAL_EVERY`-th file (0, 10, 20, ...) a query and the rest the bank. Files that fail to decode
raise a :class:`~dino_pytorch.data.bands.DecodeError` naming them: a stand-in would change the
numbers unseen.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision import transforms as T

from .files import ImageFiles
from .statistics import band_range, sample_indices, sample_statistics

VAL_EVERY = 10
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the augmenters' defaults, repeated to keep data/ below augment/
IMAGENET_STD = (0.229, 0.224, 0.225)


class EvalTransform:
    """The evaluation view of one image: a float32 ``(len(mean), size, size)`` tensor, normalised.

    Args:
        size: the crop side (the training's global crop size).
        mean: per channel; its length is the output channel count (a photo becomes grey for 1).
        std: per channel, as ``mean``.
        train_augment: the linear probe's RandomResizedCrop(size) + flip instead of resize + centre crop.
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], *, train_augment: bool = False) -> None:
        self.size, self.mean, self.std, self.train_augment = size, tuple(mean), tuple(std), train_augment
        self.channels = len(self.mean)
        resize = round(size * 256 / 224)
        bicubic = T.InterpolationMode.BICUBIC
        geometry: list[Any] = ([T.RandomResizedCrop(size), T.RandomHorizontalFlip()] if train_augment
                               else [T.Resize(resize, interpolation=bicubic), T.CenterCrop(size)])
        self.geometry = T.Compose(geometry)
        self.normalize = T.Normalize(self.mean, self.std)

    def __call__(self, image: Union[Image.Image, Tensor]) -> Tensor:
        if isinstance(image, Image.Image):
            image = self.geometry(image.convert("L" if self.channels == 1 else "RGB"))
            return self.normalize(T.functional.to_tensor(image))
        if image.shape[0] == 1 and self.channels == 3:
            image = image.expand(3, -1, -1)
        if image.shape[0] != self.channels:
            raise ValueError(f"an image of {image.shape[0]} channels; the evaluation takes {self.channels}")
        view = self.geometry(image).clamp(0.0, 1.0)  # bicubic overshoots; the data live in [0, 1]
        return self.normalize(view.contiguous())

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, mean={self.mean}, std={self.std}, train_augment={self.train_augment})"


def has_split_folders(path: Optional[str]) -> bool:
    """Whether ``path`` is a folder holding ``train/`` and ``val/`` (the official layout)."""
    return bool(path) and all(os.path.isdir(os.path.join(path, s)) for s in ("train", "val"))  # type: ignore[arg-type]


def is_labelled(dataset: Dataset) -> bool:
    """Whether ``dataset`` (through Subset wrappers) has labels: an unlabelled :class:`ImageFiles` has none."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return not isinstance(dataset, ImageFiles) or dataset.labelled


def eval_statistics(files: ImageFiles, channels: int, stats: Optional[Mapping[str, Any]] = None,
                    seed: int = 0) -> dict[str, Any]:
    """The mean, std and value range to evaluate ``files`` with: those of ``stats`` (a checkpoint's
    ``model_config["data"]``) where they fit ``channels``; else ImageNet's for RGB photos; else measured
    on the files' statistics sample (:func:`~dino_pytorch.data.sample_statistics`)."""
    stats = stats or {}
    value_range = stats.get("value_range")
    if value_range is None and files.float_bands:
        value_range = band_range(files, sample_indices(len(files), seed=seed))[0]
    mean, std = stats.get("mean"), stats.get("std")
    if mean is None or std is None or len(mean) != channels or len(std) != channels:
        if files.photos and channels == 3:
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        else:
            measured = sample_statistics(files.with_value_range(value_range), seed=seed, channels=channels)
            mean, std = measured.mean, measured.std
    return {"mean": tuple(mean), "std": tuple(std), "value_range": value_range}


def own_eval_sets(path: str, val_path: Optional[str] = None, *, channels: int, image_size: int,
                  stats: Optional[Mapping[str, Any]] = None, train_augment: bool = False) -> tuple[Dataset, Dataset]:
    """(train, val) of own data for the k-NN or the linear probe (see the module docstring).

    Args:
        path: a folder or a file list (or a folder with ``train/`` and ``val/``).
        val_path: the val folder or file list (None: ``path/val``, or a split of ``path``).
        channels: the model's input channels (photos: 1 or 3; band files: theirs).
        image_size: the crop size.
        stats: the training's ``mean``, ``std`` and ``value_range`` (:func:`eval_statistics`).
        train_augment: the linear probe's augmentation on the train set.
    Raises:
        ValueError: no images, channels that do not match, a val class the train set lacks.
    """
    if val_path is None and has_split_folders(path):
        path, val_path = os.path.join(path, "train"), os.path.join(path, "val")
    files = ImageFiles.open(path, replace_failures=False)
    _check_channels(files, channels, path)
    used = eval_statistics(files, channels, stats)
    files = files.with_value_range(used["value_range"])
    val_tf = EvalTransform(image_size, used["mean"], used["std"])
    train_tf = EvalTransform(image_size, used["mean"], used["std"], train_augment=True) if train_augment else val_tf
    if val_path is None:
        queries = range(0, len(files), VAL_EVERY)
        bank = [i for i in range(len(files)) if i % VAL_EVERY]
        return Subset(files.copy(transform=train_tf), bank), Subset(files.copy(transform=val_tf), queries)
    val = ImageFiles.open(val_path, replace_failures=False, value_range=used["value_range"], transform=val_tf)
    _check_channels(val, channels, val_path)
    if val.labels is not None and files.labels is not None and val.classes != files.classes:
        missing = sorted(set(val.classes) - set(files.classes))
        if missing:
            raise ValueError(f"{val_path!r}: class {missing[0]!r} is not among the train classes of {path!r}")
        val = val.copy(labels=[files.classes.index(val.classes[y]) for y in val.labels], classes=files.classes)
    return files.copy(transform=train_tf), val


def _check_channels(files: ImageFiles, channels: int, path: str) -> None:
    found = files.channels
    if found != channels and not (files.photos and channels in (1, 3)) and not (found == 1 and channels == 3):
        raise ValueError(f"{path!r}: images of {found} channels, and the model takes {channels}")

