"""Layouts of multi-view tensors, normalised to what the fused cross-entropy consumes.

Accepted: a crop-major ``(V*B, K)`` tensor (what ``MultiCropWrapper`` returns), a ``(V, B, K)``
tensor, or a list of ``V`` tensors ``(B, K)``. Lists are stacked, which copies; tensors are only
viewed, so the student logits the head's backward keeps alive are the very tensor the loss saves.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

MultiView = Union[Tensor, Sequence[Tensor]]


def _as_tensor(name: str, x: MultiView) -> Tensor:
    if isinstance(x, Tensor):
        if x.ndim not in (2, 3):
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected (views*B, K), (views, B, K) or a list")
        return x
    if isinstance(x, (list, tuple)) and x and all(isinstance(v, Tensor) and v.ndim == 2 for v in x):
        return torch.stack(list(x))
    raise TypeError(f"{name} must be a (views*B, K) or (views, B, K) tensor or a non-empty list of (B, K) tensors")


def split_views(
    student: MultiView, teacher_probs: MultiView, batch_size: Optional[int] = None
) -> tuple[Tensor, Tensor, int]:
    """Normalise the layouts.

    Args:
        student: (V*B, K), (V, B, K) or V x (B, K) student logits.
        teacher_probs: (T*B, K), (T, B, K) or T x (B, K) teacher probabilities, T <= V.
        batch_size: B; needed only when both inputs are 2-D (nothing else tells B apart).

    Returns:
        ``(student_rows, teacher, num_views)``: student as a (V*B, K) view (crop-major rows),
        the teacher as (T, B, K), and V.
    """
    s = _as_tensor("student", student)
    t = _as_tensor("teacher_probs", teacher_probs)
    if batch_size is None:
        if s.ndim == 3:
            batch_size = s.shape[1]
        elif t.ndim == 3:
            batch_size = t.shape[1]
        else:
            raise ValueError("student and teacher_probs are both 2-D: pass batch_size= to split the views")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}, expected >= 1")
    if s.ndim == 2:
        if s.shape[0] % batch_size != 0:
            raise ValueError(f"student has {s.shape[0]} rows, which do not split into views of batch size {batch_size}")
        s = s.unflatten(0, (s.shape[0] // batch_size, batch_size))
    if t.ndim == 2:
        if t.shape[0] % batch_size != 0:
            raise ValueError(
                f"teacher_probs has {t.shape[0]} rows, which do not split into views of batch size {batch_size}"
            )
        t = t.unflatten(0, (t.shape[0] // batch_size, batch_size))
    num_views, num_teacher = s.shape[0], t.shape[0]
    if s.shape[1:] != t.shape[1:] or s.shape[1] != batch_size:
        raise ValueError(
            f"student views {tuple(s.shape[1:])} and teacher views {tuple(t.shape[1:])} differ; "
            f"expected (B={batch_size}, K) for both"
        )
    if num_views < 2 or not 1 <= num_teacher <= num_views:
        raise ValueError(
            f"got V={num_views} student and T={num_teacher} teacher views; expected V >= 2 and 1 <= T <= V"
        )
    if not s.is_floating_point() or not t.is_floating_point():
        raise TypeError(f"expected floating tensors, got student {s.dtype} and teacher_probs {t.dtype}")
    return s.flatten(0, 1), t, num_views
