"""Reading checkpoints safely: ours, official full checkpoints and model-zoo backbone files.

Every file is unpickled with ``weights_only=True`` and an allowlist of exactly the Python globals a
genuine official ``main_dino.py`` checkpoint holds (:data:`OFFICIAL_GLOBALS`), so official files
load without trusting them. A file that references any other global is refused with a
:class:`CheckpointError` naming that global: unpickling it could run code.

Everything here is also importable from :mod:`dino_pytorch.checkpoint`.
"""
from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from .head import _OFFICIAL_TO_PARAMETRIZED
from .validate import check_bool, check_device, check_path

PathLike = Union[str, "os.PathLike[str]"]

# The one official key map lives with DINOHead; here it is read the other way round.
_PARAMETRIZED_TO_OFFICIAL = {ours: theirs for theirs, ours in _OFFICIAL_TO_PARAMETRIZED.items()}
_WRAPPER_PREFIXES = ("module.", "backbone.")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, corrupt, unsafe, or does not fit the model."""


# ------------------------------------------------------------------------------------ allowlist

def _official_globals() -> list[Any]:
    """What a genuine official checkpoint pickles besides tensors and plain containers:

    - ``argparse.Namespace``: the run's flags under ``"args"`` (plain str / int / float / bool /
      tuple / list values);
    - numpy float64 scalars: ``main_dino.py`` writes ``lr_schedule[it]`` and ``wd_schedule[it]``
      (numpy float64) into the optimizer's param groups, so ``optimizer`` holds them. They pickle as
      ``numpy.core.multiarray.scalar`` (numpy 1, the released files) or
      ``numpy._core.multiarray.scalar`` (numpy 2), a ``numpy.dtype`` and its ``Float64DType`` state.
    """
    import argparse

    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    scalar = core.multiarray.scalar
    allowed: list[Any] = [argparse.Namespace, np.dtype,
                          (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]
    float64_dtype = getattr(getattr(np, "dtypes", None), "Float64DType", None)
    if float64_dtype is not None:
        allowed.append(float64_dtype)
    return allowed


OFFICIAL_GLOBALS = _official_globals()

# torch's wordings for a refused global: "Unsupported global: GLOBAL x.y was not an allowed global
# by default" and "Trying to load unsupported GLOBAL x.y whose module x is blocked".
_GLOBAL_PATTERN = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")
_BUILD_PATTERN = re.compile(r"Can only build .* but got <class '([\w.]+)'>")


def refused_global(err: Optional[BaseException]) -> Optional[str]:
    """The global a weights_only load refused (``"posix.system"``), or None for other failures."""
    text = str(err)
    match = _GLOBAL_PATTERN.search(text) or _BUILD_PATTERN.search(text)
    return match.group(1) if match else None


def _refusal_reason(err: BaseException) -> Optional[str]:
    """torch's specific reason for a weights_only refusal, without its advice; None if not one."""
    text = str(err)
    if "Weights only load failed" not in text:
        return None
    match = re.search(r"WeightsUnpickler error: ?(.*)", text)
    reason = match.group(1).strip() if match else ""
    if not reason:  # the reason follows a blank line in some torch versions
        lines = [line.strip() for line in text.splitlines()[1:] if line.strip()]
        reason = next((line for line in lines if "weights_only" not in line and "torch.load" not in line), "")
    return reason.split(". Please use")[0][:200] or "unsupported pickle content"


# ------------------------------------------------------------------------------------ arguments

_MAP_LOCATIONS = "a torch.device, a device string ('cpu', 'cuda:0'), a dict of location tags, a callable or None"


def _present(name: str, value: Any) -> None:
    """A device ``torch.load`` can put storages on here; the CUDA ones are looked up (no sync)."""
    device = check_device(name, value)
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ValueError(f"{name}={value!r}, but CUDA is not available here: expected 'cpu' or a present device")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{name}={value!r}, but there are {torch.cuda.device_count()} CUDA devices: expected "
                         f"an index below {torch.cuda.device_count()}")


def check_map_location(value: Any) -> Any:
    """``map_location`` as ``torch.load`` takes it, checked before the file is read, so that a bad
    one is named rather than reported as a corrupt file; returned unchanged."""
    if value is None or callable(value):
        return value
    if isinstance(value, dict):
        for key, target in value.items():
            if not isinstance(key, str) or not isinstance(target, (str, torch.device)):
                raise TypeError(f"map_location={value!r}, expected a dict from location tags to device strings "
                                "('cuda:1': 'cpu')")
            _present(f"map_location[{key!r}]", target)
        return value
    if not isinstance(value, (str, torch.device)):
        raise TypeError(f"map_location={value!r}, expected {_MAP_LOCATIONS}")
    _present("map_location", value)
    return value


def _check_read_args(path: Any, trusted: bool, map_location: Any) -> str:
    """The arguments every reader shares, checked before the file is opened; returns the path."""
    path = check_path("path", path)
    check_bool("trusted", trusted)
    check_map_location(map_location)
    return path


def _check_module(name: str, module: Any, *, optional: bool = False) -> None:
    if not (isinstance(module, nn.Module) or (optional and module is None)):
        expected = "an nn.Module or None" if optional else "an nn.Module"
        raise TypeError(f"{name} is a {type(module).__name__}, expected {expected}")


# ----------------------------------------------------------------------------------------- load

def _torch_load(path: str, map_location: Any, weights_only: bool) -> Any:
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory, expected a file written by torch.save")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes): an interrupted, non-atomic write?")
    try:
        if not weights_only:
            return torch.load(path, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(OFFICIAL_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        name = refused_global(err)
        if name is not None:
            raise CheckpointError(
                f"checkpoint {path!r} refers to the Python global {name}, which safe loading refuses: "
                f"unpickling it can run code. Genuine checkpoints (ours and official) hold only tensors, "
                f"plain containers, an argparse.Namespace and numpy scalars; do not load this file"
            ) from err
        reason = _refusal_reason(err)
        if reason is not None:
            raise CheckpointError(
                f"checkpoint {path!r} ({size} bytes) is truncated or corrupt, or holds pickled content that "
                f"safe loading refuses ({reason}) and that can run code when unpickled; genuine checkpoints "
                f"hold none"
            ) from err
        raise CheckpointError(
            f"checkpoint {path!r} ({size} bytes) is truncated or corrupt, or not a torch.save file: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """The dict saved at ``path``, loaded safely (see :data:`OFFICIAL_GLOBALS`) onto ``map_location``.

    Raises:
        TypeError, ValueError: ``path`` is not a path, or ``map_location`` is not a device (or not
            one present here, for CUDA), a dict, a callable or None.
        CheckpointError: the file is missing, empty, truncated or corrupt, refers to a Python global
            outside the allowlist (the message names it), or is not a dict.
    """
    path = _check_read_args(path, False, map_location)
    state = _torch_load(path, map_location, weights_only=True)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(state).__name__}, expected a dict")
    return state


# ------------------------------------------------------------------------------ official import

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
    # patch_head.: the separate iBOT head of DINO(ibot=...), which no backbone or DINO head load needs.
    other = [k for k in state if not k.startswith(("backbone.", "head.", "patch_head."))]
    if other:
        raise CheckpointError(f"checkpoint {path!r}: keys outside backbone./head./patch_head.: {other[:5]}")
    return backbone, head


def read_checkpoint(path: PathLike, *, trusted: bool = False, map_location: Any = "cpu") -> dict[str, Any]:
    """The top-level dict of a checkpoint file, ours or official, loaded safely.

    Official full checkpoints (pickled ``argparse.Namespace``, numpy scalars in the optimizer) load
    safely without any flag.

    Args:
        trusted: only for a file **you made yourself** that pickles other Python objects:
            ``True`` then falls back to ``weights_only=False``, which runs whatever code the file
            holds. Never pass it for a downloaded or shared file.

    Raises:
        TypeError, ValueError: a bad ``path``, ``trusted`` (a bool) or ``map_location`` (see
            :func:`load_checkpoint`), before the file is read.
        CheckpointError: unreadable or corrupt file, a refused global, or not a dict.
    """
    path = _check_read_args(path, trusted, map_location)
    try:
        raw = _torch_load(path, map_location, weights_only=True)
    except CheckpointError as err:
        if not (trusted and refused_global(err.__cause__) is not None):
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
    ``backbone.`` and ``head.`` prefixes, and ``patch_head.`` with iBOT's separate patch head, which is
    left out; the entry ``checkpoint_key`` is used) or a backbone-only
    state_dict as released on the DINO model zoo (then ``head_state`` is empty). The prefixes
    ``module.`` and ``backbone.`` are removed as prefixes; head keys keep the official
    ``last_layer.weight_g`` / ``weight_v`` names, which :class:`DINOHead` maps on load.

    Args:
        trusted: see :func:`read_checkpoint` (files you made yourself only).
        checkpoint: the file's dict when the caller has read it already (:func:`read_checkpoint`);
            ``path`` then only names it in messages.

    Raises:
        TypeError, ValueError: a bad argument (see :func:`read_checkpoint`).
        CheckpointError: unreadable or corrupt file, a refused global, or no state dict under
            ``checkpoint_key``.
    """
    path = _check_read_args(path, trusted, map_location)
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


def check_fit(module: nn.Module, state: Mapping[str, Tensor], what: str, path: str) -> None:
    """Raise a :class:`CheckpointError` listing the missing, unexpected and shape-mismatched keys
    of ``state`` against ``module`` (compared in the official naming); nothing when it fits."""
    expected = {k: v.shape for k, v in official_state_dict(module.state_dict()).items()}
    given = official_state_dict(state)
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

    Raises:
        TypeError: ``model_backbone`` is not an ``nn.Module`` or ``head`` neither one nor None (before
            the file is read); TypeError, ValueError for the other arguments as :func:`read_checkpoint`.
        CheckpointError: as :func:`load_official_weights`, or the weights do not fit.
    """
    _check_module("model_backbone", model_backbone)
    _check_module("head", head, optional=True)
    path = _check_read_args(path, trusted, map_location)
    backbone_state, head_state = load_official_weights(
        path, checkpoint_key=checkpoint_key, trusted=trusted, map_location=map_location, checkpoint=checkpoint
    )
    check_fit(model_backbone, backbone_state, "backbone", path)
    if head is not None:
        if not head_state:
            raise CheckpointError(f"checkpoint {path!r} holds a backbone only; pass head=None to load it")
        check_fit(head, head_state, "head", path)
    model_backbone.load_state_dict(backbone_state, strict=True)
    if head is not None:
        head.load_state_dict(head_state, strict=True)
