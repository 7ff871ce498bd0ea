"""Activation checkpointing per block: keep each block's input, recompute its inside in the backward.

``checkpoint_blocks(dino.backbone)`` makes every unit of the backbone (the transformer blocks, as
:func:`dino_pytorch.fsdp.shard_units` picks them) run through ``torch.utils.checkpoint`` (the
non-reentrant variant) whenever autograd records: the activations inside a block are dropped after
its forward and recomputed during the backward, so a ViT's activation memory is about one block's
plus a token map per block, for about one more forward of compute. The RNG state is replayed, so
drop path draws the same in the recomputation, and the gradients equal those without it.

It changes no parameter, buffer or state-dict key (the block's ``forward`` is wrapped on the
instance), works with or without FSDP (apply it before or after ``DINO.distribute``), and a forward
under ``torch.no_grad()`` (the teacher, evaluation) runs the block as it is.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .fsdp import UnitPredicate, shard_units


class _CheckpointedForward:
    """A block's forward through ``torch.utils.checkpoint`` when autograd records."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        self.forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(backbone: nn.Module, units: Optional[UnitPredicate] = None) -> list[str]:
    """Checkpoint the activations of each unit of ``backbone`` (default: its blocks); in place.

    Args:
        backbone: e.g. ``dino.backbone`` (the student's; the teacher needs none, it keeps no graph).
        units: ``units(name, module) -> bool`` picks other modules (:func:`dino_pytorch.fsdp.shard_units`).

    Returns:
        The names of the checkpointed modules (relative to ``backbone``). Calling it again on the
        same backbone checkpoints nothing twice.
    """
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone is a {type(backbone).__name__}, expected an nn.Module")
    names = shard_units(backbone, units)
    for name in names:
        module = backbone.get_submodule(name)
        if not isinstance(module.__dict__.get("forward"), _CheckpointedForward):
            # The class's forward bound to this module: FSDP's hooks stay around __call__.
            module.forward = _CheckpointedForward(module.forward)
    return names
