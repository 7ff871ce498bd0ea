"""The official recipe's helpers of :class:`~dino_pytorch.DINO`, one method each, for any training loop.

A mixin, so that ``dino.py`` stays the three-line path: optimizer groups, the schedules of a step,
per-parameter clipping, the first-epoch freeze of the prototypes, DDP, ``torch.compile`` of the
forwards and the official checkpoint layout. It reads the ``student``, ``teacher``, ``criterion``,
``schedules`` and ``step`` of the DINO it is mixed into.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .checkpoint import make_official_checkpoint
from .optim import cancel_gradients_, clip_gradients_, get_params_groups, set_schedules
from .schedules import DINOSchedules


class DINORecipe:
    """The recipe's helpers (see the module docstring); mixed into :class:`~dino_pytorch.DINO`."""

    student: Any
    teacher: Any
    criterion: Any
    schedules: Optional[DINOSchedules]
    _student_forward: Callable[..., Any]
    _teacher_forward: Callable[..., Any]

    @property
    def step(self) -> int:
        """Optimizer steps taken so far (teacher updates): the schedules' position, saved with the state."""
        return int(self.teacher.step)

    def param_groups(self) -> list[dict[str, Any]]:
        """The official optimizer groups of the student: weight-decayed, and not (biases, 1-D)."""
        return get_params_groups(self.student)

    def apply_schedules(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Set this step's lr (every group) and weight decay (group 0), as official; returns the values.

        Needs ``schedules``. Call before ``optimizer.step()``; :meth:`update_teacher` then advances
        the step.
        """
        if self.schedules is None:
            raise ValueError("schedules=None: build DINO with schedules=DINOSchedules.official(...) to apply them")
        values = self.schedules.at(self.step)
        set_schedules(optimizer, values["lr"], values["weight_decay"])
        return values

    def clip_gradients_(self, clip: float) -> list[Tensor]:
        """Official per-parameter clip of the student's gradients to norm ``clip`` (no host sync)."""
        return clip_gradients_(self.student.parameters(), clip)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The student's prototype parameters (of the patch head too, with iBOT), to freeze in the first
        epoch (official trick)."""
        heads = [self.student.head, getattr(self.student, "patch_head", None)]  # iBOT's patch head too
        return [p for head in heads if head is not None for p in head.last_layer_parameters()]

    def cancel_last_layer_gradients_(self) -> None:
        """Drop the prototypes' gradients (official ``--freeze_last_layer``: call while epoch < N)."""
        cancel_gradients_(self.last_layer_parameters())

    def distribute(self, device_ids: Optional[Sequence[int]] = None, sync_batchnorm: bool = True) -> Any:
        """Wrap the student in DistributedDataParallel (needs an initialised process group).

        With ``sync_batchnorm`` the BatchNorm layers of the student and the teacher become
        SyncBatchNorm, as official; that needs CUDA, so on the CPU they stay per rank.
        """
        on_cuda = any(p.is_cuda for p in self.student.parameters())  # the model's device, not the machine's
        if sync_batchnorm and on_cuda and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.student.modules()
        ):
            self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
            self.teacher.module = nn.SyncBatchNorm.convert_sync_batchnorm(self.teacher.module)
        ddp = nn.parallel.DistributedDataParallel(self.student, device_ids=device_ids)
        object.__setattr__(self, "_student_forward", ddp)
        return self

    def no_sync(self, skip: bool = True) -> contextlib.AbstractContextManager[object]:
        """DDP's ``no_sync`` while ``skip`` (micro-batches before the last of an accumulation)."""
        ddp = self._student_forward
        if skip and isinstance(ddp, nn.parallel.DistributedDataParallel):
            return ddp.no_sync()
        return contextlib.nullcontext()

    def compile_forwards(self, **compile_kwargs: Any) -> Any:
        """``torch.compile`` the student (DDP included) and teacher forwards; weights stay shared."""
        object.__setattr__(self, "_student_forward", torch.compile(self._student_forward, **compile_kwargs))
        object.__setattr__(self, "_teacher_forward", torch.compile(self._teacher_forward, **compile_kwargs))
        return self

    # -- resume in the official file layout ---------------------------------------------------------
    def official_checkpoint(
        self, optimizer: Any, epoch: int, fp16_scaler: Any = None, args: Any = None, **extra: Any
    ) -> dict[str, Any]:
        """The official ``main_dino.py`` checkpoint dict, plus ``step`` and, with iBOT, ``ibot_loss``
        (its centre; see :meth:`load_official_checkpoint`)."""
        ibot_loss = getattr(self, "ibot_loss", None)
        if ibot_loss is not None:
            extra["ibot_loss"] = ibot_loss.state_dict()
        return make_official_checkpoint(self.student, self.teacher.module, optimizer, epoch, self.criterion,
                                        fp16_scaler, args, step=self.step, **extra)

    def load_official_checkpoint(self, checkpoint: Mapping[str, Any]) -> None:
        """Restore student, teacher, centre and step from an :meth:`official_checkpoint` dict.

        Official files hold no ``step``: the step then stays as it is (set ``dino.teacher.step``
        to resume their schedules at the right position).
        """
        self.student.load_state_dict(checkpoint["student"])
        self.teacher.module.load_state_dict(checkpoint["teacher"])
        self.criterion.load_state_dict(checkpoint["dino_loss"])
        ibot_loss = getattr(self, "ibot_loss", None)
        if ibot_loss is not None:
            if "ibot_loss" not in checkpoint:
                raise KeyError("the checkpoint has no 'ibot_loss' entry (the iBOT centre): it was not saved by a DINO "
                               "with ibot=; expected a checkpoint of the same configuration")
            ibot_loss.load_state_dict(checkpoint["ibot_loss"])
        if "step" in checkpoint:
            self.teacher.step = int(checkpoint["step"])
