"""IBOTPatchLoss: DINOv2's masked-patch loss, teacher targets apart from one weighted cross-entropy.

The student sees the global crops with some patches masked; the teacher sees them whole. For the M
masked patches (row-major over (image, patch), the order of ``masks.nonzero()``), with ``P_j`` the
teacher target of patch j (centred and sharpened, or Sinkhorn-Knopp) and ``z_j`` its student logits:

    loss = (1 / 2B) * sum_i sum_{j in M_i} (1 / |M_i|) * -<P_j, log softmax(z_j / tau_s)>

``M_i`` are the masked patches of global crop i and 2B the number of global crops (``masks.shape[0]``):
each masked image weighs the same whatever its mask size, and images without a mask count in the
denominator, as DINOv2's ``iBOTPatchLoss.forward_masked`` with the collate's ``masks_weight``.

The centre (``centering="centering"``) is an EMA of the masked teacher patches' raw logits, kept
apart from DINOLoss's (DINOv2 has one per loss). It is the *exact* mean over all ranks' patches;
DINOv2 all-reduces each rank's own mean and divides by the world size, which weighs a rank's patches
by ``1 / M_rank`` (the same for one process, or ranks with equal patch counts).
"""
from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch
from torch import Tensor

from ..ops import weighted_cross_entropy
from ..validate import check_positive_float
from .targets import TeacherTargets


def masked_patch_weights(masks: Tensor, num_rows: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``1 / |M_i|`` for each masked patch, with no host sync (no boolean indexing, no ``nonzero``).

    Args:
        masks: (2B, N) bool masks of the global crops.
        num_rows: M, the number of masked-patch rows the logits hold.
        dtype: dtype of the weights.

    Returns:
        ``(weights (M,), total)``: the weight of each row (row j belongs to the image whose cumulative
        mask count first exceeds j) and the 0-dim int64 number of masked patches in ``masks``.
    """
    counts = masks.sum(dim=-1)  # (2B,) int64
    ends = counts.cumsum(dim=0)  # (2B,): masked patches of images 0..i
    rows = torch.arange(num_rows, device=masks.device)
    # Patch j belongs to the first image i with ends[i] > j. Clamped: with a count mismatch (the
    # caller's error, caught in forward) the index stays in range instead of faulting on CUDA.
    image = torch.searchsorted(ends, rows, right=True).clamp_(max=masks.shape[0] - 1)
    weights = 1.0 / counts.to(dtype).clamp(min=1.0)
    return weights[image], ends[-1]


class IBOTPatchLoss(TeacherTargets):
    """The iBOT patch loss of DINOv2 (Oquab et al., 2023) on the masked patches: see the module docstring.

    Built on :class:`~dino_pytorch.losses.targets.TeacherTargets` as :class:`~dino_pytorch.DINOLoss`
    is: its own centre (state_dict key ``center``, (1, K); DINOv2's (1, 1, K) loads too), the teacher
    temperature schedule, Sinkhorn-Knopp over all ranks' rows, the non-finite rule and manual centre
    updates for gradient accumulation.

    Args:
        out_dim: K, the number of patch prototypes.
        student_temp: tau_s.
        teacher_temp: teacher temperature after the warm-up.
        warmup_teacher_temp: teacher temperature at epoch 0 of the warm-up; ``None``: ``teacher_temp``.
        warmup_teacher_temp_epochs: length of the linear warm-up (endpoint included, as official).
        nepochs: schedule length; an ``epoch >= nepochs`` raises. ``None``: ``teacher_temp`` for
            ever after the warm-up.
        center_momentum: EMA momentum m of the centre, ``c <- m c + (1 - m) mean(t)`` over the masked
            teacher patches' raw logits.
        centering: ``"centering"`` (EMA centre, softmax of ``(t - c) / tau_t``) or ``"sinkhorn_knopp"``
            (over all ranks' masked patches; the centre is then neither used nor updated).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (DINOv2: 3).
        center_update: ``"forward"`` (every training-mode forward updates the centre) or ``"manual"``
            (forwards accumulate, :meth:`update_center` applies once per optimizer step: 4
            micro-batches then give the centre of one batch of 4x).
        on_nonfinite: ``"warn"`` or ``"raise"`` (:class:`~dino_pytorch.nonfinite.NonFiniteError`) on a
            non-finite loss, which is flagged and leaves the centre unchanged either way.

    Shapes:
        student_patch_logits: (M, K) student logits of the masked patches, ``masks.nonzero()`` order.
        teacher_patch_logits: (M, K) teacher logits of the same patches (the unmasked teacher's).
        masks: (2B, N) bool, True where the student's patch was masked; M == ``masks.sum()``.
        returns: a 0-dim float32 tensor (float64 for float64 student logits).
    """

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: Optional[float] = None,
        warmup_teacher_temp_epochs: int = 0,
        nepochs: Optional[int] = None,
        center_momentum: float = 0.9,
        *,
        centering: Literal["centering", "sinkhorn_knopp"] = "centering",
        sinkhorn_iterations: int = 3,
        center_update: Literal["forward", "manual"] = "forward",
        on_nonfinite: Literal["warn", "raise"] = "warn",
    ) -> None:
        warmup = teacher_temp if warmup_teacher_temp is None else warmup_teacher_temp
        super().__init__(out_dim, warmup, teacher_temp, warmup_teacher_temp_epochs, nepochs, center_momentum,
                         centering, sinkhorn_iterations, center_update, on_nonfinite)
        self.student_temp = check_positive_float("student_temp", student_temp)

    def forward(
        self, student_patch_logits: Tensor, teacher_patch_logits: Tensor, masks: Tensor,
        epoch: Optional[int] = None, *, teacher_temp: Optional[float] = None,
    ) -> Tensor:
        """Loss of the masked patches' student logits against their teacher targets.

        Args:
            student_patch_logits: (M, K) student logits, one row per masked patch.
            teacher_patch_logits: (M, K) teacher logits of the same patches, same order.
            masks: (2B, N) bool masks of the global crops.
            epoch: index into the teacher temperature schedule.
            teacher_temp: a temperature for this call, overriding the schedule.

        Returns:
            the 0-dim loss. With M = 0 it is 0 and still backpropagates (a zero gradient); the
            centre does not move. A count of ``masks`` other than M raises where reading the count is
            free (CPU tensors) or already paid for (``on_nonfinite="raise"``); elsewhere (CUDA, a
            compiled graph) the loss is NaN instead, so the non-finite rule flags the step and
            nothing is updated from it, without a host sync.
        """
        student, teacher = student_patch_logits, teacher_patch_logits
        self._check_inputs(student, teacher, masks)
        num_rows = student.shape[0]
        dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
        weights, total = masked_patch_weights(masks, num_rows, dtype)
        if (masks.device.type == "cpu" or self.on_nonfinite == "raise") and not torch.compiler.is_compiling():
            if int(total) != num_rows:
                raise ValueError(f"masks has {int(total)} masked patches but the patch logits have M={num_rows} "
                                 "rows; expected one row per masked patch")
        self._start_forward()
        temp = self._temperature(epoch, teacher_temp)
        if num_rows or self.centering == "sinkhorn_knopp":
            # Sinkhorn-Knopp runs even on M = 0 rows: its all-reduces need every rank.
            probs = self.targets(teacher, temp)
        else:
            probs = teacher.detach().float()  # no rows: no softmax kernel launched on an empty grid
        if num_rows == 0:
            # Nothing to compare: a 0 tied to the logits, so backward() and DDP see the usual graph.
            loss = student.sum().to(dtype) * 0.0
        else:
            loss = weighted_cross_entropy(student, probs, self.student_temp, weights) / masks.shape[0]
        # A mismatch that was not read above poisons the loss on the device (see Returns).
        loss = torch.where(total == num_rows, loss, torch.full_like(loss, math.nan))
        # stacklevel 6: _report_now, _finish_forward, forward, Module._call_impl,
        # Module._wrapped_call_impl, then the line that called criterion(...).
        self._finish_forward(loss, probs, teacher, stacklevel=6)
        return loss

    def _check_inputs(self, student: Tensor, teacher: Tensor, masks: Tensor) -> None:
        """Types, dtypes, shapes and devices (metadata only: no device sync)."""
        for name, x in (("student_patch_logits", student), ("teacher_patch_logits", teacher), ("masks", masks)):
            if not isinstance(x, Tensor):
                raise TypeError(f"{name} is a {type(x).__name__}, expected a tensor")
        for name, x in (("student_patch_logits", student), ("teacher_patch_logits", teacher)):
            if not x.is_floating_point():
                raise TypeError(f"{name} has dtype {x.dtype}, expected a floating-point (M, K) tensor")
            if x.ndim != 2 or x.shape[1] != self.out_dim:
                raise ValueError(f"{name} has shape {tuple(x.shape)}, expected (M, out_dim={self.out_dim}): "
                                 "one row per masked patch")
        if teacher.shape != student.shape:
            raise ValueError(f"teacher_patch_logits has shape {tuple(teacher.shape)} but student_patch_logits "
                             f"{tuple(student.shape)}; expected the same masked patches in the same order")
        if masks.dtype != torch.bool:
            raise TypeError(f"masks has dtype {masks.dtype}, expected a (2B, N) bool tensor")
        if masks.ndim != 2 or masks.shape[0] < 1:
            raise ValueError(f"masks has shape {tuple(masks.shape)}, expected (2B, N) with 2B >= 1: "
                             "one row of patch masks per global crop")
        if not (student.device == teacher.device == masks.device):
            raise ValueError(f"student_patch_logits, teacher_patch_logits and masks are on {student.device}, "
                             f"{teacher.device} and {masks.device}; expected one device")

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        key = prefix + "center"
        center = state_dict.get(key)
        if isinstance(center, Tensor) and center.ndim == 3 and center.shape[:2] == (1, 1):
            # DINOv2's iBOTPatchLoss keeps its centre as (1, 1, K): the same numbers as our (1, K).
            state_dict[key] = center.reshape(1, -1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        fields = {"student_temp": self.student_temp, **self._targets_repr()}
        return ", ".join(f"{k}={v!r}" for k, v in fields.items())
