"""Per-channel statistics of a dataset from a sample of it: what ``--mean auto --std auto`` uses.

**The sample.** :data:`STATISTICS_SAMPLE` (1,000) images, or all of a smaller dataset: the first
1,000 of a permutation of the indices drawn by a ``torch.Generator`` seeded with ``seed``, then
sorted, so the same data and seed give the same sample on any machine.

**What is measured**, on each sampled image as the normaliser sees it, values in ``[0, 1]`` and
converted to ``channels`` (a photo to grey for 1 channel, a grey image repeated for 3):

* ``mean`` and ``std`` per channel over every pixel of every sampled image (a large image weighs
  more than a small one), the population standard deviation (divide by the pixel count), accumulated
  in float64 image by image (Chan et al.'s pairwise update, no sum-of-squares cancellation);
* for float band files without a ``value_range`` (:mod:`~dino_pytorch.data.bands`), first each band's
  minimum and maximum over the sample, which becomes the value range the statistics are then
  measured through (a band constant over the sample gets ``(value, value + 1)``: it maps to 0).

Files of the sample that fail to decode are skipped and named in :attr:`DataStatistics.skipped`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from .bands import ValueRange
from .files import ImageFiles, ValueRangeNeeded, read_raw

STATISTICS_SAMPLE = 1000


@dataclass(frozen=True)
class DataStatistics:
    """What :func:`sample_statistics` measured.

    Attributes:
        mean, std: per channel, of values in ``[0, 1]`` (what the normaliser sees).
        value_range: the band value range measured for float band data, else None.
        images: how many images the statistics cover.
        skipped: names of sampled files that failed to decode.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    value_range: Optional[ValueRange]
    images: int
    skipped: tuple[str, ...] = ()


def sample_indices(size: int, sample: int = STATISTICS_SAMPLE, seed: int = 0) -> list[int]:
    """The sorted indices of the statistics sample of a dataset of ``size`` items."""
    if sample >= size:
        return list(range(size))
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:sample].tolist())


def unit_values(image: Any, channels: int) -> Tensor:
    """One image as the normaliser sees it: a float64 ``(channels, H * W)`` tensor in ``[0, 1]``.

    Accepts a PIL image, a uint8 ``(C, H, W)`` tensor (Fashion-MNIST's) or a float ``(C, H, W)``
    tensor already in ``[0, 1]`` (band files); 1 <-> 3 channels converted as the augmenters do.
    """
    if isinstance(image, Image.Image):
        image = TF.pil_to_tensor(image.convert("L" if channels == 1 else "RGB"))
    if image.dtype == torch.uint8:
        if image.shape[0] == 3 and channels == 1:
            from ..augment.functional import to_grey_image

            image = to_grey_image(image, channels=1)
        values = image.to(torch.float64) / 255.0
    else:
        values = image.to(torch.float64)
    if values.shape[0] == 1 and channels == 3:
        values = values.expand(3, -1, -1)
    if values.shape[0] != channels:
        raise ValueError(f"image with {values.shape[0]} channels, expected {channels}")
    return values.reshape(channels, -1)


class _Moments:
    """Per-channel count, mean and sum of squared deviations, merged image by image (float64)."""

    def __init__(self, channels: int) -> None:
        self.count = 0
        self.mean = torch.zeros(channels, dtype=torch.float64)
        self.m2 = torch.zeros(channels, dtype=torch.float64)

    def add(self, values: Tensor) -> None:
        n = values.shape[1]
        mean = values.mean(dim=1)
        m2 = (values - mean[:, None]).square().sum(dim=1)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total


def band_range(files: ImageFiles, indices: Sequence[int]) -> tuple[ValueRange, list[str]]:
    """Each band's (min, max) over the band files of ``indices`` (float64), and the files skipped."""
    low = np.full(files.channels, np.inf)
    high = np.full(files.channels, -np.inf)
    skipped = []
    for i in indices:
        try:
            raw = read_raw(files.paths[i])
            if isinstance(raw, Image.Image) or raw.shape[0] != files.channels or not np.isfinite(raw).all():
                raise ValueError("not a finite band file of the data's channel count")
        except ImportError:
            raise
        except Exception:  # noqa: BLE001 - an undecodable file is skipped, as training will replace it
            skipped.append(files.names[i])
            continue
        flat = raw.reshape(files.channels, -1).astype(np.float64)
        low, high = np.minimum(low, flat.min(axis=1)), np.maximum(high, flat.max(axis=1))
    if not np.isfinite(low).all():
        raise ValueError(f"none of the {len(indices)} sampled files is a readable band file")
    return tuple((float(lo), float(hi) if hi > lo else float(lo) + 1.0) for lo, hi in zip(low, high)), skipped


def sample_statistics(dataset: Dataset, *, sample: int = STATISTICS_SAMPLE, seed: int = 0,
                      channels: Optional[int] = None) -> DataStatistics:
    """Per-channel mean and std (and, for float band files, the value range) of a sample of ``dataset``.

    Args:
        dataset: an :class:`~dino_pytorch.data.ImageFiles` or any dataset whose items' first entry
            is a PIL image or a ``(C, H, W)`` uint8 or ``[0, 1]`` float tensor.
        sample: how many images (all of a smaller dataset).
        seed: picks the sample (:func:`sample_indices`).
        channels: the channel count the normaliser sees (default: the data's).
    Raises:
        ValueError: a channel is constant over the sample (its std is 0: normalising would divide by 0).
    """
    indices = sample_indices(len(dataset), sample, seed)  # type: ignore[arg-type]
    value_range: Optional[ValueRange] = None
    skipped: list[str] = []
    if isinstance(dataset, ImageFiles):
        if dataset.float_bands and dataset.value_range is None:
            value_range, skipped = band_range(dataset, indices)
            dataset = dataset.with_value_range(value_range)
        channels = channels or dataset.channels
    moments: Optional[_Moments] = None
    images = 0
    for i in indices:
        image = _sampled_image(dataset, i)
        if image is None:
            skipped.append(dataset.names[i])  # type: ignore[attr-defined]
            continue
        channels = channels or _channels_of(image)
        moments = moments or _Moments(channels)
        moments.add(unit_values(image, channels))
        images += 1
    if moments is None:
        raise ValueError(f"none of the {len(indices)} sampled images decodes")
    std = moments.m2.div(moments.count).sqrt()
    constant = [c for c, s in enumerate(std.tolist()) if s == 0.0]
    if constant:
        raise ValueError(f"channel {constant[0]} is constant over the {len(indices)}-image sample (std 0): "
                         "normalising by it would divide by 0; give the std, or drop the band")
    return DataStatistics(tuple(moments.mean.tolist()), tuple(std.tolist()), value_range, images,
                          tuple(dict.fromkeys(skipped)))


def _sampled_image(dataset: Dataset, index: int) -> Any:
    """Item ``index``'s image; None for an :class:`ImageFiles` file that fails to decode."""
    if not isinstance(dataset, ImageFiles):
        return dataset[index][0]
    try:
        return dataset.decode(index)
    except (ImportError, ValueRangeNeeded):
        raise
    except Exception:  # noqa: BLE001 - skipped here, as training replaces it
        return None


def _channels_of(image: Any) -> int:
    if isinstance(image, Image.Image):
        return 1 if image.mode == "L" else 3
    return int(image.shape[0])
