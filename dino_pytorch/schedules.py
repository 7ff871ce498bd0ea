"""Schedules, their only owner: the official per-iteration cosine array, the same curve one value at
a time, the per-epoch teacher temperature, and :class:`DINOSchedules` (lr, weight decay, momentum)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .validate import check_float, check_int, check_positive_float, check_positive_int, check_probability


def _plain(number: Any) -> Any:
    """A numpy float as a Python float (for the checks); anything else as it is."""
    return float(number) if isinstance(number, np.floating) else number


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
    element the same array as the official ``utils.cosine_scheduler``. With ``warmup_epochs ==
    epochs`` the whole array is the warm-up, as official.

    Raises:
        ValueError: no iterations (``epochs`` or ``niter_per_ep`` is 0), a negative count, more
            warm-up than epochs, or a non-finite value (each naming the argument).
    """
    for name, value in (("epochs", epochs), ("niter_per_ep", niter_per_ep), ("warmup_epochs", warmup_epochs)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"cosine_scheduler: {name}={value!r}, expected a non-negative int")
    for name, number in (("base_value", base_value), ("final_value", final_value),
                         ("start_warmup_value", start_warmup_value)):
        check_float(f"cosine_scheduler: {name}", _plain(number), error=TypeError)
    if epochs * niter_per_ep == 0:
        raise ValueError(
            f"cosine_scheduler: epochs={epochs} x niter_per_ep={niter_per_ep} is 0 iterations; "
            "expected at least one (both positive)"
        )
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

    Raises:
        ValueError, TypeError: a non-integer or out-of-range ``step`` / ``total_steps``, or a
            non-finite value (each naming the argument).
    """
    check_positive_int("cosine_value: total_steps", total_steps)
    check_int("cosine_value: step", step)
    check_float("cosine_value: base_value", _plain(base_value), error=TypeError)
    check_float("cosine_value: final_value", _plain(final_value), error=TypeError)
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

    Returns a list of length ``nepochs`` (empty for 0).

    Raises:
        ValueError, TypeError: a negative or non-integer epoch count, more warm-up than epochs, or a
            temperature that is not a finite number > 0 (each naming the argument).
    """
    check_positive_float("warmup_teacher_temp", _plain(warmup_teacher_temp))
    check_positive_float("teacher_temp", _plain(teacher_temp))
    check_int("warmup_teacher_temp_epochs", warmup_teacher_temp_epochs, 0)
    check_int("nepochs", nepochs, 0)
    if warmup_teacher_temp_epochs > nepochs:
        raise ValueError(
            f"warmup_teacher_temp_epochs={warmup_teacher_temp_epochs} exceeds nepochs={nepochs}; "
            "expected warmup_teacher_temp_epochs <= nepochs"
        )
    warmup = np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
    rest = np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp
    return [float(v) for v in np.concatenate((warmup, rest))]


def _check_per_step(name: str, values: Any, low: float, high: float) -> None:
    """``values``: a 1-D array-like of finite numbers in ``[low, high]``, one per optimizer step."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} is a {type(values).__name__}, expected a 1-D array of numbers, "
                        "one per optimizer step") from err
    if array.ndim != 1:
        raise ValueError(f"{name} has shape {array.shape}, expected a 1-D array, one value per optimizer step")
    bad = np.flatnonzero(~(np.isfinite(array) & (array >= low) & (array <= high)))
    if bad.size:
        i = int(bad[0])
        bounds = f"in [{low}, {high}]" if math.isfinite(high) else f">= {low}"
        raise ValueError(f"{name}[{i}]={float(array[i])!r}, expected a finite number {bounds}")


@dataclass(frozen=True, eq=False)
class DINOSchedules:
    """The per-step values of the official recipe: learning rate, weight decay, teacher momentum.

    Each is a float64 array of one value per optimizer step, built by :func:`cosine_scheduler` with
    one "epoch" per step, which is element for element the official per-epoch array whenever the
    warm-up is a whole number of epochs (``warmup_epochs * niter_per_ep`` steps). The teacher
    temperature stays per epoch, as official (:class:`~dino_pytorch.DINOLoss`).

    Past the last step every value holds its final entry: a run extended beyond its schedule keeps
    training at the end values instead of failing.

    Build with :meth:`official`; read with :meth:`at`.
    """

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray

    def __post_init__(self) -> None:
        _check_per_step("lr", self.lr, 0.0, math.inf)
        _check_per_step("weight_decay", self.weight_decay, 0.0, math.inf)
        _check_per_step("momentum", self.momentum, 0.0, 1.0)
        lengths = {len(self.lr), len(self.weight_decay), len(self.momentum)}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(
                f"lr, weight_decay and momentum have lengths {len(self.lr)}, {len(self.weight_decay)}, "
                f"{len(self.momentum)}; expected one non-zero length (the number of optimizer steps)"
            )

    @classmethod
    def official(
        cls,
        total_steps: int,
        *,
        lr: float,
        min_lr: float = 1e-6,
        warmup_steps: int = 0,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        momentum_teacher: float = 0.996,
        final_momentum: float = 1.0,
    ) -> DINOSchedules:
        """The official schedules over ``total_steps`` optimizer steps.

        Args:
            lr: the peak learning rate, reached after the linear warm-up (official: ``--lr`` scaled
                by the total batch size / 256); finite, >= 0, like the next three.
            min_lr: where the cosine ends.
            warmup_steps: linear warm-up from 0 (clamped to ``total_steps``).
            weight_decay: where the weight-decay cosine starts (no warm-up).
            weight_decay_end: where the weight-decay cosine ends.
            momentum_teacher: where the EMA momentum's cosine starts (no warm-up).
            final_momentum: where the EMA momentum's cosine ends.
        """
        total_steps = check_positive_int("total_steps", total_steps)
        warmup_steps = min(check_int("warmup_steps", warmup_steps, 0), total_steps)
        for name, value in (("lr", lr), ("min_lr", min_lr), ("weight_decay", weight_decay),
                            ("weight_decay_end", weight_decay_end)):
            check_float(name, value, low=0.0)
        check_probability("momentum_teacher", momentum_teacher)
        check_probability("final_momentum", final_momentum)
        return cls(
            lr=cosine_scheduler(lr, min_lr, total_steps, 1, warmup_steps),
            weight_decay=cosine_scheduler(weight_decay, weight_decay_end, total_steps, 1),
            momentum=cosine_scheduler(momentum_teacher, final_momentum, total_steps, 1),
        )

    @property
    def total_steps(self) -> int:
        return len(self.lr)

    def at(self, step: int) -> dict[str, float]:
        """``{"lr", "weight_decay", "momentum"}`` at optimizer step ``step`` (the final values past the end)."""
        i = min(check_int("step", step, 0), self.total_steps - 1)
        # Plain floats: numpy scalars would leak into optimizer state dicts, which
        # torch.load(weights_only=True) then refuses.
        return {
            "lr": float(self.lr[i]),
            "weight_decay": float(self.weight_decay[i]),
            "momentum": float(self.momentum[i]),
        }
