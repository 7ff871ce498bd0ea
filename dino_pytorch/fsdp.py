"""FSDP2 for DINO: the student and the teacher sharded alike, one unit per transformer block.

``DINO.distribute(strategy="fsdp")`` calls :func:`shard_dino`, which applies PyTorch's own
``fully_shard`` (FSDP2) to

- each *unit* of the student's backbone: the children of its ``blocks`` (a ViT's transformer
  blocks; timm's and DINOv2's too), else each direct child that holds parameters; a predicate
  ``units(name, module)`` picks others;
- each child of the DINO head (``mlp``, ``last_layer``; of iBOT's patch head too), so that a call
  of ``forward_bottleneck`` gathers what it reads;
- the student wrapper itself (the root: patch embedding, tokens, final norm);

and the same to the teacher, unit for unit. Every parameter is then a DTensor sharded on dim 0
over the ranks, and the teacher's shard of a parameter is the same slice as the student's, so
``EMATeacher.update`` lerps local shards (``to_local()``) with no collective at all.

What works on activations is untouched: the centre's all-reduce, Sinkhorn-Knopp, KoLeo and iBOT.
Gradient clipping (per parameter, as official) needs each *whole* gradient's norm:
:func:`global_norms` takes the local squared norms of all of them and all-reduces them in one call.
Last-layer freezing (``grad = None``) and the weight-decay groups (by name and ``ndim``, the global
shape's) work on DTensor parameters as they are.

BatchNorm: as DDP, ``sync_batchnorm`` converts to SyncBatchNorm on CUDA; otherwise (the CPU) each
rank normalises its own batch, and a BatchNorm model on several ranks is not the one-process model.
Mixed precision (``param_dtype=torch.bfloat16``, ``reduce_dtype=torch.float32``): FSDP2's policy,
bf16 weights gathered for the forward and backward, gradients reduced in fp32, the sharded
weights, the optimizer and the EMA in fp32.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .dino_recipe import convert_sync_batchnorm_
from .distributed import is_distributed, local_tensor

UnitPredicate = Callable[[str, nn.Module], bool]
"""``units(name, module) -> bool``: shard ``module`` (``name`` relative to the backbone) as one unit."""


def shard_units(backbone: nn.Module, units: Optional[UnitPredicate] = None) -> list[str]:
    """Names (relative to ``backbone``) of the modules sharded one by one, outermost first.

    Args:
        backbone: the student's feature extractor (``dino.backbone``).
        units: ``units(name, module) -> bool`` picks the units; the outermost modules for which it
            is true are kept. None: the children of every ``blocks`` container (``blocks.0``,
            ``model.blocks.3``, ...), or, for a backbone without one, each direct child holding
            parameters.
    """
    named = dict(backbone.named_modules())
    if units is None:
        picked = [name for name in named if name.rpartition(".")[2].isdigit()
                  and name.rpartition(".")[0].rpartition(".")[2] == "blocks"]
        if not picked:
            picked = [name for name, child in backbone.named_children() if any(True for _ in child.parameters())]
    else:
        if not callable(units):
            raise TypeError(f"units is a {type(units).__name__}, expected a callable (name, module) -> bool or None")
        picked = [name for name, module in named.items() if name and units(name, module)]
    outermost: list[str] = []
    for name in picked:  # named_modules() lists parents first
        if not any(name.startswith(kept + ".") for kept in outermost):
            outermost.append(name)
    return outermost


def _head_units(wrapper: nn.Module) -> list[str]:
    """The heads' children with parameters (``head.mlp``, ``head.last_layer``, ``patch_head.*``)."""
    names = []
    for head_name in ("head", "patch_head"):
        head = getattr(wrapper, head_name, None)
        if isinstance(head, nn.Module):
            names += [f"{head_name}.{child}" for child, module in head.named_children()
                      if any(True for _ in module.parameters())]
    return names


def _check_can_shard(dino: Any) -> None:
    if not is_distributed():
        raise RuntimeError("strategy='fsdp' needs an initialised process group (torchrun, or "
                           "torch.distributed.init_process_group) before DINO.distribute")
    if dino._student_forward is not dino.student or dino._teacher_forward is not dino.teacher:
        raise RuntimeError("DINO.distribute(strategy='fsdp') after distribute() or compile_forwards(): expected a "
                           "DINO as built; shard first, then compile")
    if getattr(dino, "fused_head_loss", False):
        raise ValueError("fused_head_loss=True with strategy='fsdp': the fused loss reads the head's last layer "
                         "outside its forward, where FSDP holds only shards; expected fused_head_loss=False")
    if is_sharded(dino.student):
        raise RuntimeError("the student is already sharded (DINO.distribute(strategy='fsdp') was called)")


def shard_dino(dino: Any, *, units: Optional[UnitPredicate] = None, param_dtype: Optional[torch.dtype] = None,
               reduce_dtype: Optional[torch.dtype] = None, sync_batchnorm: bool = True) -> list[str]:
    """Shard ``dino``'s student and teacher alike with FSDP2 (see the module docstring); in place.

    Call under an initialised process group, after ``dino.to(device)`` and before building the
    optimizer (the parameters become new DTensor objects) and before ``compile_forwards``.

    Args:
        dino: a :class:`~dino_pytorch.DINO` as built (not distributed, not compiled, no fused head loss).
        units: which backbone modules are units (:func:`shard_units`); default: the blocks.
        param_dtype: the dtype of the gathered weights (e.g. ``torch.bfloat16`` on CUDA); None: theirs.
        reduce_dtype: the dtype of the gradient reduce-scatter; None: ``float32`` with
            ``param_dtype``, else the gradients'.
        sync_batchnorm: BatchNorm -> SyncBatchNorm on CUDA (as ``distribute`` does for DDP).

    Returns:
        The qualified names of the units in the student (and the teacher's ``module``), the root last.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    _check_can_shard(dino)
    device = next(dino.student.parameters()).device
    if sync_batchnorm:
        convert_sync_batchnorm_(dino)
    if param_dtype is not None and reduce_dtype is None:
        reduce_dtype = torch.float32
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # The mesh on the model's device type (a CPU model on a CUDA machine shards over gloo).
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    names = [f"backbone.{n}" for n in shard_units(dino.student.backbone, units)] + _head_units(dino.student)
    for root in (dino.student, dino.teacher.module):
        for name in names:
            # reshard_after_forward: the gathered block is freed after its forward (gathered again
            # for the backward), so only one block's full weights live at a time.
            fully_shard(root.get_submodule(name), mesh=mesh, mp_policy=policy, reshard_after_forward=True)
        # Explicit on the root: FSDP keeps a root gathered after its forward for the backward, which the
        # teacher never runs; its update must find shards.
        fully_shard(root, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    return names + [""]


def is_sharded(module: nn.Module) -> bool:
    """True when ``module`` was sharded with FSDP2's ``fully_shard``."""
    return callable(getattr(module, "set_requires_gradient_sync", None))


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Within: FSDP2 reduce-scatters ``module``'s gradients only when ``enabled`` (gradient
    accumulation: off for the micro-batches before the last, which accumulate unsharded)."""
    setter: Callable[[bool], None] = module.set_requires_gradient_sync  # type: ignore[assignment]
    setter(enabled)
    try:
        yield
    finally:
        setter(True)


def _shard_groups(tensor: Tensor) -> tuple[Any, ...]:
    """The process groups over which a DTensor's squared norm is summed: its mesh's Shard dims."""
    placements = getattr(tensor, "placements", None)
    if placements is None:
        return ()
    if any(p.is_partial() for p in placements):
        raise ValueError("a gradient with a Partial placement (unreduced): expected FSDP's reduced, Shard gradients")
    mesh = tensor.device_mesh  # type: ignore[attr-defined]
    return tuple(mesh.get_group(d) for d, p in enumerate(placements) if p.is_shard())


def global_norms(tensors: list[Tensor]) -> list[Tensor]:
    """The 2-norm of each whole tensor, DTensor shards included: ``sqrt(sum over ranks of local ||.||^2)``.

    One foreach norm of the local shards, then one all-reduce of all the squared norms per distinct
    process group (one for FSDP), not one per tensor. Plain tensors get their own norm.

    Args:
        tensors: gradients (or any tensors), FSDP's Shard DTensors or plain tensors; every rank
            passes the same list (the all-reduce is a collective).

    Returns:
        One float32 0-dim tensor per tensor, its whole norm, on the tensors' device.
    """
    if not tensors:
        return []
    local = [local_tensor(t) for t in tensors]
    squares = torch.stack([n.float() for n in torch._foreach_norm(local)]).square()
    by_groups: dict[tuple[int, ...], tuple[tuple[Any, ...], list[int]]] = {}
    for i, t in enumerate(tensors):
        groups = _shard_groups(t)
        if groups:
            by_groups.setdefault(tuple(map(id, groups)), (groups, []))[1].append(i)
    for groups, index in by_groups.values():
        rows = torch.tensor(index, device=squares.device)
        summed = squares.index_select(0, rows)
        for group in groups:
            dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
        squares = squares.index_copy(0, rows, summed)
    return list(squares.sqrt().unbind())


def local_bytes(dino: Any, optimizer: Optional[torch.optim.Optimizer] = None) -> dict[str, int]:
    """Bytes this rank holds of the parameters (student and teacher), of the student's gradients and
    of the optimizer's state, counted from local shards (a DTensor's ``to_local()``).

    Args:
        dino: a :class:`~dino_pytorch.DINO`, sharded or not.
        optimizer: its optimizer (the state counted: AdamW's two moments, SGD's momentum), or None.

    Returns:
        ``{"parameters", "gradients", "optimizer", "total"}`` in bytes.
    """
    def size(t: Tensor) -> int:
        local = local_tensor(t)
        return local.numel() * local.element_size()

    params = sum(size(p) for p in dino.student.parameters()) + sum(size(p) for p in dino.teacher.parameters())
    grads = sum(size(p.grad) for p in dino.student.parameters() if p.grad is not None)
    state = 0
    if optimizer is not None:
        state = sum(size(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor))
    return {"parameters": params, "gradients": grads, "optimizer": state, "total": params + grads + state}
