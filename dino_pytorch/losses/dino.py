"""DINOLoss: teacher targets (centre or Sinkhorn-Knopp, sharpened) and the multi-view cross-entropy."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Literal, Optional

import torch
from torch import Tensor

from ..ops import fused_last_layer_cross_entropy, multiview_cross_entropy, split_views
from ..ops.views import MultiView
from ..validate import check_int, check_positive_float, check_positive_int
from .targets import TeacherTargets


class DINOLoss(TeacherTargets):
    """The DINO loss of Caron et al. (2021), numerically compatible with the official one.

    ``P_t = softmax((g_t - c) / tau_t)``, ``log P_s = log_softmax(g_s / tau_s)``, and the loss is the
    mean over all (teacher view i, student view v != i) pairs of ``E_batch[-<P_t^i, log P_s^v>]``.
    The centre ``c`` is an EMA of the raw teacher logits (all ranks' rows) and the loss always uses
    the centre from before this step's update.

    The constructor takes the official positional signature, so ``DINOLoss(out_dim, ncrops,
    warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)`` is a drop-in swap;
    ``DINOLoss(65536)`` works too (constant teacher temperature 0.04).

    Args:
        out_dim: K, the number of prototypes.
        ncrops: total number of student views V; checked when given, and used to split concatenated
            (V*B, K) input (see :mod:`dino_pytorch.ops.views` for how B is found); ``None`` infers it.
        warmup_teacher_temp: teacher temperature at epoch 0 of the warm-up.
        teacher_temp: teacher temperature after the warm-up.
        warmup_teacher_temp_epochs: length of the linear warm-up (endpoint included, as official).
        nepochs: schedule length; an ``epoch >= nepochs`` raises. ``None``: the temperature stays
            at ``teacher_temp`` after the warm-up for ever.
        student_temp: tau_s.
        center_momentum: EMA momentum m of the centre, ``c <- m c + (1 - m) mean(g_t)``.
        centering: ``"centering"`` (official EMA centre) or ``"sinkhorn_knopp"`` (DINOv2; the centre
            is then neither used nor updated).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (DINOv2: 3).
        center_update: ``"forward"`` (official: every training-mode forward updates the centre) or
            ``"manual"``: forwards only accumulate the teacher statistics and :meth:`update_center`
            applies them once, e.g. once per optimizer step under gradient accumulation, where
            4 micro-batches of B then give the same centre as one batch of 4B.
        on_nonfinite: what a non-finite loss does besides being flagged (``self.nonfinite``, see
            :mod:`dino_pytorch.nonfinite`) and leaving the centre unchanged: ``"warn"`` (a
            RuntimeWarning at once on the CPU; on CUDA the caller reads the flags where it syncs
            anyway) or ``"raise"`` (:class:`~dino_pytorch.nonfinite.NonFiniteError` at once; on
            CUDA this reads the flag every forward, one host sync).

    Shapes:
        student_output: (V*B, K) crop-major (rows [vB:(v+1)B] are view v), or a list of V (B, K).
        teacher_output: (T*B, K) crop-major, or a list of T (B, K), T <= V. Teacher view i is the
            same image view as student view i, and those pairs are skipped.
        returns: a 0-dim float32 tensor.
    """

    def __init__(
        self,
        out_dim: int,
        ncrops: Optional[int] = None,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        nepochs: Optional[int] = None,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        *,
        centering: Literal["centering", "sinkhorn_knopp"] = "centering",
        sinkhorn_iterations: int = 3,
        center_update: Literal["forward", "manual"] = "forward",
        on_nonfinite: Literal["warn", "raise"] = "warn",
    ) -> None:
        super().__init__(out_dim, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
                         center_momentum, centering, sinkhorn_iterations, center_update, on_nonfinite)
        # DINO needs two views: ncrops (when given) is at least 2.
        self.ncrops = ncrops if ncrops is None else check_int("ncrops", ncrops, 2)
        self.student_temp = check_positive_float("student_temp", student_temp)

    def teacher_probs(self, teacher_views: Sequence[Tensor], teacher_temp: float) -> list[Tensor]:
        """Teacher targets for each teacher view: list of (B, K) float32 probabilities."""
        return list(self.targets(torch.cat(list(teacher_views)), teacher_temp).chunk(len(teacher_views)))

    def forward(
        self,
        student_output: MultiView,
        teacher_output: MultiView,
        epoch: Optional[int] = None,
        *,
        teacher_temp: Optional[float] = None,
        num_teacher_views: Optional[int] = None,
    ) -> Tensor:
        """Loss of the student views against the teacher views; see the class docstring for shapes.

        Args:
            student_output: (V*B, K) or list of V (B, K) student logits.
            teacher_output: (T*B, K) or list of T (B, K) teacher logits (T <= V).
            epoch: index into the teacher temperature schedule (official semantics).
            teacher_temp: a temperature for this call, overriding the schedule (per-step schedules).
            num_teacher_views: T, to split a concatenated ``teacher_output``; without it (and
                without ``ncrops``) two concatenated inputs are read as the official T = 2.
        """
        if num_teacher_views is not None:
            num_teacher_views = check_positive_int("num_teacher_views", num_teacher_views)
        layout = split_views(student_output, teacher_output, num_student_views=self.ncrops,
                             num_teacher_views=num_teacher_views, out_dim=self.out_dim,
                             names=("student_output", "teacher_output"))
        # stacklevel 8: warn, _report_now, _finish_forward, _loss, forward, Module._call_impl,
        # Module._wrapped_call_impl, then the line that called criterion(...).
        def cross_entropy(probs: Tensor) -> Tensor:
            loss: Tensor = multiview_cross_entropy(layout.student, probs, self.student_temp)
            return loss

        return self._loss(layout.teacher, cross_entropy, epoch, teacher_temp, stacklevel=8)

    def forward_fused_head(
        self, bottleneck: Tensor, weight_v: Tensor, weight_g: Tensor, teacher_output: Tensor,
        epoch: Optional[int] = None, *, teacher_temp: Optional[float] = None, num_teacher_views: int = 2,
    ) -> Tensor:
        """:meth:`forward` of ``last_layer(bottleneck)`` without the (V*B, K) logits ever existing at once.

        The last layer is a weight-normalised, bias-free linear (:class:`~dino_pytorch.DINOHead`'s),
        applied block by block inside the loss (:func:`~dino_pytorch.ops.fused_last_layer_cross_entropy`).

        Args:
            bottleneck: (V*B, D) crop-major L2-normalised features (``DINOHead.forward_bottleneck``).
            weight_v: (K, D) direction of the last layer.
            weight_g: (K, 1) gain of the last layer.
            teacher_output: (T*B, K) crop-major teacher logits.
            epoch: as :meth:`forward`.
            teacher_temp: as :meth:`forward`.
            num_teacher_views: T.
        """
        num_teacher_views = check_positive_int("num_teacher_views", num_teacher_views)
        rows = teacher_output.shape[0] if teacher_output.ndim == 2 else -1
        if rows % num_teacher_views or teacher_output.shape[-1] != self.out_dim:
            raise ValueError(f"teacher_output has shape {tuple(teacher_output.shape)}, expected "
                             f"({num_teacher_views}*B, out_dim={self.out_dim}) crop-major rows")
        teacher = teacher_output.unflatten(0, (num_teacher_views, -1))
        num_views = bottleneck.shape[0] // max(teacher.shape[1], 1)
        return self._loss(teacher, lambda probs: fused_last_layer_cross_entropy(
            bottleneck, weight_v, weight_g, probs, self.student_temp, num_views), epoch, teacher_temp, stacklevel=6)

    def _loss(self, teacher: Tensor, cross_entropy: Callable[[Tensor], Tensor], epoch: Optional[int],
              teacher_temp: Optional[float], stacklevel: int) -> Tensor:
        """Targets of the (T, B, K) teacher logits, ``cross_entropy(targets)``, the non-finite rule and
        the centre statistics: the one path of both forwards."""
        self._start_forward()
        temp = self._temperature(epoch, teacher_temp)
        # One (T*B, K) tensor of teacher logits: the concatenated input itself when given so (a view).
        teacher_rows = teacher.flatten(0, 1)
        probs = self.targets(teacher_rows, temp)  # centre from before this step's update
        loss = cross_entropy(probs.unflatten(0, teacher.shape[:2]))
        self._finish_forward(loss, probs, teacher_rows, stacklevel=stacklevel)
        return loss

    def extra_repr(self) -> str:
        fields = {"ncrops": self.ncrops, "student_temp": self.student_temp, **self._targets_repr()}
        return ", ".join(f"{k}={v!r}" for k, v in fields.items())
