"""The once-per-optimizer-step half of :class:`~dino_pytorch.DINO`: the optimizer step, the teacher and
centre update, and the non-finite rule that guards both.

A mixin, so that ``dino.py`` stays the three-line path. A step whose loss was non-finite (any part,
any micro-batch, any rank) updates nothing: not the weights, not the centres, not the teacher; the
flags live on the device, so the rule costs no host sync.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from . import distributed
from .dino_recipe import DINORecipe


class DINOSteps(DINORecipe):
    """The step helpers (see the module docstring); mixed into :class:`~dino_pytorch.DINO`."""

    ibot: Any
    ibot_loss: Any
    gram_teacher: Any
    _micro_batch: int

    def update_teacher(self, momentum: Optional[float] = None) -> float:
        """Once per optimizer step: EMA of the teacher and the centre update. Returns the momentum.

        After a step whose loss was non-finite (any micro-batch, any rank) neither
        moves: the flag is read on the device, so this adds no host sync. With ``gram``, then the
        Gram teacher's scheduled refresh (:mod:`~dino_pytorch.gram_anchor`; deferred past a
        non-finite step, whose flag it reads on the host only when a refresh is due).
        """
        if momentum is None and self.schedules is not None:
            momentum = self.schedules.at(self.step)["momentum"]
        losses = self._losses()
        skip = self._nonfinite_found().clone()  # update_center resets the flags
        for loss in losses:  # one bad part leaves every centre as it was
            loss.nonfinite.found.copy_(skip.to(loss.nonfinite.found.device))
            loss.nonfinite.close_step(self.step)
            loss.update_center()
        self._micro_batch = 0
        momentum = self.teacher.update(self.student, momentum=momentum, skip=skip)
        if self.gram_teacher is not None:  # after the EMA, as DINOv3's update_gram()
            self.gram_teacher.after_update(self.teacher.module.backbone, self.step, skip)
        return momentum

    def _losses(self) -> list[Any]:
        return [self.criterion] + ([self.ibot_loss] if self.ibot is not None else [])

    def _nonfinite_found(self) -> Tensor:
        """0-dim bool on the device: any part of the loss non-finite since the last update, on any rank.

        With a process group the flag is max-reduced (one element, no host sync): a rank whose own
        loss was finite still got the bad rank's gradients, so every rank must skip the same step,
        and report the same one (a rank stopping alone would leave the others waiting in a collective).
        """
        found = self.criterion.nonfinite.found
        for loss in self._losses()[1:]:
            found = found | loss.nonfinite.found.to(found.device)
        if distributed.is_distributed() and distributed.get_world_size() > 1:
            found = distributed.all_reduce_max(found.to(torch.int32)).bool()
        return found

    def optimizer_step(self, optimizer: torch.optim.Optimizer, scaler: Optional[torch.amp.GradScaler] = None) -> None:
        """``optimizer.step()``, skipped after a non-finite loss (call before :meth:`update_teacher`).

        With a GradScaler the scaler decides (a non-finite loss gives non-finite gradients, which it
        skips); fused optimizers (``AdamW(fused=True)``, ...) skip on the device from the flag, with
        no host sync; any other optimizer reads the flag, free on the CPU, one sync on CUDA. During
        the head warm-up it first drops the backbone's gradients (:meth:`cancel_backbone_gradients_`).
        """
        if self.backbone_frozen:
            self.cancel_backbone_gradients_()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
            return
        found = self._nonfinite_found()
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            # The fused kernels take GradScaler's found_inf and leave params and state untouched.
            optimizer.found_inf = found.to(torch.float32)  # type: ignore[attr-defined]
            optimizer.grad_scale = None  # type: ignore[attr-defined]
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf, optimizer.grad_scale  # type: ignore[attr-defined]
        elif not bool(found):
            optimizer.step()

    def nonfinite_report(self) -> Optional[str]:
        """None while every optimizer step so far had a finite loss, else one line naming the first
        that did not (its step and what was non-finite); nothing was updated from such a step.

        Reads device flags (one host sync on CUDA): call it where the loop syncs anyway, e.g. at log
        points and before saving, and stop there; on the CPU it is free, every step.
        """
        kept = "the centre" + ("s" if self.ibot is not None else "") + ", the teacher and the optimizer were"
        return next(filter(None, (loss.nonfinite.first_report(kept=kept) for loss in self._losses())), None)
