"""One rule for non-finite values: detect on the device, update nothing from such a step, report it.

A NaN or inf anywhere in a step's logits makes the loss non-finite (a NaN/inf teacher logit turns
its whole softmax row into NaN, a student one its row's cross-entropy). Detection therefore reads
only what the loss already computes: the 0-dim loss and the teacher targets' first column (one value
per teacher row), never another pass over the logits. The flags stay on the device, so on CUDA
nothing waits for them; :meth:`NonFiniteFlags.report` reads them (one host sync) at the caller's
log points, and on the CPU, where reading costs nothing, callers may read them at once.

What a step with a non-finite value must not do, the modules built on this do not do: the centre
keeps its value (:class:`~dino_pytorch.DINOLoss`), the teacher keeps its weights and the optimizer
does not step (:meth:`~dino_pytorch.DINO.update_teacher`, :meth:`~dino_pytorch.DINO.optimizer_step`),
as :class:`torch.amp.GradScaler` skips a step whose gradients hold an inf.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class NonFiniteError(FloatingPointError):
    """A training step produced a non-finite value (raised when the caller asked to stop at once)."""


class NonFiniteFlags:
    """Device-side record of non-finite steps since the last :meth:`reset`.

    Attributes (0-dim tensors on the loss's device):
        found: bool, any non-finite loss recorded.
        teacher_rows: int64, teacher rows whose targets were non-finite.
        teacher_total: int64, teacher rows seen.
        steps: int64, forwards recorded.
    """

    _NAMES = ("found", "teacher_rows", "teacher_total", "steps", "first_step", "first_teacher_rows",
              "first_teacher_total")

    def __init__(self) -> None:
        self.found = torch.zeros((), dtype=torch.bool)
        self.teacher_rows = torch.zeros((), dtype=torch.int64)
        self.teacher_total = torch.zeros((), dtype=torch.int64)
        self.steps = torch.zeros((), dtype=torch.int64)
        # Sticky over a run (see close_step): the first non-finite optimizer step and its counts.
        self.first_step = torch.full((), -1, dtype=torch.int64)
        self.first_teacher_rows = torch.zeros((), dtype=torch.int64)
        self.first_teacher_total = torch.zeros((), dtype=torch.int64)

    def to(self, device: torch.device) -> NonFiniteFlags:
        for name in self._NAMES:
            setattr(self, name, getattr(self, name).to(device))
        return self

    @torch.no_grad()
    def close_step(self, step: int) -> None:
        """End optimizer step ``step``: remember it (and its counts) if it is the first non-finite
        one, on the device (the per-step flags are reset by whoever starts the next step)."""
        first = (self.first_step < 0) & self.found
        self.first_step = torch.where(first, torch.full_like(self.first_step, step), self.first_step)
        self.first_teacher_rows = torch.where(first, self.teacher_rows, self.first_teacher_rows)
        self.first_teacher_total = torch.where(first, self.teacher_total, self.first_teacher_total)

    def first_report(self, kept: str) -> Optional[str]:
        """None if no step closed by :meth:`close_step` was non-finite, else one line naming the first.

        Reads the flags: one host sync on CUDA.
        """
        step = int(self.first_step)
        if step < 0:
            return None
        return self._line(f"step {step}", int(self.first_teacher_rows), int(self.first_teacher_total), kept)

    @torch.no_grad()
    def record(self, loss: Tensor, teacher_targets: Tensor) -> Tensor:
        """Record one forward; returns its own 0-dim bool flag (True: non-finite).

        Args:
            loss: the 0-dim loss of the forward.
            teacher_targets: (..., K) the teacher probabilities it used.
        """
        if self.found.device != loss.device:
            self.to(loss.device)
        bad = ~torch.isfinite(loss.detach())
        first = teacher_targets.detach().reshape(-1, teacher_targets.shape[-1])[:, 0]
        self.found |= bad
        self.teacher_rows += (~torch.isfinite(first)).sum()
        self.teacher_total += first.numel()
        self.steps += 1
        return bad

    def reset(self) -> None:
        for flag in (self.found, self.teacher_rows, self.teacher_total, self.steps):
            flag.zero_()

    def report(self, where: str = "", kept: str = "the centre was") -> Optional[str]:
        """None when every recorded forward was finite, else one line naming what was not.

        Args:
            where: e.g. ``"step 12"``.
            kept: what was not updated from the step (the caller knows what it skipped).

        Reads the flags: one host sync on CUDA (call it where the host syncs anyway).
        """
        if not bool(self.found):
            return None
        return self._line(where, int(self.teacher_rows), int(self.teacher_total), kept)

    @staticmethod
    def _line(where: str, bad_rows: int, total: int, kept: str) -> str:
        if bad_rows:
            what = f"the teacher output ({bad_rows} of {total} teacher rows non-finite)"
        else:
            what = "the student output (the teacher targets were finite)"
        at = f" at {where}" if where else ""
        return f"non-finite loss{at}: {what}; {kept} not updated from it"
