"""Schedules: the official per-iteration cosine array, and the same curve one value at a time."""
from __future__ import annotations

import math

import numpy as np


def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: int = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """The official DINO schedule: one float64 value per iteration, shape (epochs * niter_per_ep,).

    A linear warm-up from ``start_warmup_value`` to ``base_value`` over ``warmup_epochs`` epochs
    (``np.linspace`` with both endpoints, so ``base_value`` appears twice at the joint), then a half
    cosine from ``base_value`` towards ``final_value`` that never quite reaches it. Element for
    element the same array as the official ``utils.cosine_scheduler``.
    """
    for name, value in (("epochs", epochs), ("niter_per_ep", niter_per_ep), ("warmup_epochs", warmup_epochs)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"cosine_scheduler: {name}={value!r}, expected a non-negative int")
    if warmup_epochs > epochs:
        raise ValueError(
            f"cosine_scheduler: warmup_epochs={warmup_epochs} exceeds epochs={epochs}; "
            "expected warmup_epochs <= epochs"
        )
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.array([])
    if warmup_epochs > 0:
        warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, cosine))


def cosine_value(base_value: float, final_value: float, step: int, total_steps: int) -> float:
    """Value at ``step`` of the cosine part of :func:`cosine_scheduler` (no warm-up), in O(1).

    Used where a whole array is wasteful (the EMA momentum at one step).
    """
    if total_steps <= 0:
        raise ValueError(f"cosine_value: total_steps={total_steps}, expected a positive int")
    if not 0 <= step < total_steps:
        raise ValueError(
            f"cosine_value: step={step} is outside the schedule of total_steps={total_steps}; "
            f"expected 0 <= step < {total_steps}"
        )
    return final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * step / total_steps))


def teacher_temp_schedule(
    warmup_teacher_temp: float, teacher_temp: float, warmup_teacher_temp_epochs: int, nepochs: int
) -> list[float]:
    """The official per-epoch teacher temperature: linear warm-up (endpoint included), then constant.

    Returns a list of length ``nepochs``.
    """
    if warmup_teacher_temp_epochs > nepochs:
        raise ValueError(
            f"warmup_teacher_temp_epochs={warmup_teacher_temp_epochs} exceeds nepochs={nepochs}; "
            "expected warmup_teacher_temp_epochs <= nepochs"
        )
    warmup = np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
    rest = np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp
    return [float(v) for v in np.concatenate((warmup, rest))]
