"""The Gram anchoring option of :class:`~dino_pytorch.DINO` (DINOv3): its configuration and the frozen
snapshot of the teacher's backbone, the "Gram teacher", that it anchors the student's patch features to.

With ``DINO(backbone, ..., gram=GramAnchor(...))``, from ``start_step`` on, the loss gains
``weight * GramLoss(student_patches, gram_teacher_patches)``: the student's final-norm patch tokens
of its global crops (the masked crops when iBOT is on, as DINOv3) against the Gram teacher's patch
tokens of the same crops at ``teacher_scale`` times their size (``gram_views``), resized to the
student's patch grid (:func:`~dino_pytorch.resize_patch_grid`, bicubic).

The schedule, in this package's step numbering: ``dino.step`` is the number of optimizer steps
taken (teacher updates), i.e. DINOv3's iteration index ``it`` of the step being run.

* The snapshot is taken from the EMA teacher's backbone at the first forward with
  ``dino.step >= start_step``: DINOv3's ``gram_load_ema_teacher()`` "before iteration
  ``it_load_ema_teacher``". :meth:`GramTeacher.load_snapshot` gives it from a state dict instead
  (DINOv3's ``gram.ckpt``).
* It is refreshed (copied again from the EMA teacher) in :meth:`~dino_pytorch.DINO.update_teacher`,
  after the EMA, when the new ``dino.step`` is a multiple of ``refresh_every`` that is
  ``>= first_refresh_step`` and ``> start_step``: DINOv3 refreshes after iteration ``it`` when
  ``(it + 1) % update_frequency == 0`` and ``it + 1 >= it_first_update``, and ``it + 1`` is our step
  after the update. At most ``max_refreshes`` times (``max_updates``). The count is a buffer, so a
  resumed run continues it exactly (DINOv3 recomputes it from the start iteration).
* A non-finite step (:meth:`~dino_pytorch.DINO.nonfinite_report`) updates nothing, so a refresh that
  falls on it is deferred to the next finite step. DINOv3 steps on regardless and would copy a
  teacher that saw the bad step; here the EMA teacher is still the last good one, and copying it one
  step later keeps the count and the spacing of the refreshes. Reading the step's flag costs one
  host sync, only on a step where a refresh is due.

The Gram teacher never trains: ``requires_grad`` False, always in eval mode, untouched by the EMA.
Its weights, the refresh count and whether the snapshot exists are in ``dino.state_dict()``
(``gram_teacher.*``), so saving and resuming is bit-identical.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union, cast

import numpy as np
import torch
from torch import Tensor, nn

from .losses.gram import GramLoss, resize_patch_grid
from .validate import check_bool, check_choice, check_float, check_int, check_optional_positive_int

WeightLike = Union[float, Sequence[float]]


@dataclass(frozen=True)
class GramAnchor:
    """What the Gram anchoring part of DINO does. The loss options are those of DINOv3's
    ``dinov3_vit7b16_gram_anchor.yaml`` (``normalized: true, img_level: true, remove_neg: false,
    remove_only_teacher_neg: false, tokens_used: all``, bicubic resize without antialias), which
    differ from :class:`~dino_pytorch.GramLoss`'s own defaults in ``remove_neg``.

    Attributes:
        weight: the loss weight: a number, or one value per step (``weight[dino.step]``, the last value
            after the end; DINOv3's ``loss_weight_schedule``, see :func:`gram_weight_schedule`). 0
            before ``start_step`` whatever is given. DINOv3: 1.0; its gram-anchor config: a cosine
            ramp to 2.0.
        start_step: the step whose forward first uses the anchor; the snapshot of the EMA teacher is
            taken then (DINOv3's ``it_load_ema_teacher``).
        refresh_every: refresh the snapshot from the EMA teacher every this many steps (DINOv3's
            ``update_frequency``, 10 000 in its gram-anchor config); None: never.
        first_refresh_step: no refresh before this step (DINOv3's ``it_first_update``).
        max_refreshes: at most this many refreshes (DINOv3's ``max_updates``: 3); None: no limit.
        teacher_scale: the Gram teacher's crops are this many times the global crops' size (DINOv3:
            512 / 256 = 2); read by the augmenters (``MultiCropRecipe(gram_teacher_scale=...)``).
        apply_norm: :class:`~dino_pytorch.GramLoss` option (DINOv3's ``normalized``).
        img_level: :class:`~dino_pytorch.GramLoss` option: one Gram per crop (True) or over the batch.
        remove_neg: :class:`~dino_pytorch.GramLoss` option.
        remove_only_teacher_neg: :class:`~dino_pytorch.GramLoss` option.
        tokens_used: ``"all"`` patches, or only the iBOT-``"masked"`` / ``"unmasked"`` ones (need
            ``img_level=False`` and iBOT, as in DINOv3).
        resize_mode: how the Gram teacher's patch grid is resized to the student's
            (:func:`~dino_pytorch.resize_patch_grid`; DINOv3: bicubic).
        resize_antialias: interpolate's ``antialias`` there (DINOv3: False).
    """

    weight: WeightLike = 1.0
    start_step: int = 0
    refresh_every: Optional[int] = None
    first_refresh_step: int = 0
    max_refreshes: Optional[int] = None
    teacher_scale: float = 2.0
    apply_norm: bool = True
    img_level: bool = True
    remove_neg: bool = False
    remove_only_teacher_neg: bool = False
    tokens_used: Literal["all", "masked", "unmasked"] = "all"
    resize_mode: str = "bicubic"
    resize_antialias: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.weight, (Sequence, np.ndarray)) and not isinstance(self.weight, str):
            values = tuple(check_float(f"weight[{i}]", float(w) if isinstance(w, np.floating) else w, low=0.0)
                           for i, w in enumerate(self.weight))
            if not values:
                raise ValueError("weight=(), expected a number >= 0 or a non-empty sequence of them (one per step)")
            object.__setattr__(self, "weight", values)
        else:
            check_float("weight", self.weight, low=0.0, error=TypeError)
        check_int("start_step", self.start_step, 0)
        check_optional_positive_int("refresh_every", self.refresh_every)
        check_int("first_refresh_step", self.first_refresh_step, 0)
        if self.max_refreshes is not None:
            check_int("max_refreshes", self.max_refreshes, 0)
        check_float("teacher_scale", self.teacher_scale, low=0.0, low_open=True)
        for name in ("apply_norm", "img_level", "remove_neg", "remove_only_teacher_neg", "resize_antialias"):
            check_bool(name, getattr(self, name))
        check_choice("tokens_used", self.tokens_used, ("all", "masked", "unmasked"))
        if self.tokens_used != "all" and self.img_level:
            raise ValueError(f"tokens_used={self.tokens_used!r} with img_level=True: a selection of patches has "
                             "no per-image Gram; expected img_level=False (as DINOv3 asserts)")
        GramLoss(self.apply_norm, self.img_level, self.remove_neg, self.remove_only_teacher_neg)  # its checks
        check_choice("resize_mode", self.resize_mode, ("nearest", "bilinear", "bicubic", "area", "nearest-exact"))

    def weight_at(self, step: int) -> float:
        """The loss weight of step ``step``: 0 before ``start_step``, else the constant or the schedule's."""
        if step < self.start_step:
            return 0.0
        if isinstance(self.weight, tuple):
            return float(self.weight[min(step, len(self.weight) - 1)])
        return float(cast(float, self.weight))

    def refreshes_due(self, step: int) -> int:
        """Refreshes scheduled at steps ``<= step`` (after the update that made ``dino.step == step``),
        at most ``max_refreshes``: the multiples of ``refresh_every`` in
        ``[max(first_refresh_step, start_step + 1), step]``."""
        if self.refresh_every is None:
            return 0
        first = max(self.first_refresh_step, self.start_step + 1)
        due = max(0, step // self.refresh_every - math.ceil(first / self.refresh_every) + 1)
        return due if self.max_refreshes is None else min(due, self.max_refreshes)


def gram_weight_schedule(start: float, peak: float, end: float, warmup_steps: int, total_steps: int,
                         cosine_steps: Optional[int] = None) -> np.ndarray:
    """A per-step Gram weight for :attr:`GramAnchor.weight`, shaped as DINOv3's ``loss_weight_schedule``:
    ``warmup_steps`` values rising linearly from ``start`` towards ``peak`` (``peak`` itself not
    reached), then ``cosine_steps`` values (default: the rest) of a half cosine from ``peak`` to
    ``end`` (both included), then ``end`` to ``total_steps``. Its gram-anchor config is
    ``(0, 0, 2.0, warmup=1000 epochs, cosine=1 epoch)``: 0 until the resumed step 1 000 000, then
    up to 2.0 over one epoch.

    Returns:
        (total_steps,) float64.
    """
    warmup_steps, total_steps = check_int("warmup_steps", warmup_steps, 0), check_int("total_steps", total_steps, 1)
    cosine = total_steps - warmup_steps if cosine_steps is None else check_int("cosine_steps", cosine_steps, 0)
    if warmup_steps + cosine > total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} + cosine_steps={cosine} exceed total_steps={total_steps}, "
                         "expected at most total_steps")
    linear = start + (peak - start) * np.arange(warmup_steps, dtype=np.float64) / max(warmup_steps, 1)
    angle = np.pi * np.arange(cosine, dtype=np.float64) / max(cosine - 1, 1)
    ramp = end + (peak - end) * (1.0 + np.cos(angle)) / 2.0
    return np.concatenate([linear, ramp, np.full(total_steps - warmup_steps - cosine, float(end))])


def check_gram_option(gram: Optional[GramAnchor], ibot: Any, fused_head_loss: bool,
                      distill: bool = False) -> Optional[GramAnchor]:
    """``DINO(gram=)``'s value, checked: a :class:`GramAnchor` or None; not with the fused head loss or a
    distillation teacher, and ``tokens_used`` other than ``"all"`` only with iBOT (its masks choose the
    patches)."""
    if gram is None:
        return None
    if not isinstance(gram, GramAnchor):
        raise TypeError(f"gram is a {type(gram).__name__}, expected a GramAnchor or None")
    if distill:
        raise ValueError("gram= with teacher=: Gram anchoring is part of DINOv3's self-distillation, not of its "
                         "distillation from a frozen teacher (gram.use_loss: false there); expected one or the other")
    if fused_head_loss:
        raise ValueError("fused_head_loss=True with gram=: the fused head loss runs the backbone for its CLS "
                         "features only; expected one or the other")
    if gram.tokens_used != "all" and ibot is None:
        raise ValueError(f"gram.tokens_used={gram.tokens_used!r} without ibot=: the masked / unmasked patches are "
                         "iBOT's; expected tokens_used='all' or an IBOTConfig")
    return gram


class GramTeacher(nn.Module):
    """The frozen snapshot of the EMA teacher's backbone and its schedule state (module docstring).

    Args:
        config: the :class:`GramAnchor` options.
        teacher_backbone: the EMA teacher's backbone (a ViT with DINOv2's ``forward_features``); copied,
            so the state dict has the snapshot's keys from the start; the copy is only used once taken.

    Buffers: ``refreshes`` (0-dim int64, refreshes done) and ``taken`` (0-dim bool, the snapshot exists);
    mirrored on the host (read back after ``load_state_dict``), so a step reads no device value.
    """

    refreshes: Tensor
    taken: Tensor

    def __init__(self, config: GramAnchor, teacher_backbone: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.backbone = copy.deepcopy(teacher_backbone).requires_grad_(False).eval()
        self.loss = GramLoss(config.apply_norm, config.img_level, config.remove_neg, config.remove_only_teacher_neg)
        self.register_buffer("refreshes", torch.zeros((), dtype=torch.int64))
        self.register_buffer("taken", torch.zeros((), dtype=torch.bool))
        self._taken, self._refreshes = False, 0
        self.register_load_state_dict_post_hook(lambda module, incompatible: module._read_buffers())

    def _read_buffers(self) -> None:
        self._taken, self._refreshes = bool(self.taken), int(self.refreshes)

    def train(self, mode: bool = True) -> GramTeacher:
        """Always eval mode (as DINOv3's ``train()`` keeps its Gram teacher): no dropout, no drop path."""
        return super().train(False)

    @torch.no_grad()
    def copy_from(self, teacher_backbone: nn.Module) -> None:
        """Copy every parameter and buffer of ``teacher_backbone`` into the snapshot (bit-equal) and mark it taken."""
        for dst, src in zip(self.backbone.state_dict().values(), teacher_backbone.state_dict().values()):
            dst.copy_(src)
        self.taken.fill_(True)
        self._taken = True

    def load_snapshot(self, state_dict: Mapping[str, Tensor]) -> None:
        """Start from given backbone weights (DINOv3's ``gram.ckpt``) instead of the EMA teacher at
        ``start_step``: e.g. ``dino.teacher_backbone.state_dict()`` of an earlier run. Strict keys."""
        self.backbone.load_state_dict(state_dict)
        with torch.no_grad():
            self.taken.fill_(True)
        self._taken = True

    def after_update(self, teacher_backbone: nn.Module, step: int, skip: Tensor) -> None:
        """After the EMA update that made ``dino.step == step``: refresh when one is due and the step was
        finite (``skip`` False; read on the host only then)."""
        if self._taken and self._refreshes < self.config.refreshes_due(step) and not bool(skip):
            self.copy_from(teacher_backbone)
            self._refreshes += 1
            self.refreshes.fill_(self._refreshes)

    def loss_term(self, step: int, teacher_backbone: nn.Module, student_patches: Tensor,
                  student_views: Sequence[Tensor], gram_views: Optional[Sequence[Tensor]], patch_size: int,
                  masks: Optional[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """``(weight * gram_loss, {"gram_loss", "gram_weight"})`` of one forward.

        Args:
            step: ``dino.step``.
            teacher_backbone: the EMA teacher's, for the snapshot at ``start_step``.
            student_patches: (T*B, N, D) final-norm patch tokens of the student's T global crops, crop-major.
            student_views: the T global crops, (B, C, H, W) each.
            gram_views: the Gram teacher's T crops (B, C, H', W'), or None to use ``student_views``.
            patch_size: the backbone's.
            masks: (T*B, N) bool iBOT masks, or None.

        Returns:
            The weighted 0-dim loss (0 before ``start_step``) and its detached parts.
        """
        weight = self.config.weight_at(step)
        if step < self.config.start_step:
            zero = student_patches.new_zeros((), dtype=torch.float32)
            return zero, {"gram_loss": zero, "gram_weight": zero}
        if not self._taken:
            self.copy_from(teacher_backbone)
        views = check_gram_views(gram_views, student_views) if gram_views is not None else list(student_views)
        with torch.no_grad():
            teacher: Any = self.backbone
            target = teacher.forward_features(torch.cat(views))["x_norm_patchtokens"]
            grids = [(v.shape[-2] // patch_size, v.shape[-1] // patch_size) for v in (views[0], student_views[0])]
            target = resize_patch_grid(target, grids[0], grids[1], mode=self.config.resize_mode,
                                       antialias=self.config.resize_antialias)
        student = student_patches
        if self.config.tokens_used != "all":
            keep = masks if self.config.tokens_used == "masked" else ~masks  # type: ignore[operator]
            student, target = student[keep], target[keep]
        loss = self.loss(student, target)
        return weight * loss, {"gram_loss": loss.detach(), "gram_weight": loss.new_tensor(weight)}

    def extra_repr(self) -> str:
        return f"{self.config}"


def check_gram_views(gram_views: object, student_views: Sequence[Tensor]) -> list[Tensor]:
    """``gram_views`` as a list of T (B, C, H', W') tensors matching the T global views' count, batch and channels."""
    count, batch, chans = len(student_views), student_views[0].shape[0], student_views[0].shape[1]
    if not isinstance(gram_views, (list, tuple)) or len(gram_views) != count:
        got = f"{len(gram_views)} items" if isinstance(gram_views, (list, tuple)) else type(gram_views).__name__
        raise ValueError(f"gram_views has {got}, expected a list of {count} (B, C, H, W) tensors, one per global view")
    for i, v in enumerate(gram_views):
        if not isinstance(v, Tensor) or v.ndim != 4 or v.shape[0] != batch or v.shape[1] != chans:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"gram_views[{i}] is {shape}, expected a ({batch}, {chans}, H, W) tensor like the global "
                             "views, at the Gram teacher's size")
    return list(gram_views)
