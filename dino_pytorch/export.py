"""A sharded checkpoint folder as the official single file: what ``dino-export`` writes.

:func:`export_official` reads a folder of :func:`~dino_pytorch.sharded_checkpoint.save_sharded_checkpoint`
in one process, whatever world size wrote it, and writes the official ``main_dino.py`` layout
(``student``, ``teacher``, ``optimizer``, ``epoch``, ``dino_loss``, ``args``; ``last_layer.weight_g``
/ ``weight_v``) with ``step``, ``total_steps``, ``model_config`` and ``ibot_loss`` as dino-train
writes them, atomically. The evaluation programs (``dino-eval-knn``, ``dino-eval-linear``,
``dino-visualize-attention``) and the official code read it as any checkpoint.pth; the optimizer
state is in torch's own layout (parameters numbered in param-group order), so an unsharded run
(``dino-train`` without ``--fsdp``) can resume from it too.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from .checkpoint import make_official_checkpoint, save_checkpoint
from .safe_load import CheckpointError, PathLike
from .sharded_checkpoint import read_full_state
from .validate import check_path


def _indexed_optimizer(state: Mapping[str, Any], groups: list[Mapping[str, Any]]) -> dict[str, Any]:
    """An FQN-keyed optimizer state (DCP's) in ``torch.optim.Optimizer.state_dict()``'s layout."""
    index: dict[str, int] = {}
    out_groups = []
    for group in groups:
        ids = [index.setdefault(fqn, len(index)) for fqn in group["params"]]
        out_groups.append({**group, "params": ids})
    unknown = sorted(set(state) - set(index))
    if unknown:
        raise CheckpointError(f"optimizer state for {unknown[0]!r}, which no param group lists: the checkpoint "
                              "is inconsistent")
    return {"state": {index[fqn]: dict(values) for fqn, values in state.items()}, "param_groups": out_groups}


def official_from_sharded(path: PathLike) -> dict[str, Any]:
    """The official checkpoint dict of a sharded checkpoint folder (see the module docstring)."""
    tensors, meta = read_full_state(path)
    missing = [k for k in ("student", "teacher", "dino_loss") if k not in tensors]
    if missing:
        raise CheckpointError(f"{path} holds no {missing[0]!r} entry: not a DINO checkpoint")
    optimizer: Optional[dict[str, Any]] = None
    if meta.get("optimizer"):
        optimizer = _indexed_optimizer(tensors.get("optimizer", {}).get("state", {}),
                                       meta["optimizer"]["param_groups"])
    reserved = {"format", "step", "world_size", "optimizer", "epoch", "args"}
    extra = {k: v for k, v in meta.items() if k not in reserved}
    if "ibot_loss" in tensors:
        extra["ibot_loss"] = tensors["ibot_loss"]
    return make_official_checkpoint(tensors["student"], tensors["teacher"], optimizer, int(meta.get("epoch", 0)),
                                    tensors["dino_loss"], args=meta.get("args"), step=int(meta["step"]), **extra)


def export_official(checkpoint_dir: PathLike, out_path: PathLike) -> Path:
    """Write the official single-file checkpoint of the sharded folder ``checkpoint_dir`` to ``out_path``
    (atomically: temp file, fsync, rename). One process, no process group; returns ``out_path``.

    Args:
        checkpoint_dir: a folder of :func:`~dino_pytorch.sharded_checkpoint.save_sharded_checkpoint`
            (``dino-train --fsdp``: ``output_dir/checkpoint``), written by any number of ranks.
        out_path: the ``.pth`` file to write; an existing one is replaced.
    """
    out = Path(check_path("out_path", out_path))
    save_checkpoint(out, official_from_sharded(checkpoint_dir))
    return out
