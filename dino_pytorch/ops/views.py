"""The one reading of multi-view inputs, shared by ``DINOLoss`` and :func:`.multiview_cross_entropy`.

Accepted for both the student logits and the teacher input: a crop-major ``(views*B, K)`` tensor
(what ``MultiCropWrapper`` returns: rows ``[vB:(v+1)B]`` are view v), a ``(views, B, K)`` tensor,
or a list of ``views`` tensors ``(B, K)``. Tensors are only viewed (the student logits the head's
backward keeps alive are the very tensor the loss saves); lists are stacked, which copies.

The batch size B is read from the first of these that exists, so every layout has one answer:

1. ``batch_size`` given;
2. a ``(views, B, K)`` tensor or a list (student first);
3. ``num_student_views`` (student rows / V), then ``num_teacher_views`` (teacher rows / T);
4. both concatenated and nothing else given: the official layout, two teacher views.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

MultiView = Union[Tensor, Sequence[Tensor]]


class ViewLayout(NamedTuple):
    """Student and teacher inputs, normalised.

    student: (V, B, K) view of the student logits (a stack for a list).
    teacher: (T, B, K) view of the teacher input (a stack for a list).
    """

    student: Tensor
    teacher: Tensor

    @property
    def num_views(self) -> int:
        return self.student.shape[0]

    @property
    def num_teacher(self) -> int:
        return self.teacher.shape[0]

    @property
    def batch(self) -> int:
        return self.student.shape[1]


def _batch_of(name: str, x: MultiView) -> Optional[int]:
    """B when ``x`` carries it (a 3-D tensor or a list), else None; rejects what no rule accepts."""
    if isinstance(x, Tensor):
        if x.ndim not in (2, 3):
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected (views*B, K), (views, B, K) or a list")
        return x.shape[1] if x.ndim == 3 else None
    if isinstance(x, (list, tuple)):
        if not x:
            raise ValueError(f"{name} is an empty list, expected (B, K) tensors")
        if not all(isinstance(v, Tensor) for v in x):
            types = sorted({type(v).__name__ for v in x})
            raise TypeError(f"{name} is a list holding {types}, expected a list of (B, K) tensors")
        for i, v in enumerate(x):
            if v.ndim != 2:
                raise ValueError(f"{name} view {i} has shape {tuple(v.shape)}, expected (B, K)")
        sizes = [v.shape[0] for v in x]
        if len(set(sizes)) != 1:
            raise ValueError(f"{name} views have mismatched batch sizes {sizes}; expected one batch size B")
        return sizes[0]
    raise TypeError(f"{name} is a {type(x).__name__}, expected a Tensor or a list of Tensors")


def _rows_per_view(name: str, x: MultiView, views: Optional[int]) -> Optional[int]:
    if views is None or not isinstance(x, Tensor) or x.ndim != 2:
        return None
    if x.shape[0] % views != 0:
        raise ValueError(f"{name} has {x.shape[0]} rows, which do not split into {views} views; "
                         "expected crop-major (views*B, K) rows")
    return x.shape[0] // views


def _as_views(name: str, x: MultiView, batch: int) -> Tensor:
    """(views, B, K) of ``x``."""
    if isinstance(x, Tensor):
        if x.ndim == 3:
            return x
        if batch == 0 or x.shape[0] % batch != 0:
            raise ValueError(f"{name} has {x.shape[0]} rows, which do not split into views of batch size {batch}; "
                             "expected crop-major (views*B, K) rows with B >= 1")
        return x.unflatten(0, (x.shape[0] // batch, batch))
    return torch.stack(list(x))


def split_views(
    student: MultiView,
    teacher: MultiView,
    *,
    num_student_views: Optional[int] = None,
    num_teacher_views: Optional[int] = None,
    batch_size: Optional[int] = None,
    out_dim: Optional[int] = None,
    names: tuple[str, str] = ("student", "teacher"),
) -> ViewLayout:
    """Normalise the layouts of student logits and teacher input (see the module docstring).

    Args:
        student: (V*B, K), (V, B, K) or V x (B, K) student logits.
        teacher: (T*B, K), (T, B, K) or T x (B, K) teacher logits or probabilities, T <= V; teacher
            view i is the same image view as student view i.
        num_student_views: V, checked (and used to find B) when given.
        num_teacher_views: T, checked (and used to find B) when given.
        batch_size: B, when the caller knows it.
        out_dim: K, checked when given.
        names: the argument names the error messages use.

    Returns:
        :class:`ViewLayout` with student (V, B, K) and teacher (T, B, K).
    """
    s_name, t_name = names
    found = [_batch_of(s_name, student), _batch_of(t_name, teacher)]  # both checked, whatever decides
    batch = next((b for b in [batch_size, *found] if b is not None), None)
    if batch is None:
        batch = (_rows_per_view(s_name, student, num_student_views)
                 or _rows_per_view(t_name, teacher, num_teacher_views)
                 or _rows_per_view(t_name, teacher, 2))
    if batch is None:  # unreachable: a teacher that is not a 2-D tensor gave B above
        raise ValueError(f"{s_name} and {t_name} give no batch size")
    s, t = _as_views(s_name, student, batch), _as_views(t_name, teacher, batch)
    _check_layout(s, t, num_student_views, num_teacher_views, out_dim, names)
    return ViewLayout(s, t)


def _check_layout(
    s: Tensor, t: Tensor, num_student_views: Optional[int], num_teacher_views: Optional[int],
    out_dim: Optional[int], names: tuple[str, str],
) -> None:
    s_name, t_name = names
    for name, x in ((s_name, s), (t_name, t)):
        if out_dim is not None and x.shape[-1] != out_dim:
            raise ValueError(f"{name} has {x.shape[-1]} columns, expected out_dim={out_dim}")
        if not x.is_floating_point():
            raise TypeError(f"{name} has dtype {x.dtype}, expected a floating dtype")
    if s.shape[1:] != t.shape[1:]:
        raise ValueError(f"{s_name} views {tuple(s.shape[1:])} and {t_name} views {tuple(t.shape[1:])} differ: "
                         "mismatched batch size or K; expected (B, K) for both")
    if s.shape[1] == 0:
        raise ValueError(f"{s_name} has 0 rows per view (batch size 0), expected B >= 1 (a mean over no rows is NaN)")
    if num_student_views is not None and s.shape[0] != num_student_views:
        raise ValueError(f"{s_name} has {s.shape[0]} views, expected ncrops={num_student_views}")
    if num_teacher_views is not None and t.shape[0] != num_teacher_views:
        raise ValueError(f"{t_name} has {t.shape[0]} views, expected num_teacher_views={num_teacher_views}")
    if s.shape[0] < 2:
        raise ValueError(f"{s_name} has {s.shape[0]} view(s) in total, expected at least 2: "
                         "DINO compares different views of an image")
    if t.shape[0] > s.shape[0]:
        raise ValueError(f"{t_name} has {t.shape[0]} views but {s_name} only {s.shape[0]}; "
                         "expected the teacher views to be the first student views")
