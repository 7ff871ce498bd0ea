"""Checkpoints: atomic save, safe load, and the official DINO layout in both directions.

- :func:`save_checkpoint` never leaves a half-written file at its target: it writes a temporary
  file beside it, fsyncs, and renames it over the target.
- :func:`make_official_checkpoint` writes the official top-level layout (``student``,
  ``teacher``, ``optimizer``, ``epoch``, ``dino_loss``, ``fp16_scaler``, ``args``), with ``args``
  as a plain dict.
- The reading side lives in :mod:`dino_pytorch.safe_load` and is re-exported here:
  :func:`load_checkpoint`, :func:`read_checkpoint`, :func:`load_official_weights` and
  :func:`load_into` unpickle with ``weights_only=True`` and an allowlist of exactly what genuine
  official checkpoints hold (``argparse.Namespace``, numpy float64 scalars), so official files load
  without trusting them; any other Python global is refused with a :class:`CheckpointError` naming it.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import secrets
from collections.abc import Mapping
from typing import Any, Union

import torch
from torch import Tensor, nn

from .safe_load import (
    OFFICIAL_GLOBALS,
    CheckpointError,
    PathLike,
    check_fit,
    load_checkpoint,
    load_into,
    load_official_weights,
    official_state_dict,
    read_checkpoint,
    refused_global,
    strip_prefixes,
)
from .validate import check_path

__all__ = [
    "OFFICIAL_GLOBALS", "CheckpointError", "PathLike", "check_fit", "load_checkpoint", "load_into",
    "load_official_weights", "make_official_checkpoint", "official_state_dict", "read_checkpoint",
    "refused_global", "save_checkpoint", "strip_prefixes",
]


# ----------------------------------------------------------------------------------------- save

def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable. Not possible on Windows or some filesystems: best effort.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(path: PathLike, state: Mapping[str, Any]) -> None:
    """``torch.save(state)`` to ``path`` atomically.

    The bytes go to a hidden temporary file in the same directory (so the rename cannot cross
    filesystems), are flushed and fsynced, and ``os.replace`` moves the file onto ``path``; the
    directory is then fsynced so the rename survives a power loss. If anything fails or the
    process dies before the rename, ``path`` still holds its previous content (a crash may leave
    a ``.<name>.tmp-*`` file behind, never a corrupt ``path``).
    """
    path = check_path("path", path)
    if not isinstance(state, Mapping):
        raise TypeError(f"state is a {type(state).__name__}, expected a dict of checkpoint entries")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"save_checkpoint: the directory {directory!r} of path={path!r} does not exist")
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    # os.open respects the umask, so the file gets the permissions a plain torch.save would give.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        # torch.save reports a failed write (a full disk) as a RuntimeError around the OSError.
        if isinstance(err, RuntimeError) and isinstance(err.__context__, OSError):
            raise err.__context__ from err
        raise
    _fsync_directory(directory)


# ------------------------------------------------------------------------------ official layout

def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / EMATeacher / torch.compile wrappers."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    from .teacher import EMATeacher

    while True:
        if isinstance(module, (DistributedDataParallel, DataParallel, EMATeacher)):
            module = module.module
        elif isinstance(orig_mod := getattr(module, "_orig_mod", None), nn.Module):  # torch.compile
            module = orig_mod
        else:
            return module


def _unwrapped_state(obj: Any, name: str) -> dict[str, Any]:
    """state_dict of a module (DDP / DataParallel / EMATeacher wrappers removed) or a mapping."""
    if isinstance(obj, nn.Module):
        return dict(_unwrap(obj).state_dict())
    if isinstance(obj, Mapping):
        return dict(strip_prefixes(obj, ("module.",)))
    raise TypeError(f"{name} is a {type(obj).__name__}, expected an nn.Module or a state_dict")


def _plain(value: Any) -> Any:
    """``value`` with anything weights_only cannot load (Paths, enums, ...) turned into str."""
    if value is None or isinstance(value, (bool, int, float, str, Tensor)):
        return value
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def _state_of(obj: Any, name: str) -> Any:
    if obj is None or isinstance(obj, Mapping):
        return obj
    if hasattr(obj, "state_dict"):
        return obj.state_dict()
    raise TypeError(f"{name} is a {type(obj).__name__}, expected an object with state_dict() or a dict")


def make_official_checkpoint(
    student: Union[nn.Module, Mapping[str, Any]],
    teacher: Union[nn.Module, Mapping[str, Any]],
    optimizer: Any,
    epoch: int,
    dino_loss: Any,
    fp16_scaler: Any = None,
    args: Union[argparse.Namespace, Mapping[str, Any], None] = None,
    **extra: Any,
) -> dict[str, Any]:
    """A checkpoint dict in the official ``main_dino.py`` layout.

    Args:
        student: the ``backbone`` + ``head`` wrapper (e.g. :class:`MultiCropWrapper`; a DDP
            wrapper is unwrapped) or its state_dict.
        teacher: the same for the teacher (an :class:`EMATeacher` is unwrapped).
        optimizer: an object with ``state_dict()``, or a state dict.
        dino_loss: the :class:`DINOLoss` (its centre), or its state dict.
        fp16_scaler: the GradScaler or its state dict; stored only when given.
        epoch: as official, the epoch to resume at (the finished epoch + 1).
        args: the run's configuration: a Namespace (stored as ``vars(args)``) or a dict. Values
            weights_only cannot load (paths, enums) are stored as strings.
        extra: further top-level entries (e.g. ``step=...``).

    Returns a dict whose ``student`` and ``teacher`` entries have the keys of the unwrapped
    modules (``backbone.*``, ``head.*``; no DDP ``module.`` prefix, which official loaders strip
    anyway), with the official ``last_layer.weight_g`` / ``weight_v`` head names, so they load
    straight back into the same modules.
    """
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch={epoch!r}, expected an int >= 0")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    elif args is not None and not isinstance(args, Mapping):
        raise TypeError(f"args is a {type(args).__name__}, expected an argparse.Namespace, a dict or None")
    checkpoint: dict[str, Any] = {
        "student": official_state_dict(_unwrapped_state(student, "student")),
        "teacher": official_state_dict(_unwrapped_state(teacher, "teacher")),
        "optimizer": _state_of(optimizer, "optimizer"),
        "epoch": epoch,
        "dino_loss": _state_of(dino_loss, "dino_loss"),
    }
    if fp16_scaler is not None:
        checkpoint["fp16_scaler"] = _state_of(fp16_scaler, "fp16_scaler")
    if args is not None:
        checkpoint["args"] = _plain(dict(args))
    checkpoint.update(extra)
    return checkpoint
