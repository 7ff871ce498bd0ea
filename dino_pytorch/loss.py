"""DINOLoss: centring (or Sinkhorn-Knopp), sharpening and the multi-view cross-entropy."""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal, Optional, Union

import torch
from torch import Tensor, nn

from . import distributed
from .nonfinite import NonFiniteError, NonFiniteFlags
from .ops import centered_teacher_softmax, multiview_cross_entropy, sinkhorn_knopp, teacher_column_sum
from .schedules import teacher_temp_schedule
from .validate import (
    check_choice,
    check_int,
    check_optional_positive_int,
    check_positive_float,
    check_positive_int,
    check_probability,
)

Views = Union[Tensor, Sequence[Tensor]]


class DINOLoss(nn.Module):
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
        ncrops: total number of student views V. Needed only to split concatenated (V*B, K) input
            when it is not the official layout of 2 teacher views; ``None`` infers it.
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

    center: Tensor

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
        super().__init__()
        self.out_dim = out_dim = check_positive_int("out_dim", out_dim)
        # DINO needs two views: ncrops (when given) is at least 2.
        self.ncrops = ncrops if ncrops is None else check_int("ncrops", ncrops, 2)
        warmup_teacher_temp_epochs = check_int("warmup_teacher_temp_epochs", warmup_teacher_temp_epochs, 0)
        self.nepochs = nepochs = check_optional_positive_int("nepochs", nepochs)
        self.student_temp = check_positive_float("student_temp", student_temp)
        self.teacher_temp = check_positive_float("teacher_temp", teacher_temp)
        self.warmup_teacher_temp = check_positive_float("warmup_teacher_temp", warmup_teacher_temp)
        self.center_momentum = check_probability("center_momentum", center_momentum)
        self.centering = check_choice("centering", centering, ("centering", "sinkhorn_knopp"))
        self.sinkhorn_iterations = check_positive_int("sinkhorn_iterations", sinkhorn_iterations)
        self.center_update = check_choice("center_update", center_update, ("forward", "manual"))
        self.on_nonfinite = check_choice("on_nonfinite", on_nonfinite, ("warn", "raise"))
        # Device-side flags of non-finite forwards (see dino_pytorch.nonfinite): they gate the
        # centre update, and DINO's EMA and optimizer step.
        self.nonfinite = NonFiniteFlags()
        # Plain Python floats, not a numpy array: no host round trip, and torch.compile friendly.
        length = nepochs if nepochs is not None else warmup_teacher_temp_epochs
        self.teacher_temp_schedule = teacher_temp_schedule(
            warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, length
        )
        self._needs_epoch = warmup_teacher_temp_epochs > 0 and warmup_teacher_temp != teacher_temp
        self.register_buffer("center", torch.zeros(1, out_dim))
        # Pending centre statistics are plain tensor attributes, not buffers: not in the state_dict
        # (so `center` stays its only entry and an official `dino_loss` entry loads as is), and
        # not broadcast by DDP from rank 0 at every forward (which would drop the other ranks'
        # micro-batches under gradient accumulation). `_apply` moves them with the module. The
        # count is a tensor, not a Python int: an int that changes every call makes torch.compile
        # re-trace (and fail under fullgraph=True) in center_update="manual" mode.
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

    # -- teacher temperature -------------------------------------------------------------------
    def teacher_temp_at(self, epoch: Optional[int]) -> float:
        """The scheduled teacher temperature for ``epoch`` (an int, as official)."""
        if epoch is None:
            if self._needs_epoch:
                raise ValueError(
                    "epoch=None, but a teacher temperature warm-up is configured: pass epoch= "
                    "(an int) or teacher_temp= to forward()"
                )
            return self.teacher_temp
        epoch = check_int("epoch", epoch, 0)
        if self.nepochs is not None and epoch >= self.nepochs:
            raise ValueError(
                f"epoch={epoch} is beyond the teacher temperature schedule of nepochs={self.nepochs}; "
                f"expected 0 <= epoch < {self.nepochs}"
            )
        if epoch < len(self.teacher_temp_schedule):
            return self.teacher_temp_schedule[epoch]
        return self.teacher_temp

    # -- input handling ------------------------------------------------------------------------
    def _split(
        self, name: str, output: Views, num_views: Optional[int] = None, batch: Optional[int] = None
    ) -> list[Tensor]:
        """Per-view (B, K) tensors of ``output``; a concatenated tensor is cut by view count or by B."""
        if isinstance(output, Tensor):
            if output.ndim != 2:
                raise ValueError(f"{name} has shape {tuple(output.shape)}, expected (views*B, {self.out_dim})")
            rows = output.shape[0]
            if num_views is None:
                num_views = rows // batch if batch else 0
            if num_views < 1 or rows % num_views != 0 or (batch is not None and rows != num_views * batch):
                what = f"views of batch size {batch}" if batch is not None else f"{num_views} views"
                raise ValueError(
                    f"{name} has {rows} rows, which do not split into {what}; "
                    "expected crop-major (views*B, K) rows"
                )
            views = list(output.chunk(num_views))
        elif isinstance(output, (list, tuple)):
            views = list(output)
            if not all(isinstance(v, Tensor) for v in views):
                types = sorted({type(v).__name__ for v in views})
                raise TypeError(f"{name} is a list holding {types}, expected a list of (B, K) tensors")
            if not views:
                raise ValueError(f"{name} is an empty list, expected (B, K) tensors")
        else:
            raise TypeError(f"{name} is a {type(output).__name__}, expected a Tensor or a list of Tensors")
        for i, v in enumerate(views):
            if v.ndim != 2 or v.shape[-1] != self.out_dim:
                raise ValueError(
                    f"{name} view {i} has shape {tuple(v.shape)}, expected (B, out_dim={self.out_dim})"
                )
            if not v.is_floating_point():
                raise TypeError(f"{name} view {i} has dtype {v.dtype}, expected a floating dtype (logits)")
        return views

    def _views(
        self, student_output: Views, teacher_output: Views, num_teacher_views: Optional[int] = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        if num_teacher_views is not None:
            num_teacher_views = check_positive_int("num_teacher_views", num_teacher_views)
            concatenated = isinstance(teacher_output, Tensor)
            teacher = self._split(
                "teacher_output", teacher_output, num_views=num_teacher_views if concatenated else None
            )
            if len(teacher) != num_teacher_views:
                raise ValueError(
                    f"teacher_output has {len(teacher)} views, expected num_teacher_views={num_teacher_views}"
                )
            student = self._split("student_output", student_output, num_views=self.ncrops, batch=teacher[0].shape[0])
        elif not isinstance(student_output, Tensor) or self.ncrops is not None:
            student = self._split("student_output", student_output, num_views=self.ncrops)
            teacher = self._split("teacher_output", teacher_output, batch=student[0].shape[0])
        elif not isinstance(teacher_output, Tensor):
            teacher = self._split("teacher_output", teacher_output)
            student = self._split("student_output", student_output, batch=teacher[0].shape[0])
        else:
            # Both concatenated and no view count given: the official layout, two global teacher views.
            teacher = self._split("teacher_output", teacher_output, num_views=2)
            student = self._split("student_output", student_output, batch=teacher[0].shape[0])
        if self.ncrops is not None and len(student) != self.ncrops:
            raise ValueError(f"student_output has {len(student)} views, expected ncrops={self.ncrops}")
        batch_sizes = [v.shape[0] for v in student] + [v.shape[0] for v in teacher]
        if len(set(batch_sizes)) != 1:
            raise ValueError(
                f"views have mismatched batch sizes: student {[v.shape[0] for v in student]}, "
                f"teacher {[v.shape[0] for v in teacher]}; expected one batch size B"
            )
        if batch_sizes[0] == 0:
            raise ValueError("views have batch size 0, expected B >= 1 (a mean over no rows is NaN)")
        if len(student) < 2:
            raise ValueError(
                f"student_output has {len(student)} view(s) in total, expected at least 2: "
                "DINO compares different views of an image"
            )
        if len(teacher) > len(student):
            raise ValueError(
                f"teacher_output has {len(teacher)} views but student_output only {len(student)}; "
                "expected the teacher views to be the first student views"
            )
        return student, teacher

    # -- centre --------------------------------------------------------------------------------
    @torch.no_grad()
    def accumulate_center(self, teacher_output: Views) -> None:
        """Add the teacher logits' row sum to the pending centre statistics (no update yet).

        Args:
            teacher_output: (N, K) raw teacher logits, or a list of (B, K).
        """
        views = [teacher_output] if isinstance(teacher_output, Tensor) else list(teacher_output)
        for v in views:
            self._center_sum.add_(teacher_column_sum(v))  # fp32 accumulation, no fp32 copy of v
            self._center_count.add_(v.shape[0])

    @torch.no_grad()
    def update_center(self) -> None:
        """Apply the pending statistics: ``c <- m c + (1 - m) mean`` over all ranks' rows.

        With a process group, the row sums and row counts are summed over ranks first, so the mean
        is exact even when ranks hold different batch sizes. A no-op when nothing is pending (on
        all ranks together: with a process group every rank must call it, as every rank steps), and
        when a forward since the last update was non-finite (on any rank): the centre is never
        poisoned by a NaN or inf teacher logit.
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
        # Same op order as official (c*m + b*(1-m)). Nothing pending is handled by a select, not an
        # `if` on the count: that would sync the device and break torch.compile graphs.
        updated = self.center * m + batch_center * (1 - m)
        self.center.copy_(torch.where(ok, updated, self.center))  # in place: buffer identity kept
        self._center_sum.zero_()
        self._center_count.zero_()
        if self.center_update == "manual":
            self.nonfinite.reset()

    # -- forward -------------------------------------------------------------------------------
    def teacher_probs(self, teacher_views: Sequence[Tensor], teacher_temp: float) -> list[Tensor]:
        """Teacher targets for each teacher view: list of (B, K) float32 probabilities."""
        return list(self._teacher_prob_stack(teacher_views, teacher_temp).unbind(0))

    def _teacher_prob_stack(
        self, teacher_views: Sequence[Tensor], teacher_temp: float, rows: Optional[Tensor] = None
    ) -> Tensor:
        """(T, B, K) float32 targets; ``rows`` is the (T*B, K) concatenation when the caller has it."""
        if rows is None:
            rows = torch.cat(list(teacher_views))
        if self.centering == "sinkhorn_knopp":
            q = sinkhorn_knopp(rows, teacher_temp, self.sinkhorn_iterations)
        else:
            q = centered_teacher_softmax(rows, self.center, teacher_temp)  # one launch for all views
        return q.unflatten(0, (len(teacher_views), -1))

    def forward(
        self,
        student_output: Views,
        teacher_output: Views,
        epoch: Optional[int] = None,
        *,
        teacher_temp: Optional[float] = None,
        num_teacher_views: Optional[int] = None,
        overwrite_logits: bool = False,
    ) -> Tensor:
        """Loss of the student views against the teacher views; see the class docstring for shapes.

        Args:
            student_output: (V*B, K) or list of V (B, K) student logits.
            teacher_output: (T*B, K) or list of T (B, K) teacher logits (T <= V).
            epoch: index into the teacher temperature schedule (official semantics).
            teacher_temp: a temperature for this call, overriding the schedule (per-step schedules).
            num_teacher_views: T, to split a concatenated ``teacher_output``; without it (and
                without ``ncrops``) two concatenated inputs are read as the official T = 2.
            overwrite_logits: promise that nothing reads ``student_output`` after this call (a
                head's output that feeds only this loss): on the CPU the loss then computes its
                gradient in the same pass and writes it over the logits (see
                :func:`~dino_pytorch.ops.multiview_cross_entropy`). :class:`~dino_pytorch.DINO`
                passes it for its own head's output. A list of views is stacked into a new tensor,
                which is overwritten in any case.
        """
        student, teacher = self._views(student_output, teacher_output, num_teacher_views)
        if self.center_update == "forward":
            self.nonfinite.reset()  # the flags describe this forward (manual: since update_center)
        if teacher_temp is None:
            temp = self.teacher_temp_at(epoch)
        else:
            temp = check_positive_float("teacher_temp", teacher_temp)
        concatenated = teacher_output if isinstance(teacher_output, Tensor) else None
        probs = self._teacher_prob_stack(teacher, temp, concatenated)  # centre from before this step
        # The concatenated (V*B, K) logits go in as they are: the fused loss saves that very tensor
        # (alive anyway for the head's backward) instead of a stacked copy.
        rows = student_output if isinstance(student_output, Tensor) else torch.stack(student)
        overwrite = overwrite_logits or not isinstance(student_output, Tensor)  # a stack is ours
        loss = multiview_cross_entropy(rows, probs, self.student_temp, overwrite_logits=overwrite)
        bad = self.nonfinite.record(loss, probs)
        if (self.on_nonfinite == "raise" or loss.device.type == "cpu") and not torch.compiler.is_compiling():
            # Reading the flag costs nothing on the CPU; on CUDA only when asked to stop at once.
            # Inside a compiled graph the flags are only recorded (reading one would break it).
            self._report_now(bad)
        if self.training and self.centering == "centering":
            # One sum over the concatenated rows when we have them, exactly as official.
            self.accumulate_center(teacher_output if isinstance(teacher_output, Tensor) else teacher)
            if self.center_update == "forward":
                self.update_center()
        return loss

    def _report_now(self, bad: Tensor) -> None:
        if not bool(bad):
            return
        message = "DINOLoss: " + (self.nonfinite.report() or "non-finite loss")
        if self.on_nonfinite == "raise":
            raise NonFiniteError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=5)  # the caller of criterion(...)

    def extra_repr(self) -> str:
        return (
            f"out_dim={self.out_dim}, ncrops={self.ncrops}, student_temp={self.student_temp}, "
            f"teacher_temp={self.teacher_temp}, centering={self.centering!r}, "
            f"center_momentum={self.center_momentum}, center_update={self.center_update!r}"
        )
