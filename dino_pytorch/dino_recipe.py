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
from .optim import cancel_gradients_, clip_gradients_, frozen_parameters, get_params_groups, set_schedules
from .schedules import DINOSchedules
from .validate import check_choice


def convert_sync_batchnorm_(dino: Any) -> None:
    """The BatchNorm layers of ``dino``'s student and teacher become SyncBatchNorm, as official, when the
    model is on CUDA (SyncBatchNorm needs it; on the CPU each rank normalises its own batch). In place."""
    on_cuda = any(p.is_cuda for p in dino.student.parameters())  # the model's device, not the machine's
    if on_cuda and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in dino.student.modules()):
        dino.student = nn.SyncBatchNorm.convert_sync_batchnorm(dino.student)
        dino.teacher.module = nn.SyncBatchNorm.convert_sync_batchnorm(dino.teacher.module)


class DINORecipe:
    """The recipe's helpers (see the module docstring); mixed into :class:`~dino_pytorch.DINO`."""

    student: Any
    teacher: Any
    criterion: Any
    schedules: Optional[DINOSchedules]
    head_warmup_steps: int
    backbone_lr_scale: float
    _student_forward: Callable[..., Any]
    _teacher_forward: Callable[..., Any]

    @property
    def step(self) -> int:
        """Optimizer steps taken so far (teacher updates): the schedules' position, saved with the state."""
        return int(self.teacher.step)

    def param_groups(self) -> list[dict[str, Any]]:
        """The official optimizer groups of the student: weight-decayed, and not (biases, 1-D); with
        ``backbone_lr_scale != 1`` the backbone's parameters in two more groups of their own
        (``"lr_scale"``, the decayed one under the weight-decay schedule: :func:`~dino_pytorch.optim.
        get_params_groups`). Frozen backbone parameters (head warm-up) are included."""
        return get_params_groups(self.student, lr_scaled=self.backbone_parameters(), lr_scale=self.backbone_lr_scale)

    # -- head warm-up ---------------------------------------------------------------------------------
    @property
    def backbone_frozen(self) -> bool:
        """True during the head warm-up (``step < head_warmup_steps``): the student's forward then
        runs its backbone with no graph (the backward costs nothing there, no gradient reaches it) and
        :meth:`optimizer_step` drops any backbone gradient, so the backbone stays bit-identical and,
        the EMA of equal weights being the weights, so does the teacher's. A loop that calls
        ``optimizer.step()`` itself needs gradients zeroed with ``set_to_none=True`` (the default),
        else :meth:`cancel_backbone_gradients_` first (stale zero gradients would still decay the
        weights). Under FSDP the backbone's gradients are computed and dropped by those two."""
        return self.step < self.head_warmup_steps

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The student backbone's parameters (what the head warm-up freezes and ``backbone_lr_scale`` scales)."""
        return list(self.student.backbone.parameters())

    def warmup_frozen_backbone(self) -> contextlib.AbstractContextManager[None]:
        """The context :meth:`forward` runs the student in: the backbone's parameters require no grad
        during the warm-up (restored after), a null context otherwise and under FSDP2, whose unsharded
        parameters keep their own flags."""
        if not self.backbone_frozen or callable(getattr(self.student, "set_requires_gradient_sync", None)):
            return contextlib.nullcontext()
        return frozen_parameters(self.backbone_parameters())

    def cancel_backbone_gradients_(self) -> None:
        """Drop the student backbone's gradients (the head warm-up; :meth:`optimizer_step` calls it then)."""
        cancel_gradients_(self.backbone_parameters())

    def last_layer_frozen(self, freeze_steps: int) -> bool:
        """Whether to drop the prototypes' gradients this step (official ``--freeze_last_layer`` as
        ``freeze_steps`` = epochs x steps per epoch): in ``[head_warmup_steps, head_warmup_steps +
        freeze_steps)``. The freeze counts from the end of the head warm-up: during the warm-up the
        heads learn whole, prototypes included (fitting them to the frozen backbone is its point), and
        the prototypes are then held for the first ``freeze_steps`` steps in which the backbone
        trains, as official runs hold them at their start. Without a warm-up: ``step < freeze_steps``."""
        return self.head_warmup_steps <= self.step < self.head_warmup_steps + freeze_steps

    def apply_schedules(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Set this step's lr (every group; times ``backbone_lr_scale`` on the backbone's) and weight
        decay (group 0, and the backbone's decayed group), as official; returns the values.

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

    def distribute(self, device_ids: Optional[Sequence[int]] = None, sync_batchnorm: bool = True,
                   strategy: str = "ddp", **fsdp_options: Any) -> Any:
        """Wrap the student in DistributedDataParallel (needs an initialised process group), or with
        ``strategy="fsdp"`` shard the student and the teacher alike with FSDP2, one unit per block
        (:func:`dino_pytorch.fsdp.shard_dino`, which takes ``fsdp_options``: ``units``,
        ``param_dtype``, ``reduce_dtype``). Build the optimizer after this call.

        With ``sync_batchnorm`` the BatchNorm layers of the student and the teacher become
        SyncBatchNorm, as official; that needs CUDA, so on the CPU they stay per rank.
        """
        check_choice("strategy", strategy, ("ddp", "fsdp"))
        if strategy == "fsdp":
            if getattr(self, "distill_teacher", None) is not None:
                raise ValueError("strategy='fsdp' with a distillation teacher: the frozen teacher is not sharded; "
                                 "expected strategy='ddp' (every rank holds the teacher) or no teacher=")
            if getattr(self, "gram_teacher", None) is not None:
                raise ValueError("strategy='fsdp' with gram=: the Gram teacher's snapshot is not sharded; expected "
                                 "strategy='ddp' (every rank holds the snapshot) or no gram=")
            from .fsdp import shard_dino

            shard_dino(self, sync_batchnorm=sync_batchnorm, **fsdp_options)
            return self
        if fsdp_options:
            raise TypeError(f"distribute() got {', '.join(fsdp_options)} with strategy='ddp': FSDP options, "
                            "expected strategy='fsdp' with them")
        if sync_batchnorm:
            convert_sync_batchnorm_(self)
        ddp = nn.parallel.DistributedDataParallel(self.student, device_ids=device_ids,
                                                  find_unused_parameters=self._has_unused_parameters())
        object.__setattr__(self, "_student_forward", ddp)
        return self

    def no_sync(self, skip: bool = True) -> contextlib.AbstractContextManager[object]:
        """DDP's ``no_sync`` (FSDP: no reduce-scatter) while ``skip`` (micro-batches before the last of an
        accumulation)."""
        ddp = self._student_forward
        if skip and isinstance(ddp, nn.parallel.DistributedDataParallel):
            return ddp.no_sync()
        if skip and callable(getattr(self.student, "set_requires_gradient_sync", None)):  # FSDP2
            from .fsdp import gradient_sync

            return gradient_sync(self.student, enabled=False)
        return contextlib.nullcontext()

    def compile_forwards(self, **compile_kwargs: Any) -> Any:
        """``torch.compile`` the student (DDP included) and teacher forwards; weights stay shared."""
        object.__setattr__(self, "_student_forward", torch.compile(self._student_forward, **compile_kwargs))
        object.__setattr__(self, "_teacher_forward", torch.compile(self._teacher_forward, **compile_kwargs))
        return self

    def _has_unused_parameters(self) -> bool:
        """Whether some student parameters take no part in a backward, which DDP must then look for
        (a cost each step, so only then): a head warm-up's frozen backbone, or a masked ViT's
        ``mask_token`` when the student never gets masks (no iBOT, or distilling: DINOv3's student
        sees its crops whole)."""
        no_masks = getattr(self, "ibot", None) is None or getattr(self, "distill_teacher", None) is not None
        has_mask_token = any(name.endswith("mask_token") for name, _ in self.student.named_parameters())
        return self.head_warmup_steps > 0 or (no_masks and has_mask_token)

    # -- resume in the official file layout ---------------------------------------------------------
    def official_checkpoint(
        self, optimizer: Any, epoch: int, fp16_scaler: Any = None, args: Any = None, **extra: Any
    ) -> dict[str, Any]:
        """The official ``main_dino.py`` checkpoint dict, plus ``step`` and, with iBOT, ``ibot_loss``
        (its centre), with Gram anchoring ``gram_teacher`` (snapshot and refresh count; see
        :meth:`load_official_checkpoint`), when distilling ``distill_teacher_fingerprint``
        (:meth:`~dino_pytorch.distill.FrozenTeacher.fingerprint`)."""
        ibot_loss = getattr(self, "ibot_loss", None)
        if ibot_loss is not None:
            extra["ibot_loss"] = ibot_loss.state_dict()
        gram_teacher = getattr(self, "gram_teacher", None)
        if gram_teacher is not None:
            extra["gram_teacher"] = gram_teacher.state_dict()
        distill_teacher = getattr(self, "distill_teacher", None)
        if distill_teacher is not None:  # the teacher itself is not saved: it is rebuilt from its own file
            extra["distill_teacher_fingerprint"] = distill_teacher.fingerprint()
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
        gram_teacher = getattr(self, "gram_teacher", None)
        if gram_teacher is not None:
            if "gram_teacher" not in checkpoint:
                raise KeyError("the checkpoint has no 'gram_teacher' entry (the Gram teacher's snapshot): it was not "
                               "saved by a DINO with gram=; expected a checkpoint of the same configuration")
            gram_teacher.load_state_dict(checkpoint["gram_teacher"])
        if "step" in checkpoint:
            self.teacher.step = int(checkpoint["step"])
