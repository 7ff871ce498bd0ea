"""Checkpoints: atomic save, safe load, and the official DINO layout in both directions.

- :func:`save_checkpoint` never leaves a half-written file at its target: it writes a temporary
  file beside it, fsyncs, and renames it over the target.
- :func:`load_checkpoint` unpickles with ``weights_only=True`` (tensors and plain containers only)
  and turns every failure into a :class:`CheckpointError` naming the file.
- :func:`make_official_checkpoint` writes the official top-level layout (``student``,
  ``teacher``, ``optimizer``, ``epoch``, ``dino_loss``, ``fp16_scaler``, ``args``), but with
  ``args`` as a plain dict so the file stays loadable without trusting it.
- :func:`load_official_weights` / :func:`load_into` read official full checkpoints and model-zoo
  backbone files. Official full checkpoints pickle an ``argparse.Namespace``; those need
  ``trusted=True``, which unpickles arbitrary objects: **only for files you trust**.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .head import _OFFICIAL_TO_PARAMETRIZED

PathLike = Union[str, "os.PathLike[str]"]

# The one official key map lives with DINOHead; here it is read the other way round.
_PARAMETRIZED_TO_OFFICIAL = {ours: theirs for theirs, ours in _OFFICIAL_TO_PARAMETRIZED.items()}
_WRAPPER_PREFIXES = ("module.", "backbone.")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, corrupt, untrusted, or does not fit the model."""


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
    if not isinstance(state, Mapping):
        raise TypeError(f"state is a {type(state).__name__}, expected a dict of checkpoint entries")
    path = os.fspath(path)
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
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


# ----------------------------------------------------------------------------------------- load

def _untrusted_global(err: Optional[BaseException]) -> Optional[str]:
    """The class name weights_only refused ("argparse.Namespace"), or None for other failures."""
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    return match.group(1) if match else None


def _torch_load(path: str, map_location: Any, weights_only: bool) -> Any:
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory, expected a file written by torch.save")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes): an interrupted, non-atomic write?")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as err:
        name = _untrusted_global(err)
        if name is not None:
            raise CheckpointError(
                f"checkpoint {path!r} contains a pickled {name} object, which safe loading "
                f"(weights_only=True) refuses. Official DINO checkpoints pickle their argparse "
                f"Namespace under 'args'; if you trust this file, use "
                f"load_official_weights({path!r}, trusted=True) (it unpickles with "
                f"weights_only=False, which can run arbitrary code)"
            ) from err
        raise CheckpointError(
            f"checkpoint {path!r} ({size} bytes) is truncated or corrupt, or not a torch.save file: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """The dict saved at ``path``, loaded with ``weights_only=True`` onto ``map_location``.

    Raises:
        CheckpointError: the file is missing, empty, truncated or corrupt, holds pickled objects
            other than tensors and plain containers, or is not a dict.
    """
    path = os.fspath(path)
    state = _torch_load(path, map_location, weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(state).__name__}, expected a dict")
    return state


# ------------------------------------------------------------------------------ official layout

def official_state_dict(module_state: Mapping[str, Any]) -> dict[str, Any]:
    """``module_state`` with DINOHead's parametrized last-layer keys renamed to the official ones.

    ``...last_layer.parametrizations.weight.original0`` -> ``...last_layer.weight_g`` and
    ``original1`` -> ``weight_v``; every other key (and every tensor) is passed through, in order.
    """
    out: dict[str, Any] = {}
    for key, value in module_state.items():
        for ours, theirs in _PARAMETRIZED_TO_OFFICIAL.items():
            if key == ours or key.endswith("." + ours):
                key = key[: len(key) - len(ours)] + theirs
                break
        out[key] = value
    return out


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


# ------------------------------------------------------------------------------ official import

def strip_prefixes(state: Mapping[str, Any], prefixes: Iterable[str] = _WRAPPER_PREFIXES) -> dict[str, Any]:
    """``state`` with the leading ``prefixes`` (any number, in any order) removed from every key.

    Only prefixes are removed: ``module.backbone.blocks.0...`` -> ``blocks.0...`` but a
    ``backbone.`` inside a key is kept (the official loader replaces it anywhere).
    """
    prefixes = tuple(prefixes)
    out: dict[str, Any] = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        if key in out:
            raise CheckpointError(f"two keys become {key!r} once the prefixes {prefixes} are removed")
        out[key] = value
    return out


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    )


def _split_backbone_head(state: Mapping[str, Tensor], path: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    state = strip_prefixes(state, ("module.",))
    if not any(k.startswith("backbone.") for k in state):
        return dict(state), {}  # a backbone-only file: its keys are the backbone's own
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    other = [k for k in state if not k.startswith(("backbone.", "head."))]
    if other:
        raise CheckpointError(f"checkpoint {path!r}: keys outside backbone./head.: {other[:5]}")
    return backbone, head


def read_checkpoint(path: PathLike, *, trusted: bool = False, map_location: Any = "cpu") -> dict[str, Any]:
    """The top-level dict of a checkpoint file, ours or official, loaded safely.

    Args:
        trusted: official full checkpoints hold a pickled ``argparse.Namespace``, which safe
            loading refuses. ``trusted=True`` loads with ``weights_only=False``. **Unpickling can
            execute arbitrary code: only pass True for files from a source you trust.**

    Raises CheckpointError: unreadable or corrupt file, untrusted objects, or not a dict.
    """
    path = os.fspath(path)
    try:
        raw = _torch_load(path, map_location, weights_only=True)
    except CheckpointError as err:
        if not (trusted and _untrusted_global(err.__cause__) is not None):
            raise
        warnings.warn(f"loading {path!r} with weights_only=False (trusted=True): unpickling runs code", stacklevel=2)
        raw = _torch_load(path, map_location, weights_only=False)
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(raw).__name__}, expected a dict")
    return dict(raw)


def load_official_weights(
    path: PathLike,
    *,
    checkpoint_key: str = "teacher",
    trusted: bool = False,
    map_location: Any = "cpu",
    checkpoint: Optional[Mapping[str, Any]] = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(backbone_state, head_state)`` from an official DINO file or one of ours.

    Accepts a full training checkpoint (``student`` / ``teacher`` entries with ``module.``,
    ``backbone.`` and ``head.`` prefixes; the entry ``checkpoint_key`` is used) or a backbone-only
    state_dict as released on the DINO model zoo (then ``head_state`` is empty). The prefixes
    ``module.`` and ``backbone.`` are removed as prefixes; head keys keep the official
    ``last_layer.weight_g`` / ``weight_v`` names, which :class:`DINOHead` maps on load.

    Args:
        trusted: see :func:`read_checkpoint`.
        checkpoint: the file's dict when the caller has read it already (:func:`read_checkpoint`);
            ``path`` then only names it in messages.

    Raises:
        CheckpointError: unreadable or corrupt file, untrusted objects without ``trusted=True``,
            or no state dict under ``checkpoint_key``.
    """
    path = os.fspath(path)
    raw = read_checkpoint(path, trusted=trusted, map_location=map_location) if checkpoint is None else checkpoint
    if checkpoint_key in raw and isinstance(raw[checkpoint_key], Mapping):
        state = raw[checkpoint_key]
    elif _is_state_dict(raw):
        state = raw
    else:
        entries = sorted(k for k, v in raw.items() if isinstance(v, Mapping))
        raise CheckpointError(
            f"checkpoint {path!r} has no state dict under checkpoint_key={checkpoint_key!r}; "
            f"its dict entries are {entries}"
        )
    if not _is_state_dict(state):
        raise CheckpointError(f"checkpoint {path!r}: entry {checkpoint_key!r} is not a {{name: tensor}} state dict")
    return _split_backbone_head(state, path)


def _expected_keys(module: nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in official_state_dict(module.state_dict()).items()}


def _check_fit(module: nn.Module, state: Mapping[str, Tensor], what: str, path: str) -> None:
    expected = _expected_keys(module)
    given = official_state_dict(state)  # compare in one naming: the official one
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [
        f"{k}: file {tuple(given[k].shape)} vs model {tuple(expected[k])}"
        for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k])
    ]
    if missing or unexpected or mismatched:
        problems = "; ".join(
            f"{kind}: {keys[:8]}" + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
            for kind, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys
        )
        raise CheckpointError(f"checkpoint {path!r} does not fit the {what} ({type(module).__name__}): {problems}")


def load_into(
    model_backbone: nn.Module,
    head: Optional[nn.Module],
    path: PathLike,
    *,
    checkpoint_key: str = "teacher",
    trusted: bool = False,
    map_location: Any = "cpu",
    checkpoint: Optional[Mapping[str, Any]] = None,
) -> None:
    """Load the weights of ``path`` (see :func:`load_official_weights`) strictly.

    The backbone always, the head when given (``head=None`` deliberately ignores head weights).
    Every key must match in name and shape; otherwise a :class:`CheckpointError` lists the missing,
    unexpected and mismatched keys and nothing is loaded (the official code loads with
    ``strict=False`` and drops mismatches silently).
    """
    path = os.fspath(path)
    backbone_state, head_state = load_official_weights(
        path, checkpoint_key=checkpoint_key, trusted=trusted, map_location=map_location, checkpoint=checkpoint
    )
    _check_fit(model_backbone, backbone_state, "backbone", path)
    if head is not None:
        if not head_state:
            raise CheckpointError(f"checkpoint {path!r} holds a backbone only; pass head=None to load it")
        _check_fit(head, head_state, "head", path)
    model_backbone.load_state_dict(backbone_state, strict=True)
    if head is not None:
        head.load_state_dict(head_state, strict=True)
