"""Guarded collectives: every helper is a no-op without an initialised process group.

The official code calls ``dist.all_reduce`` unconditionally, so single-process runs need a fake
process group. Everything in this package goes through these helpers instead.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a default process group exists (and more than zero ranks take part)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank, 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all ranks; returns it. Identity without a process group."""
    if is_distributed() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Max of ``tensor`` in place over all ranks; returns it. Identity without a process group."""
    if is_distributed() and get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2's parameters and gradients); any other tensor itself.

    Duck-typed (``to_local``), so that importing this module never imports torch.distributed.tensor.
    """
    to_local = getattr(tensor, "to_local", None)
    return tensor if to_local is None else to_local()
