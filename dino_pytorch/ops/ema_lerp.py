"""The EMA's arithmetic, ``t <- t + w (s - t)`` over every (teacher, student) tensor pair at once.

Eagerly this is one ``torch._foreach_lerp_``, which on the CPU still runs one parallel region per
tensor: for ViT-S/16 + head (158 tensors, 176 MB) 1.07-1.11x one lerp over a flat buffer of the
same bytes, the mid-size tensors paying a fork and a join each. Compiled (inductor), the same
arithmetic is one C++ kernel with one parallel region and a work-shared loop per tensor: 0.90x the
flat lerp there. The compile takes seconds per tensor group (22 s for those 158 tensors on 2 cores)
and happens once per process, so it is used only for large CPU groups (``COMPILE_MIN_ELEMENTS``);
smaller ones, other devices (CUDA's foreach kernels are fused already) and a failed or disagreeing
compile (:mod:`.compiled`) use the foreach call.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from . import compiled

# Below this many elements per group the EMA takes a few ms per step on the CPU: not worth a compile.
COMPILE_MIN_ELEMENTS = 1 << 23


def lerp_pairs(teachers: list[Tensor], students: list[Tensor], weight: Tensor) -> None:
    """In place ``t.lerp_(s, weight)`` for each pair, the student cast to the teacher's dtype."""
    for t, s in zip(teachers, students):
        t.lerp_(s.to(t.dtype), weight)


compiled.register("ema lerp", lerp_pairs)


def compile_worthwhile(teachers: list[Tensor]) -> bool:
    """A large CPU group (:func:`.compiled.worthwhile`)."""
    return compiled.worthwhile(teachers[0].device, sum(t.numel() for t in teachers), COMPILE_MIN_ELEMENTS)


def foreach_lerp_(teachers: list[Tensor], students: list[Tensor], weight: Union[float, Tensor]) -> None:
    """:func:`lerp_pairs` as one foreach call (the eager twin)."""
    if any(s.dtype != t.dtype for t, s in zip(teachers, students)):
        students = [s.to(t.dtype) for t, s in zip(teachers, students)]
    # A 0-dim tensor weight is accepted at runtime (tests/test_teacher.py); the stubs say Scalar.
    torch._foreach_lerp_(teachers, students, weight)  # type: ignore[arg-type]


def graph_key(teachers: list[Tensor], students: list[Tensor]) -> Optional[tuple[Any, ...]]:
    """The compiled graph's name for this group, or None where the group stays eager: computed once
    per group (reading 316 tensors' shapes every step would cost ~0.2 ms)."""
    if not compile_worthwhile(teachers):
        return None
    return ("ema lerp", compiled.signature(teachers), compiled.signature(students))


def ema_lerp_(
    teachers: list[Tensor], students: list[Tensor], weight: Union[float, Tensor], key: Optional[tuple[Any, ...]]
) -> None:
    """``t <- t + weight (s - t)`` for every pair of one device and teacher dtype.

    Args:
        teachers: tensors updated in place (detached aliases of the teacher's parameters).
        students: tensors of the same shapes, any floating dtype (cast to the teacher's).
        weight: ``1 - momentum``, a float or a 0-dim tensor (0 on a skipped step).
        key: :func:`graph_key` of the group: None runs the foreach call.
    """
    if key is None or not compiled.allowed():  # the size rule was applied when the key was made
        foreach_lerp_(teachers, students, weight)
        return
    # A tensor weight: as a float, every value of the momentum schedule would compile anew.
    w = torch.as_tensor(weight, dtype=teachers[0].dtype, device=teachers[0].device)

    def reference() -> tuple[Tensor, ...]:  # the twin on copies, before the kernel updates in place
        copies = [t.clone() for t in teachers]
        foreach_lerp_(copies, students, w)
        return tuple(copies)

    def restore(expected: tuple[Tensor, ...]) -> None:
        for t, e in zip(teachers, expected):
            t.copy_(e)

    compiled.run(
        "ema lerp", lambda: foreach_lerp_(teachers, students, w), teachers, students, w,
        reference=reference, observe=lambda _: tuple(teachers), restore=restore, key=key,
    )
