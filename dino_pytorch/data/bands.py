"""Band files: ``.npy`` arrays and (multi-band) TIFF read as ``(C, H, W)`` arrays, and the rule that
maps their values to ``[0, 1]``, the scale the augmenters and the normaliser work on.

**Layout.** A 2-D array ``(H, W)`` is one band. A 3-D array is ``(C, H, W)`` or ``(H, W, C)``: the
channel axis is the smaller of the first and the last axis, and on a tie the first (PyTorch's
``(C, H, W)``), so ``(13, 64, 64)`` and ``(64, 64, 13)`` are both 13 bands of 64 x 64 and
``(4, 8, 4)`` is 4 bands of 8 x 4. Any other rank is an undecodable file.

**Values.** Each band ``c`` goes through the affine map ``(x - low_c) / (high_c - low_c)``, clipped
to ``[0, 1]``, in float64, then stored as float32:

* a ``value_range`` given (one ``(low, high)`` for every band, or one per band) wins for any dtype;
* else integer dtypes use their dtype's range: ``[0, 255]`` for uint8, ``[0, 65535]`` for uint16,
  ``[-32768, 32767]`` for int16, and so on; booleans ``[0, 1]``;
* float data have no such range: they need a ``value_range``, which
  :func:`~dino_pytorch.data.sample_statistics` measures (per band min / max over its sample).

TIFF needs the optional ``tifffile`` package (``pip install 'dino-pytorch[tiff]'``).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

ValueRange = tuple[tuple[float, float], ...]
TIFF_HINT = "reading TIFF needs the tifffile package: pip install 'dino-pytorch[tiff]'"


class DecodeError(ValueError):
    """A file that exists but is not an image this package can read (wrong rank, non-finite values)."""


def read_npy(path: Union[str, Path]) -> np.ndarray:
    """A ``.npy`` file as a ``(C, H, W)`` array in its own dtype (never unpickles objects)."""
    return to_chw(np.load(path, allow_pickle=False), str(path))


def read_tiff(path: Union[str, Path]) -> np.ndarray:
    """A TIFF file (any band count and dtype) as a ``(C, H, W)`` array in its own dtype.

    Raises:
        ImportError: tifffile is not installed (the message says how to install it).
    """
    try:
        import tifffile
    except ImportError:
        raise ImportError(TIFF_HINT) from None
    return to_chw(np.asarray(tifffile.imread(path)), str(path))


def to_chw(array: np.ndarray, name: str = "array") -> np.ndarray:
    """``array`` as ``(C, H, W)`` by the layout rule of this module (a view, no copy)."""
    if array.ndim == 2:
        return array[None]
    if array.ndim != 3:
        raise DecodeError(f"{name}: an array of shape {array.shape}, expected (H, W), (C, H, W) or (H, W, C)")
    if array.shape[2] < array.shape[0]:
        array = array.transpose(2, 0, 1)
    if array.dtype.kind not in "biuf" or 0 in array.shape:
        raise DecodeError(f"{name}: dtype {array.dtype} and shape {array.shape}, expected a non-empty array "
                          "of integers, floats or booleans")
    return array


def dtype_range(dtype: np.dtype) -> Optional[tuple[float, float]]:
    """The value range an integer (or boolean) dtype spans; None for floats, which have none."""
    if dtype.kind == "b":
        return (0.0, 1.0)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return (float(info.min), float(info.max))
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_value_range(value_range: Any, channels: Optional[int] = None) -> ValueRange:
    """``value_range`` as one ``(low, high)`` pair per band: a single pair applies to every band
    (then ``channels`` says how many); each needs finite ``low < high``."""
    pairs = value_range
    if isinstance(pairs, Sequence) and len(pairs) == 2 and all(map(_is_number, pairs)):
        pairs = [tuple(pairs)] * (channels or 1)
    if not isinstance(pairs, Sequence) or not pairs or not all(
            isinstance(p, Sequence) and len(p) == 2 and all(map(_is_number, p)) for p in pairs):
        raise ValueError(f"value_range={value_range!r}: expected (low, high) or one (low, high) pair per band")
    out = tuple((float(low), float(high)) for low, high in pairs)
    for band, (low, high) in enumerate(out):
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"value_range={value_range!r}: band {band} has low {low}, high {high}; expected "
                             "finite numbers with low < high")
    if channels is not None and len(out) != channels:
        raise ValueError(f"value_range={value_range!r}: {len(out)} (low, high) pairs for {channels} bands; "
                         "expected one pair, or one per band")
    return out


def to_unit_range(array: np.ndarray, value_range: Optional[ValueRange] = None, name: str = "array") -> Tensor:
    """A ``(C, H, W)`` array mapped to a float32 tensor in ``[0, 1]`` by the rule of this module.

    Args:
        array: ``(C, H, W)``, any integer, boolean or float dtype.
        value_range: one ``(low, high)`` per band (:func:`check_value_range`), or None: the dtype's
            range (float arrays then raise a ValueError: they need one).
    Returns:
        A new float32 ``(C, H, W)`` tensor; ``array`` is not modified.
    """
    channels = array.shape[0]
    if value_range is None:
        span = dtype_range(array.dtype)
        if span is None:
            raise ValueError(f"{name}: float data ({array.dtype}) need a value_range (low, high) to map them to "
                             "[0, 1]; dino_pytorch.data.sample_statistics measures one, or pass it")
        value_range = (span,) * channels
    elif len(value_range) != channels:
        raise DecodeError(f"{name}: {channels} bands, but value_range has {len(value_range)} (low, high) pairs")
    low = np.array([lo for lo, _ in value_range], dtype=np.float64)[:, None, None]
    high = np.array([hi for _, hi in value_range], dtype=np.float64)[:, None, None]
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise DecodeError(f"{name}: holds NaN or infinite values")
    scaled = np.clip((values - low) / (high - low), 0.0, 1.0)
    return torch.from_numpy(scaled.astype(np.float32))
