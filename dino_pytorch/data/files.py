"""Any folder of images, or a list of files, as a dataset: :class:`ImageFiles`.

**Which files.** A folder is walked recursively (symlinks followed) for the extensions of
:data:`IMAGE_EXTENSIONS`, in any case; a file list holds one path a line (relative paths are
resolved against the list's folder; blank lines and lines starting with ``#`` are skipped). Either
way the files are sorted by their name (the path relative to the folder, or as the list writes it),
so the order, and with it every sample's index and seed, is the same on every machine and resume.
Nothing is decoded up front but the first readable file (:attr:`ImageFiles.channels`).

**Labels.** A folder is labelled when every image lies in a first-level subfolder: the subfolder is
the class (``root/cat/x.jpg``, ``root/cat/more/y.jpg``: class ``cat``); images directly in the root
leave the whole folder unlabelled (label -1). A file list is labelled when every line is
``path<TAB>class``; lines without a class leave it unlabelled; a mix is an error naming the line.
Class indices follow the sorted class names.

**What an item is.** Ordinary photos (``.jpg .jpeg .png .webp .bmp`` in an 8-bit PIL mode) are PIL
RGB images, as torchvision's ``ImageFolder`` gives them (grey, palette and CMYK images converted,
alpha dropped). Band files (``.npy``, ``.tif``, ``.tiff``) and 16-bit or float PNGs are float32
``(C, H, W)`` tensors in ``[0, 1]`` (:mod:`~dino_pytorch.data.bands` says how values are mapped).

**Undecodable files.** A file that fails to decode, has another channel count than the data, is
smaller than ``min_pixels`` or holds NaN is replaced by another sample, chosen from
``(index, attempt)`` alone (:func:`replacement_index`), so a resumed run draws exactly the same
replacement; with ``report_failures=True`` each item carries the names of the files it replaced,
for a training loop whose DataLoader workers are other processes to count them.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .bands import DecodeError, ValueRange, check_value_range, read_npy, read_tiff, to_unit_range

PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
BAND_EXTENSIONS = (".npy", ".tif", ".tiff")
IMAGE_EXTENSIONS = PHOTO_EXTENSIONS + BAND_EXTENSIONS
# PIL modes of more than 8 bits per pixel: read as one band, never squeezed into 8-bit RGB.
DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
MAX_ATTEMPTS = 100  # replacements tried for one index before the data are declared unreadable
PROBE_FILES = 50  # files tried in order to find the data's channel count

Decoded = Union[Image.Image, Tensor]


class ValueRangeNeeded(ValueError):
    """Float band data without a value range: a set-up error, never counted as a corrupt file."""


def replacement_index(index: int, attempt: int, size: int) -> int:
    """The sample that stands in for ``index`` at its ``attempt``-th failure (1, 2, ...): a hash of
    the two, so it depends on nothing else (no RNG, no worker, no history)."""
    digest = hashlib.blake2b(f"{index}/{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % size


def find_images(root: Union[str, Path]) -> list[str]:
    """The image files under ``root``, recursively, as sorted POSIX paths relative to ``root``."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        rel = os.path.relpath(folder, root)
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(rel, name).as_posix() if rel != "." else name)
    return sorted(found)


def read_file_list(path: Union[str, Path]) -> tuple[list[str], Optional[list[str]]]:
    """The paths of a file list as written (sorted) and their classes (None: unlabelled)."""
    entries = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, tab, label = line.partition("\t")
            entries.append((name.strip(), label.strip() if tab else None, number))
    if not entries:
        raise ValueError(f"file list {str(path)!r}: no paths in it (one image path a line)")
    entries.sort(key=lambda e: e[0])
    labelled = [label is not None for _, label, _ in entries]
    if any(labelled) and not all(labelled):
        odd, odd_label, number = next(e for e, has in zip(entries, labelled) if has != labelled[0])
        raise ValueError(f"file list {str(path)!r}, line {number} ({odd!r}): {'a' if odd_label else 'no'} class after "
                         "a tab, unlike other lines; expected every line 'path<TAB>class' or every line 'path'")
    return [name for name, _, _ in entries], ([label for _, label, _ in entries] if labelled[0] else None)  # type: ignore[misc]


def read_raw(path: str) -> Union[Image.Image, np.ndarray]:
    """One file as stored: an RGB PIL image (a photo) or a ``(C, H, W)`` array in its dtype (bands)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npy":
        return read_npy(path)
    if suffix in (".tif", ".tiff"):
        return read_tiff(path)
    with Image.open(path) as image:
        if image.mode in DEEP_MODES:
            return np.asarray(image)[None]
        return image.convert("RGB")  # decodes every pixel: a truncated file fails here


class ImageFiles(Dataset):
    """Images from a folder tree or a file list; items are ``(image, label)``, or with
    ``report_failures`` ``(image, label, replaced)`` where ``replaced`` is ``""`` or the
    ``"name<TAB>reason"`` lines of the files this item stands in for.

    Args:
        paths: the files (absolute, or relative to ``root``), in dataset order.
        names: how each file is named in reports (default: ``paths``).
        labels: class index per file, or None (every label is -1).
        classes: class names, index order.
        transform: applied to the decoded image (PIL image or float tensor).
        value_range: for band files, one ``(low, high)`` or one per band (:mod:`~dino_pytorch.data.bands`);
            None: integer dtypes by their range, float data refused until one is given.
        channels: the data's channel count; None reads it off the first readable file.
        min_pixels: files of fewer pixels (``H * W``) count as undecodable (an augmenter's minimum).
        report_failures: add the third item entry.
        replace_failures: False: an undecodable file raises a :class:`DecodeError` naming it (evaluation,
            where a stand-in would change the numbers unseen).
    """

    def __init__(self, paths: Sequence[str], *, names: Optional[Sequence[str]] = None,
                 labels: Optional[Sequence[int]] = None, classes: Sequence[str] = (),
                 transform: Optional[Callable[[Decoded], Any]] = None, value_range: Any = None,
                 channels: Optional[int] = None, min_pixels: int = 1, report_failures: bool = False,
                 replace_failures: bool = True) -> None:
        if not paths:
            raise ValueError("paths: no image files (extensions " + " ".join(IMAGE_EXTENSIONS) + ")")
        self.paths, self.names = list(paths), list(names if names is not None else paths)
        self.labels = list(labels) if labels is not None else None
        self.classes = list(classes)
        self.transform, self.min_pixels, self.report_failures = transform, min_pixels, report_failures
        self.replace_failures = replace_failures
        self.value_range: Optional[ValueRange] = None
        self.photos, self.float_bands = True, False
        self.channels = channels if channels is not None else self._probe()
        self.value_range = None if value_range is None else check_value_range(value_range, self.channels)

    @classmethod
    def from_folder(cls, root: Union[str, Path], **kwargs: Any) -> ImageFiles:
        """Every image under ``root`` (recursively), labelled by first-level subfolder when all lie in one."""
        if not os.path.isdir(root):
            raise ValueError(f"root={str(root)!r}: not a directory")
        names = find_images(root)
        if not names:
            raise ValueError(f"root={str(root)!r}: no image files under it (extensions {' '.join(IMAGE_EXTENSIONS)})")
        labels: Optional[list[int]] = None
        classes: list[str] = []
        if all("/" in name for name in names):
            folders = [name.split("/")[0] for name in names]
            classes = sorted(set(folders))
            labels = [classes.index(f) for f in folders]
        return cls([os.path.join(root, n) for n in names], names=names, labels=labels, classes=classes, **kwargs)

    @classmethod
    def from_file_list(cls, path: Union[str, Path], **kwargs: Any) -> ImageFiles:
        """The files a list names (one a line, ``path`` or ``path<TAB>class``)."""
        names, label_names = read_file_list(path)
        base = os.path.dirname(os.path.abspath(path))
        paths = [n if os.path.isabs(n) else os.path.join(base, n) for n in names]
        classes = sorted(set(label_names)) if label_names is not None else []
        labels = [classes.index(c) for c in label_names] if label_names is not None else None
        return cls(paths, names=names, labels=labels, classes=classes, **kwargs)

    @classmethod
    def open(cls, path: Union[str, Path], **kwargs: Any) -> ImageFiles:
        """A folder (:meth:`from_folder`) or a file list (:meth:`from_file_list`)."""
        return cls.from_folder(path, **kwargs) if os.path.isdir(path) else cls.from_file_list(path, **kwargs)

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def __len__(self) -> int:
        return len(self.paths)

    def _probe(self) -> int:
        """The channel count of the first readable file (3 for photos); notes photos vs float bands."""
        for index in range(min(PROBE_FILES, len(self))):
            try:
                raw = read_raw(self.paths[index])
            except ImportError:
                raise
            except Exception:  # noqa: BLE001 - a bad first file only moves the probe on
                continue
            self.photos = isinstance(raw, Image.Image)
            self.float_bands = not self.photos and raw.dtype.kind == "f"  # type: ignore[union-attr]
            return 3 if self.photos else int(raw.shape[0])  # type: ignore[union-attr]
        raise ValueError(f"none of the first {min(PROBE_FILES, len(self))} files decodes (first: {self.names[0]!r}); "
                         "are these images?")

    def with_value_range(self, value_range: Any) -> ImageFiles:
        """A copy of this dataset (same files and order) mapping band values with ``value_range``."""
        return self.copy(value_range=None if value_range is None else check_value_range(value_range, self.channels))

    def copy(self, **attributes: Any) -> ImageFiles:
        """A shallow copy with ``attributes`` replaced (``transform``, ``min_pixels``, ...): the same
        files in the same order, no folder walked again."""
        unknown = set(attributes) - set(self.__dict__)
        if unknown:
            raise TypeError(f"copy({', '.join(sorted(unknown))}=...): not attributes of ImageFiles")
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.__dict__.update(attributes)
        return copy

    def decode(self, index: int) -> Decoded:
        """File ``index`` as an item's image (no replacement: a bad file raises)."""
        raw = read_raw(self.paths[index])
        name = self.names[index]
        if isinstance(raw, Image.Image):
            channels, pixels = 3, raw.width * raw.height
        else:
            channels, pixels = raw.shape[0], raw.shape[1] * raw.shape[2]
        if channels != self.channels:
            raise DecodeError(f"{channels} channels, the data have {self.channels}")
        if pixels < self.min_pixels:
            raise DecodeError(f"{pixels} pixels, fewer than the {self.min_pixels} the augmentation needs")
        if isinstance(raw, Image.Image):
            return raw
        if raw.dtype.kind == "f" and self.value_range is None:
            if not self.float_bands:  # one float file among integer ones: that file is the odd one out
                raise DecodeError(f"float values ({raw.dtype}) among integer band files, and no value_range")
            raise ValueRangeNeeded(f"{name}: float band data ({raw.dtype}) need a value_range (low, high) to map "
                                   "them to [0, 1]; dino_pytorch.data.sample_statistics measures one, or pass it")
        return to_unit_range(raw, self.value_range, name)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        current, replaced = int(index), []
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                image = self.decode(current)
                break
            except (ImportError, ValueRangeNeeded):
                raise
            except Exception as err:  # noqa: BLE001 - whatever a decoder raises on a bad file, never a crash mid-run
                reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
                if not self.replace_failures:
                    raise DecodeError(f"{self.names[current]}: cannot read it ({reason})") from None
                replaced.append(f"{self.names[current]}\t{reason}")
                current = replacement_index(int(index), attempt, len(self))
        else:
            raise RuntimeError(f"{MAX_ATTEMPTS} files in a row failed to decode, standing in for {self.names[index]!r}"
                               f" (first: {replaced[0]}); the data look unreadable")
        label = self.labels[current] if self.labels is not None else -1
        if self.transform is not None:
            image = self.transform(image)
        return (image, label, "\n".join(replaced)) if self.report_failures else (image, label)
