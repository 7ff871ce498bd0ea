"""Teacher targets: the centre (EMA) or Sinkhorn-Knopp, the temperature schedule, the non-finite rule.

What DINO's image-level loss and iBOT's patch loss share on the teacher side. :class:`TeacherTargets`
is their base: it holds the centre (state_dict key ``center``, as the official ``dino_loss``
entry), the pending centre statistics and the non-finite flags, and turns raw teacher logits into
float32 targets. The cross-entropy against those targets lives in :mod:`dino_pytorch.ops`.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn

from .. import distributed
from ..nonfinite import NonFiniteError, NonFiniteFlags
from ..ops import centered_teacher_softmax, teacher_column_sum
from ..schedules import teacher_temp_schedule
from ..validate import (
    check_choice,
    check_int,
    check_optional_positive_int,
    check_positive_float,
    check_positive_int,
    check_probability,
)


def _logsumexp_all_ranks(x: Tensor, dim: Optional[int]) -> Tensor:
    """logsumexp over ``dim`` (None: everything) and over all ranks' entries along it."""
    if x.numel() == 0:
        # A rank without rows (iBOT: no masked patch in its batch) still joins every collective:
        # -inf, the identity of the max, stands in for the max that amax() refuses to take.
        shape = () if dim is None else x.shape[:dim] + (1,) + x.shape[dim + 1:]
        shift = x.new_full(shape, -math.inf)
    else:
        shift = (x.amax() if dim is None else x.amax(dim=dim, keepdim=True)).detach().clone()
    distributed.all_reduce_max(shift)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    total = torch.exp(x - shift)
    total = total.sum() if dim is None else total.sum(dim=dim, keepdim=True)
    distributed.all_reduce_sum(total)
    return shift + torch.log(total)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, num_iterations: int = 3) -> Tensor:
    """Sinkhorn-Knopp teacher targets, as in DINOv2, in float32, over all ranks' rows.

    Args:
        teacher_logits: (N, K) logits of all teacher views of this rank, any floating dtype; N may be
            0 (the rank still joins the all-reduces, so other ranks' rows are normalised as usual).
        teacher_temp: tau_t > 0.
        num_iterations: alternating prototype/sample normalisations (DINOv2 uses 3).

    Returns:
        (N, K) float32 rows, each summing to 1 after the final sample normalisation.

    The same iteration as DINOv2's ``exp`` / divide loop, carried out on logarithms: identical in
    exact arithmetic, but ``exp(t / tau)`` can neither overflow to inf nor underflow a whole sample
    to 0 (both of which turn DINOv2's version into NaN for large logits).
    """
    log_q = (teacher_logits.float() / teacher_temp).t()  # (K, N): prototypes x samples
    num_prototypes = log_q.shape[0]
    num_samples = torch.tensor([float(log_q.shape[1])], device=log_q.device)
    distributed.all_reduce_sum(num_samples)
    log_k, log_n = math.log(num_prototypes), torch.log(num_samples)
    log_q = log_q - _logsumexp_all_ranks(log_q, None)
    for _ in range(num_iterations):
        log_q = log_q - _logsumexp_all_ranks(log_q, 1) - log_k
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - log_n
    return torch.exp(log_q + log_n).t()


class TeacherTargets(nn.Module):
    """Base of the losses that sharpen and centre a teacher: see the module docstring.

    Args:
        out_dim: K, the number of prototypes.
        warmup_teacher_temp: teacher temperature at epoch 0 of the warm-up.
        teacher_temp: teacher temperature after the warm-up.
        warmup_teacher_temp_epochs: length of the linear warm-up (endpoint included, as official).
        nepochs: schedule length; an ``epoch >= nepochs`` raises; ``None``: ``teacher_temp`` for ever
            after the warm-up.
        center_momentum: EMA momentum m of the centre, ``c <- m c + (1 - m) mean(g_t)``.
        centering: ``"centering"`` (official EMA centre) or ``"sinkhorn_knopp"`` (DINOv2; the centre
            is then neither used nor updated).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (DINOv2: 3).
        center_update: ``"forward"`` (every training-mode forward updates the centre) or ``"manual"``
            (forwards accumulate, :meth:`update_center` applies once per optimizer step).
        on_nonfinite: ``"warn"`` or ``"raise"`` (:class:`~dino_pytorch.nonfinite.NonFiniteError`) at
            once on a non-finite loss (on CUDA ``"raise"`` reads the flag every forward: one sync).
    """

    center: Tensor

    def __init__(
        self, out_dim: int, warmup_teacher_temp: float, teacher_temp: float, warmup_teacher_temp_epochs: int,
        nepochs: Optional[int], center_momentum: float, centering: Literal["centering", "sinkhorn_knopp"],
        sinkhorn_iterations: int, center_update: Literal["forward", "manual"], on_nonfinite: Literal["warn", "raise"],
    ) -> None:
        super().__init__()
        self.out_dim = out_dim = check_positive_int("out_dim", out_dim)
        warmup_teacher_temp_epochs = check_int("warmup_teacher_temp_epochs", warmup_teacher_temp_epochs, 0)
        self.nepochs = nepochs = check_optional_positive_int("nepochs", nepochs)
        self.teacher_temp = check_positive_float("teacher_temp", teacher_temp)
        self.warmup_teacher_temp = check_positive_float("warmup_teacher_temp", warmup_teacher_temp)
        self.center_momentum = check_probability("center_momentum", center_momentum)
        self.centering = check_choice("centering", centering, ("centering", "sinkhorn_knopp"))
        self.sinkhorn_iterations = check_positive_int("sinkhorn_iterations", sinkhorn_iterations)
        self.center_update = check_choice("center_update", center_update, ("forward", "manual"))
        self.on_nonfinite = check_choice("on_nonfinite", on_nonfinite, ("warn", "raise"))
        # Device-side flags of non-finite forwards: they gate the centre update, the EMA and the step.
        self.nonfinite = NonFiniteFlags()
        # Plain Python floats, not a numpy array: no host round trip, and torch.compile friendly.
        length = nepochs if nepochs is not None else warmup_teacher_temp_epochs
        self.teacher_temp_schedule = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, length
        )
        self._needs_epoch = warmup_teacher_temp_epochs > 0 and warmup_teacher_temp != teacher_temp
        self.register_buffer("center", torch.zeros(1, out_dim))
        # Pending centre statistics are plain tensor attributes, not buffers: not in the state_dict
        # (so an official `dino_loss` entry loads as is), and not broadcast by DDP from rank 0 at
        # every forward (which would drop the other ranks' micro-batches under accumulation). The
        # count is a tensor, not an int that changes every call (torch.compile would re-trace).
        self._center_sum = torch.zeros(1, out_dim)
        self._center_count = torch.zeros((), dtype=torch.int64)

    def _apply(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        super()._apply(fn, *args, **kwargs)
        # Follow the centre's device only: the statistics stay float32 / int64 whatever .half() does.
        device = self.center.device
        self._center_sum = self._center_sum.to(device)
        self._center_count = self._center_count.to(device)
        self.nonfinite.to(device)
        return self

    def teacher_temp_at(self, epoch: Optional[int]) -> float:
        """The scheduled teacher temperature for ``epoch`` (an int, as official)."""
        if epoch is None:
            if self._needs_epoch:
                raise ValueError("epoch=None, but a teacher temperature warm-up is configured: pass epoch= "
                                 "(an int) or teacher_temp= to forward()")
            return self.teacher_temp
        epoch = check_int("epoch", epoch, 0)
        if self.nepochs is not None and epoch >= self.nepochs:
            raise ValueError(f"epoch={epoch} is beyond the teacher temperature schedule of nepochs={self.nepochs}; "
                             f"expected 0 <= epoch < {self.nepochs}")
        if epoch < len(self.teacher_temp_schedule):
            return self.teacher_temp_schedule[epoch]
        return self.teacher_temp

    def _temperature(self, epoch: Optional[int], teacher_temp: Optional[float]) -> float:
        """A forward's temperature: ``teacher_temp`` when given, else the schedule at ``epoch``."""
        if teacher_temp is None:
            return self.teacher_temp_at(epoch)
        return check_positive_float("teacher_temp", teacher_temp)

    def targets(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """(N, K) float32 targets of (N, K) raw teacher logits: centred softmax with the centre from
        before this step's update, or Sinkhorn-Knopp over all ranks' rows."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_logits, teacher_temp, self.sinkhorn_iterations)
        return centered_teacher_softmax(teacher_logits, self.center, teacher_temp)

    @torch.no_grad()
    def accumulate_center(self, teacher_logits: Tensor) -> None:
        """Add the (N, K) raw teacher logits' row sum to the pending centre statistics (no update yet)."""
        self._center_sum.add_(teacher_column_sum(teacher_logits))  # fp32 accumulation, no fp32 copy
        self._center_count.add_(teacher_logits.shape[0])

    @torch.no_grad()
    def update_center(self) -> None:
        """Apply the pending statistics: ``c <- m c + (1 - m) mean`` over all ranks' rows.

        With a process group, row sums and counts are summed over ranks first, so the mean is exact
        even when ranks hold different batch sizes. A no-op when nothing is pending (on all ranks
        together: every rank must call it) and when a forward since the last update was non-finite
        (on any rank): the centre is never poisoned by a NaN or inf teacher logit.
        """
        total, count = self._center_sum, self._center_count
        bad = self.nonfinite.found.to(total.dtype).reshape(1)
        if distributed.is_distributed() and distributed.get_world_size() > 1:
            packed = torch.cat([total.flatten(), count.to(total.dtype).reshape(1), bad])
            distributed.all_reduce_sum(packed)
            total, count, bad = packed[:-2].reshape(1, -1), packed[-2], packed[-1:]
        # Checked on the sums (O(K)), not the logits: a non-finite teacher logit reaches its column sum.
        ok = (count > 0) & (bad == 0).all() & torch.isfinite(total).all()
        batch_center = total / count.clamp(min=1)
        m = self.center_momentum
        # Same op order as official (c*m + b*(1-m)); nothing pending is a select, not an `if` on the
        # count: that would sync the device and break torch.compile graphs.
        updated = self.center * m + batch_center * (1 - m)
        self.center.copy_(torch.where(ok, updated, self.center))  # in place: buffer identity kept
        self._center_sum.zero_()
        self._center_count.zero_()
        if self.center_update == "manual":
            self.nonfinite.reset()

    def _start_forward(self) -> None:
        if self.center_update == "forward":
            self.nonfinite.reset()  # the flags describe this forward (manual: since update_center)

    def _finish_forward(self, loss: Tensor, targets: Tensor, teacher_logits: Tensor, stacklevel: int) -> None:
        """The non-finite rule for this forward's ``loss``, then the centre statistics (training only).

        ``stacklevel``: the warning's, so that it points at the line that called the loss.
        """
        bad = self.nonfinite.record(loss, targets)
        if (self.on_nonfinite == "raise" or loss.device.type == "cpu") and not torch.compiler.is_compiling():
            # Reading the flag costs nothing on the CPU; on CUDA only when asked to stop at once.
            # Inside a compiled graph the flags are only recorded (reading one would break it).
            self._report_now(bad, stacklevel)
        if self.training and self.centering == "centering":
            self.accumulate_center(teacher_logits)
            if self.center_update == "forward":
                self.update_center()

    def _report_now(self, bad: Tensor, stacklevel: int) -> None:
        if not bool(bad):
            return
        message = f"{type(self).__name__}: " + (self.nonfinite.report() or "non-finite loss")
        if self.on_nonfinite == "raise":
            raise NonFiniteError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)

    def _targets_repr(self) -> dict[str, Any]:
        return {"out_dim": self.out_dim, "teacher_temp": self.teacher_temp, "centering": self.centering,
                "center_momentum": self.center_momentum, "center_update": self.center_update}
