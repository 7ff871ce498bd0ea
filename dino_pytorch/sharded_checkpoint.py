"""Checkpoints that reshard: one folder written by every rank (torch.distributed.checkpoint, DCP).

:func:`save_sharded_checkpoint` writes a :class:`~dino_pytorch.DINO`'s student, teacher, centres and
optimizer state as DCP shards, each rank its own (an FSDP rank its shards; without FSDP the one
process everything), plus ``dino.json``: the step, the optimizer's param groups and the run's
self-describing configuration (``epoch``, ``args``, ``model_config``, ...). Tensors go to the
shards only, so nothing but tensors is ever unpickled from them. The folder appears whole or not at
all: it is written as ``.NAME.tmp-*`` beside its target and renamed onto it (an older checkpoint
there is first renamed aside, then deleted; :func:`resolve_checkpoint_dir` finds it again if a
crash fell between the two renames).

:func:`load_sharded_checkpoint` restores any world size from any other (DCP reshards: 2 ranks of
FSDP into 1 process, 1 into 2, ...), in place. :func:`read_full_state` reads a folder in one process
without a process group, and :func:`dino_pytorch.export.export_official` writes the official single
file from it. The folder's ``.metadata`` (DCP's index of the shards) is a pickle: it is read with an
allowlist of DCP's own metadata classes, so an untrusted folder cannot run code either.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata

from .checkpoint import _fsync_directory, _plain
from .distributed import get_rank, get_world_size, is_distributed
from .safe_load import CheckpointError, PathLike
from .validate import check_path

META_FILE = "dino.json"
FORMAT = "dino-pytorch sharded checkpoint 1"

# What DCP's .metadata pickle holds: its own dataclasses, torch.Size, dtypes, layouts, paths.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
            ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
            ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if module in _DCP_MODULES or (module, name) in _ALLOWED or dtype:
            return super().find_class(module, name)
        raise CheckpointError(f"the sharded checkpoint's .metadata refers to the Python global {module}.{name}, "
                              "which a DCP index never holds: refused (unpickling it could run code)")


class SafeReader(FileSystemReader):
    """DCP's file reader with the ``.metadata`` pickle read through an allowlist (the shards'
    tensors DCP itself loads with ``weights_only=True``)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except FileNotFoundError:
            raise CheckpointError(f"{self.path} holds no .metadata: not a complete sharded checkpoint") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
            raise CheckpointError(f"{path} is unreadable ({type(err).__name__}: {err})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path} holds a {type(metadata).__name__}, expected DCP's Metadata")
        from torch.distributed.checkpoint.metadata import StorageMeta

        storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata


# ----------------------------------------------------------------------------------- the folder

def resolve_checkpoint_dir(path: PathLike) -> Path:
    """``path`` as a checkpoint folder; if a save crashed between its two renames (the old folder set
    aside, the new one not yet in place), the old one is renamed back first."""
    target = Path(check_path("path", path))
    if not target.exists():
        aside = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
        if aside and (aside[-1] / META_FILE).exists():
            os.replace(aside[-1], target)
    if not target.is_dir():
        raise CheckpointError(f"{target}: no such sharded checkpoint folder")
    if not (target / META_FILE).is_file():
        raise CheckpointError(f"{target} has no {META_FILE}: not a sharded checkpoint of dino-pytorch")
    return target


def remove_stale(path: PathLike) -> list[str]:
    """Delete the temporary and set-aside folders that killed saves of ``path`` left (one run per folder)."""
    target = Path(check_path("path", path))
    removed = []
    for stale in sorted(target.parent.glob(f".{target.name}.tmp-*")) + (
            sorted(target.parent.glob(f".{target.name}.old-*")) if target.exists() else []):
        shutil.rmtree(stale, ignore_errors=True)
        removed.append(stale.name)
    return removed


def _publish(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` folder onto ``target`` (rank 0)."""
    aside = target.parent / f".{target.name}.old-{secrets.token_hex(4)}"
    if target.exists():
        os.replace(target, aside)  # a directory cannot be renamed over a non-empty one
    os.replace(tmp, target)
    _fsync_directory(str(target.parent))
    shutil.rmtree(aside, ignore_errors=True)


def _write_meta(folder: Path, meta: Mapping[str, Any]) -> None:
    with open(folder / META_FILE, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())


# -------------------------------------------------------------------------------- state dicts

def _state(dino: Any, optimizer: Optional[torch.optim.Optimizer]) -> tuple[dict[str, Any], list[Any]]:
    """The tensors to save (nested dicts of this rank's tensors / DTensors) and the optimizer's param groups."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {"student": get_model_state_dict(dino.student),
                             "teacher": get_model_state_dict(dino.teacher.module),
                             "dino_loss": dict(dino.criterion.state_dict())}
    if getattr(dino, "ibot", None) is not None:
        state["ibot_loss"] = dict(dino.ibot_loss.state_dict())
    groups: list[Any] = []
    if optimizer is not None:
        optim_state = get_optimizer_state_dict(dino.student, optimizer)
        state["optimizer"] = {"state": optim_state["state"]}
        groups = list(optim_state["param_groups"])
    return state, groups


def save_sharded_checkpoint(path: PathLike, dino: Any, optimizer: Optional[torch.optim.Optimizer] = None,
                            **extra: Any) -> Path:
    """Every rank calls it: ``dino`` (and ``optimizer``) saved to the folder ``path``, atomically.

    Args:
        path: the checkpoint folder (its parent must exist); an older one there is replaced.
        dino: a :class:`~dino_pytorch.DINO`, sharded (FSDP), replicated (DDP) or in one process.
        optimizer: the optimizer over ``dino``'s student parameters, or None.
        extra: JSON-able entries for ``dino.json`` (``epoch``, ``args``, ``model_config``, ...);
            values JSON cannot hold (paths, enums) are stored as strings.

    Returns:
        The folder's path.
    """
    target = Path(check_path("path", path))
    if not target.parent.is_dir():
        raise FileNotFoundError(f"save_sharded_checkpoint: the directory {str(target.parent)!r} of "
                                f"path={str(target)!r} does not exist")
    state, groups = _state(dino, optimizer)
    meta = {"format": FORMAT, "step": int(dino.step), "world_size": get_world_size(),
            "optimizer": {"class": type(optimizer).__name__, "param_groups": _plain(groups)} if optimizer else None,
            **_plain(dict(extra))}
    name = [f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"]
    if is_distributed():
        dist.broadcast_object_list(name, src=0)  # one temporary folder for all ranks
    tmp = target.parent / name[0]
    try:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True), no_dist=not is_distributed())
        if get_rank() == 0:
            _write_meta(tmp, meta)
            _publish(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if is_distributed():
        dist.barrier()  # no rank goes on (or reads the folder) before it is in place
    return target


def read_meta(path: PathLike) -> dict[str, Any]:
    """``dino.json`` of a checkpoint folder: step, world size, optimizer param groups, configuration."""
    folder = resolve_checkpoint_dir(path)
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder / META_FILE} is unreadable ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder / META_FILE} is not a dino-pytorch sharded checkpoint ({FORMAT!r} expected)")
    return meta


def _reason(err: BaseException) -> str:
    """One line of what went wrong: DCP wraps each rank's failure in a CheckpointException."""
    if isinstance(err, CheckpointException) and err.failures:
        err = next(iter(err.failures.values()))[0]
    return " ".join(str(err).split())[:600]


def _saved_keys(folder: Path) -> set[str]:
    return set(SafeReader(folder).read_metadata().state_dict_metadata)


def load_sharded_checkpoint(path: PathLike, dino: Any,
                            optimizer: Optional[torch.optim.Optimizer] = None) -> dict[str, Any]:
    """Every rank calls it: restore ``dino`` (student, teacher, centres, step) and ``optimizer`` from the
    folder ``path``, whatever world size saved it; returns its ``dino.json`` entries.

    Args:
        path: a folder written by :func:`save_sharded_checkpoint`, on any number of ranks.
        dino: a :class:`~dino_pytorch.DINO` of the same architecture, sharded like this run's (FSDP,
            any world size), replicated (DDP) or in one process; restored in place.
        optimizer: the optimizer over ``dino``'s student parameters (built after
            ``distribute``), or None to restore the model only.

    Raises:
        CheckpointError: not a complete sharded checkpoint, or it does not fit ``dino`` / ``optimizer``
            (another architecture, iBOT on one side only, no optimizer state saved).
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    folder = resolve_checkpoint_dir(path)
    meta = read_meta(folder)
    if optimizer is not None and not meta.get("optimizer"):
        raise CheckpointError(f"{folder} holds no optimizer state: expected optimizer=None")
    state, _ = _state(dino, optimizer)
    if optimizer is not None:
        # Parameters without optimizer state when it was saved (e.g. the frozen last layer) get none here.
        saved = _saved_keys(folder)
        state["optimizer"]["state"] = {
            fqn: values for fqn, values in state["optimizer"]["state"].items()
            if all(f"optimizer.state.{fqn}.{k}" in saved for k in values)}
    try:
        dcp.load(state, storage_reader=SafeReader(folder), no_dist=not is_distributed())
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, KeyError, CheckpointException) as err:
        raise CheckpointError(f"{folder} is unreadable or does not fit this DINO: {_reason(err)}") from None
    set_model_state_dict(dino.student, state["student"])
    set_model_state_dict(dino.teacher.module, state["teacher"])
    dino.criterion.load_state_dict(state["dino_loss"])
    if "ibot_loss" in state:
        dino.ibot_loss.load_state_dict(state["ibot_loss"])
    if optimizer is not None:
        groups = meta["optimizer"]["param_groups"]
        set_optimizer_state_dict(dino.student, optimizer,
                                 {"state": state["optimizer"]["state"], "param_groups": groups})
    dino.teacher.step = int(meta["step"])
    return meta


def read_full_state(path: PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors, meta)`` of a checkpoint folder, read whole in this process (no process group needed).

    Args:
        path: a folder written by :func:`save_sharded_checkpoint`, on any number of ranks.

    Returns:
        ``tensors``: the nested dict that was saved (``student``, ``teacher``, ``dino_loss``,
        ``optimizer``...) with every tensor whole (the shards assembled), on the CPU; ``meta``:
        its ``dino.json``.
    """
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    folder = resolve_checkpoint_dir(path)
    meta = read_meta(folder)
    tensors: dict[str, Any] = {}
    # What torch's dcp_to_torch_save does (an empty dict filled from the index), in memory and
    # through the allowlisted reader; dcp.load would fill a copy of the dict, not this one.
    try:
        _load_state_dict(tensors, storage_reader=SafeReader(folder), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
    except (RuntimeError, ValueError, KeyError, CheckpointException) as err:
        raise CheckpointError(f"{folder} is unreadable: {_reason(err)}") from None
    return tensors, meta


def full_tensors(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """A (possibly sharded) state dict with every DTensor gathered whole (a collective: all ranks call it)."""
    return {k: (v.full_tensor() if callable(getattr(v, "full_tensor", None)) else v) for k, v in state.items()}


def unsharded_state(module: nn.Module) -> dict[str, Tensor]:
    """``module.state_dict()`` with every sharded entry gathered whole, on every rank (a collective)."""
    return full_tensors(module.state_dict())
