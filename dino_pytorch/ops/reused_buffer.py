"""Large CPU buffers handed out again once nothing else holds them: a gradient without page faults.

PyTorch has no caching allocator on the CPU. glibc serves a block above its mmap threshold (32 MiB
at most) with a fresh ``mmap``, and the kernel zero-fills each 4 KiB page on first touch: for the
(V*B, K) gradient of the loss (84 MB at B = 32, 10 views, K = 65 536) that cost ~20 ms per step on
the project machine, more than twice the time of writing the gradient into memory already mapped.

:func:`empty` keeps the last buffer of each (shape, dtype) and hands it out again only when nothing
but this cache references its storage (the storage's reference count, read under a lock). A
gradient that a user, a hook or autograd still holds is therefore never written over: the caller
gets a new buffer, which becomes the cached one. At most ``MAX_ENTRIES`` buffers stay cached
between steps (memory the step needed anyway); :func:`release` frees them.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

# Below this, glibc's heap serves and reuses pages already mapped: nothing to gain.
MIN_BYTES = 1 << 25
MAX_ENTRIES = 4

_LOCK = threading.Lock()
_CACHE: OrderedDict[tuple[tuple[int, ...], torch.dtype], torch.UntypedStorage] = OrderedDict()


def _only_cached(storage: torch.UntypedStorage) -> bool:
    return torch._C._storage_Use_Count(storage._cdata) == 1


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def supported() -> bool:
    """False on a PyTorch without the storage reference count: :func:`empty` then always allocates."""
    return hasattr(torch._C, "_storage_Use_Count")


def empty(shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """An uninitialised contiguous CPU tensor, in a cached buffer when no one else holds it.

    Args:
        shape: the tensor's shape; below ``MIN_BYTES`` a plain ``torch.empty``.
        dtype: its dtype.

    Returns:
        A tensor that shares memory with nothing reachable from outside this module.
    """
    shape = tuple(int(n) for n in shape)
    if math.prod(shape) * dtype.itemsize < MIN_BYTES or not supported():
        return torch.empty(shape, dtype=dtype)
    key = (shape, dtype)
    with _LOCK:
        storage = _CACHE.get(key)
        if storage is not None and _only_cached(storage):
            _CACHE.move_to_end(key)
            return torch.empty(0, dtype=dtype).set_(storage, 0, shape, _contiguous_strides(shape))
        fresh = torch.empty(shape, dtype=dtype)
        _CACHE[key] = fresh.untyped_storage()
        _CACHE.move_to_end(key)
        while len(_CACHE) > MAX_ENTRIES:
            _CACHE.popitem(last=False)
        return fresh


def release() -> None:
    """Drop every cached buffer (memory still held elsewhere stays with its holder)."""
    with _LOCK:
        _CACHE.clear()
