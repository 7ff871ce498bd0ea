"""Memory-lean multi-view cross-entropy: a custom autograd Function with a closed-form backward.

For student view ``s`` (logits ``z_s``, temperature ``tau``) and ``Q_s`` the sum of the teacher
probabilities of the other views, each row contributes ``-<Q_s, log softmax(z_s / tau)>``, and

    dL/dz_s = (|Q_s| * softmax(z_s / tau) - Q_s) / tau * g / (B * n_pairs),   n_pairs = T * (V - 1)

where ``|Q_s|`` is the row sum of ``Q_s`` (``n_s``, the number of teacher views paired with ``s``,
for probability rows). So backward needs only the logits (alive anyway for the head's backward),
the teacher probabilities and per-row statistics; no (V, B, K) log-probability tensor is saved.

The two engines keep different statistics:

- ``"torch"`` (below) saves only ``|Q_s|`` per row. Forward is ``log_softmax(x / tau)`` per
  (rows, K) block and backward recomputes ``softmax(x / tau)`` per block, both with PyTorch's
  fused kernels: the official numerics, and few passes over memory.
- ``"triton"`` (:mod:`.triton_kernels`, CUDA) streams each row once and saves the row max ``m``,
  ``log sum exp(z - m)`` and ``|Q_s|``. Keeping ``(m, log_sum)`` rather than one ``lse`` lets
  backward compute ``exp((z - m) - log_sum)`` with ``z - m`` exact near the max (``exp(z - lse)``
  would cost ~1e-5 relative error for logits ~ 100). Its forward takes the loss relative to the
  max, ``CE = sum_k Q_k (m - z_k) + |Q| log sum_k exp(z_k - m)``: both terms are >= 0, so
  nothing cancels.

- ``"compiled"`` (:mod:`.closed_form`, CPU) evaluates the Triton engine's max-relative closed form
  as one ``torch.compile``-d kernel per direction (lazily compiled; an eager twin on failure) and
  saves one number per row, ``log sum exp(z - m)``; its gradient goes into a reused buffer
  (:mod:`.reused_buffer`).

With ``overwrite_logits`` (CPU engines) forward also computes the gradient, for a loss gradient
of 1, and writes it over the logits; backward returns that storage (scaled when the loss's
gradient is not 1). The compiled engine does both in one kernel.

:mod:`.dispatch` picks the engine.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import Tensor

from . import closed_form, reused_buffer
from .cross_entropy import other_view_targets

# Elements of one float32 (V, rows, K) student chunk: bounds the transient memory of the torch engine
# (a few such buffers live at once) independently of B.
CHUNK_ELEMENTS = 1 << 22


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for every input dtype except float64 (kept, e.g. for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_chunk_rows(num_views: int, num_classes: int) -> int:
    """Rows per block so one float32 (num_views, rows, K) block holds about ``CHUNK_ELEMENTS``."""
    return max(1, CHUNK_ELEMENTS // (num_views * num_classes))


def _targets_and_mass(teacher: Tensor, num_views: int) -> tuple[list[Tensor], Tensor]:
    """``Q_s`` for each student view (the local views share one tensor) and their (V, B) row sums."""
    targets = other_view_targets(list(teacher.unbind(0)), num_views)
    return targets, torch.stack(_once_per_tensor(lambda q: q.sum(dim=-1), targets))


def _once_per_tensor(fn: Any, tensors: list[Tensor]) -> list[Tensor]:
    """``[fn(t) for t in tensors]``, computing ``fn`` once per distinct tensor object."""
    done: dict[int, Tensor] = {}
    for t in tensors:
        if id(t) not in done:
            done[id(t)] = fn(t)
    return [done[id(t)] for t in tensors]


def _row_blocks(num_views: int, batch: int, k: int, chunk_rows: Optional[int]) -> Iterator[tuple[int, int, int]]:
    """(view, first row, last row) blocks of at most ``chunk_rows`` rows of one view."""
    chunk_rows = chunk_rows or default_chunk_rows(1, k)
    for v in range(num_views):
        for b0 in range(0, batch, chunk_rows):
            yield v, b0, min(b0 + chunk_rows, batch)


def torch_forward(
    student: Tensor, teacher: Tensor, student_temp: float, num_views: int, chunk_rows: Optional[int] = None
) -> tuple[Tensor, Tensor]:
    """Per-row cross-entropies of the fused loss, pure PyTorch, one (rows, K) block at a time.

    Each block is ``log_softmax(x / tau)`` (one fused kernel, the official numerics) times its
    target, summed over K; the block is freed before the next, so nothing of size (V, B, K) lives.

    Args:
        student: (V*B, K) crop-major logits, any floating dtype (upcast one block at a time).
        teacher: (T, B, K) probabilities in the compute dtype.
        student_temp: tau.
        num_views: V.
        chunk_rows: rows per block (default: about ``CHUNK_ELEMENTS`` elements per block).

    Returns:
        ``(ce, stats)`` in the compute dtype: ce (V*B,) the row cross-entropies ``-<Q_s, log p_s>``;
        stats (1, V*B) the row sums of ``Q_s`` (what backward needs besides the logits).
    """
    _, batch, k = teacher.shape
    dtype = compute_dtype(student.dtype)
    views = student.unflatten(0, (num_views, batch))
    targets, mass = _targets_and_mass(teacher, num_views)
    ce = torch.empty((num_views, batch), dtype=dtype, device=student.device)
    for v, b0, b1 in _row_blocks(num_views, batch, k, chunk_rows):
        log_p = torch.log_softmax(views[v, b0:b1].to(dtype) / student_temp, dim=-1)
        # Elementwise product + sum: a matmul/einsum reduction rounds worse (ln K must come out
        # to 1e-6 on all-zero logits).
        ce[v, b0:b1] = log_p.mul_(targets[v][b0:b1]).sum(dim=-1).neg_()
    return ce.flatten(), mass.reshape(1, -1)


def torch_backward(
    scale: Tensor,
    student: Tensor,
    teacher: Tensor,
    stats: Tensor,
    student_temp: float,
    num_views: int,
    chunk_rows: Optional[int] = None,
    out: Optional[Tensor] = None,
) -> Tensor:
    """``(mass * softmax(x / tau) - Q) * scale`` for every student row, in the student's dtype.

    Args:
        scale: 0-dim tensor ``g / (tau * B * n_pairs)`` in the compute dtype.
        student, teacher, student_temp, num_views, chunk_rows: as :func:`torch_forward`.
        stats: (1, V*B) target row sums from :func:`torch_forward`.
        out: where to write the gradient (e.g. ``student`` itself: each block is read before it is
            written); default a new tensor.

    Returns:
        (V*B, K) gradient, dtype of ``student``; the softmax is recomputed block by block with the
        fused kernel, so backward also holds only one (rows, K) float32 block at a time.
    """
    _, batch, k = teacher.shape
    dtype = compute_dtype(student.dtype)
    views = student.unflatten(0, (num_views, batch))
    # Scale the (at most T + 1 distinct) targets once, not once per block of every view.
    targets = _once_per_tensor(lambda q: q * scale, other_view_targets(list(teacher.unbind(0)), num_views))
    mass = stats.view(num_views, batch, 1) * scale
    if out is None:
        grad = torch.empty((num_views, batch, k), dtype=student.dtype, device=student.device)
    else:
        grad = out.view(num_views, batch, k)
    for v, b0, b1 in _row_blocks(num_views, batch, k, chunk_rows):
        p = torch.softmax(views[v, b0:b1].to(dtype) / student_temp, dim=-1)
        torch.sub(p.mul_(mass[v, b0:b1]), targets[v][b0:b1], out=grad[v, b0:b1])
    return grad.view(student.shape)


def _engine_forward(engine: str, *args: Any) -> tuple[Tensor, Tensor]:
    if engine == "triton":

        student, teacher, student_temp, num_views, _ = args
        return torch.ops.dino_pytorch.mvce_forward(student, teacher, student_temp, num_views)
    return torch_forward(*args)


def _engine_backward(engine: str, *args: Any) -> Tensor:
    if engine == "triton":
        from . import triton_kernels  # noqa: F401

        scale, student, teacher, stats, student_temp, num_views, _ = args
        return torch.ops.dino_pytorch.mvce_backward(scale, student, teacher, stats, student_temp, num_views)
    return torch_backward(*args)


def _row_lse(engine: str, student: Tensor, stats: Tensor, student_temp: float, num_views: int) -> Tensor:
    """(V*B,) float32 log-sum-exp of ``x / tau`` per student row, from what the engine already has."""
    if engine == "triton":  # stats = (row max, log sum exp(z - max), |Q|)
        return stats[0] + stats[1]
    # Eager log_softmax engine: one extra in-cache reduction, only when the statistics are asked for.
    return torch.cat([torch.logsumexp(block.float() / student_temp, dim=-1) for block in student.split(1 << 4)])


def _teacher_entropy(teacher: Tensor) -> Tensor:
    """(T*B,) ``-sum_k P log P`` of each teacher row (0 log 0 = 0)."""
    return -torch.special.xlogy(teacher, teacher).sum(dim=-1).flatten()


def _forward(
    ctx: Any, student: Tensor, teacher: Tensor, student_temp: float, num_views: int,
    chunk_rows: Optional[int], engine: str, overwrite: bool, want_stats: bool,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Shared forward of both Functions: ``(loss, lse or None, teacher entropy or None)``."""
    dtype = compute_dtype(student.dtype)
    teacher = teacher.detach().to(dtype)
    num_teacher, batch = teacher.shape[0], teacher.shape[1]
    normaliser = batch * num_teacher * (num_views - 1)
    overwrite = overwrite and student.device.type == "cpu" and ctx.needs_input_grad[0]
    lse = entropy = None
    if engine == "compiled":
        x = student.view(num_views, batch, -1)
        mask = closed_form.view_mask(num_views, num_teacher, student.device)
        if overwrite:
            coef = torch.full((), 1.0 / (student_temp * normaliser), dtype=dtype, device=student.device)
            outs = closed_form.compiled_loss_and_grad(x, teacher, mask, coef, student_temp, want_stats)
        else:
            outs = closed_form.compiled_forward(x, teacher, mask, student_temp, want_stats)
        ce, stats = outs[0].flatten(), outs[1]  # stats: (V, B) log sum exp(z - max), one per row
        if want_stats:
            lse, entropy = outs[2].flatten(), outs[3].flatten()
    else:
        ce, stats = _engine_forward(engine, student, teacher, student_temp, num_views, chunk_rows)
        if want_stats:
            lse, entropy = _row_lse(engine, student, stats, student_temp, num_views), _teacher_entropy(teacher)
        if overwrite:  # the torch engine's backward, now, into the logits
            coef = torch.full((), 1.0 / (student_temp * normaliser), dtype=dtype, device=student.device)
            torch_backward(coef, student, teacher, stats, student_temp, num_views, chunk_rows, out=student)
    if overwrite:
        # The logits now hold their gradient (for a loss gradient of 1): any other node that saved
        # them fails loudly on backward instead of reading it. Nothing else is saved.
        torch.autograd.graph.increment_version(student)
        ctx.save_for_backward(student)
    else:
        ctx.save_for_backward(student, teacher, stats)
    ctx.student_temp, ctx.num_views, ctx.chunk_rows, ctx.engine = student_temp, num_views, chunk_rows, engine
    ctx.normaliser, ctx.overwrite = normaliser, overwrite
    return ce.sum() / normaliser, lse, entropy


def _backward(ctx: Any, grad_output: Tensor) -> Optional[Tensor]:
    if not ctx.needs_input_grad[0]:
        return None
    if ctx.overwrite:
        try:
            (grad,) = ctx.saved_tensors
        except RuntimeError as err:  # the version check: the gradient in the logits was changed
            raise RuntimeError(
                "overwrite_logits: the logits, which hold their gradient since the loss's forward, were "
                "modified in place afterwards (by a later in-place op, or by a first backward that scaled "
                "them: retain_graph with a loss gradient other than 1); compute this loss without "
                "overwrite_logits"
            ) from err
        scale = grad_output.item()  # the CPU engines only: no device sync
        # Scaled in place (e.g. ``loss / grad_accum_steps``): a new tensor would cost the page faults
        # that overwriting avoids.
        return grad if scale == 1.0 else grad.mul_(scale)
    student, teacher, stats = ctx.saved_tensors
    # A tensor, not .item(): no host sync, and the Triton kernel reads it from device memory.
    scale = grad_output.to(stats.dtype) / (ctx.student_temp * ctx.normaliser)
    if ctx.engine == "compiled":
        x = student.view(ctx.num_views, teacher.shape[1], -1)
        mask = closed_form.view_mask(ctx.num_views, teacher.shape[0], student.device)
        # A reused buffer: a fresh 84 MB gradient costs more in page faults than in writing it.
        out = reused_buffer.empty(student.shape, student.dtype)
        closed_form.compiled_grad(out.view(x.shape), x, teacher, mask, stats, scale, ctx.student_temp)
        return out
    return _engine_backward(
        ctx.engine, scale, student, teacher, stats, ctx.student_temp, ctx.num_views, ctx.chunk_rows
    )


class MultiviewCrossEntropy(torch.autograd.Function):
    """Autograd Function of the DINO cross-entropy; use :func:`.dispatch.multiview_cross_entropy`.

    Inputs: student (V*B, K) crop-major logits (any floating dtype), teacher (T, B, K)
    probabilities, tau, V, chunk_rows (eager engines; None = default), the engine name
    (``"torch"``, ``"compiled"`` or ``"triton"``) and ``overwrite_logits`` (CPU engines: forward
    writes the gradient over the logits; the caller checks that this is safe).
    Output: 0-dim loss in the compute dtype (float32, or float64 for float64 logits).
    Saved for backward: the student logits (the input itself, no copy), the teacher probabilities in
    the compute dtype and the engine's row statistics (one number per row for ``"torch"`` and
    ``"compiled"``, three for ``"triton"``); with ``overwrite_logits`` the logits alone (holding the
    gradient). The teacher is a target: it gets no gradient.
    """

    @staticmethod
    def forward(
        ctx: Any,
        student: Tensor,
        teacher: Tensor,
        student_temp: float,
        num_views: int,
        chunk_rows: Optional[int],
        engine: str,
        overwrite_logits: bool = False,
    ) -> Tensor:
        loss, _, _ = _forward(
            ctx, student, teacher, student_temp, num_views, chunk_rows, engine, overwrite_logits, False
        )
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Optional[Tensor], None, None, None, None, None, None]:
        return _backward(ctx, grad_output), None, None, None, None, None, None


class MultiviewCrossEntropyStats(torch.autograd.Function):
    """:class:`MultiviewCrossEntropy` that also returns per-row statistics, from the same passes.

    Outputs: ``(loss, lse, teacher_entropy)``: the 0-dim loss, (V*B,) float32 log-sum-exp of
    ``x / tau`` per student row, and (T*B,) ``-sum P log P`` per teacher row; the last two carry no
    gradient. Same inputs, saved tensors and backward as :class:`MultiviewCrossEntropy`.
    """

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> tuple[Tensor, Tensor, Tensor]:
        # The inputs of MultiviewCrossEntropy.forward (overwrite_logits optional, default False).
        student, teacher, student_temp, num_views, chunk_rows, engine, *overwrite = inputs
        loss, lse, entropy = _forward(ctx, student, teacher, student_temp, num_views, chunk_rows, engine,
                                      bool(overwrite and overwrite[0]), True)
        assert lse is not None and entropy is not None
        ctx.mark_non_differentiable(lse, entropy)
        return loss, lse, entropy

    @staticmethod
    def backward(
        ctx: Any, grad_output: Tensor, _grad_lse: Any, _grad_entropy: Any
    ) -> tuple[Optional[Tensor], None, None, None, None, None, None]:
        return _backward(ctx, grad_output), None, None, None, None, None, None
