"""Memory-lean multi-view cross-entropy: a custom autograd Function with a closed-form backward.

For student view ``s`` (logits ``z_s``, temperature ``tau``) and ``Q_s`` the sum of the teacher
probabilities of the other views, each row contributes ``-<Q_s, log softmax(z_s / tau)>``, and

    dL/dz_s = (|Q_s| * softmax(z_s / tau) - Q_s) / tau * g / (B * n_pairs),   n_pairs = T * (V - 1)

where ``|Q_s|`` is the row sum of ``Q_s`` (``n_s``, the number of teacher views paired with ``s``,
for probability rows). So backward needs only the logits (alive anyway for the head's backward),
the teacher probabilities and three numbers per student row (max, shifted logsumexp, ``|Q_s|``);
no (V, B, K) log-probability tensor is ever saved.

The logsumexp is kept as ``(m, log sum exp(z - m))`` rather than one number ``lse``: backward
recomputes ``softmax = exp((z - m) - log_sum)``, where ``z - m`` is exact near the max. With
``exp(z - lse)`` the rounding of ``lse`` (an ulp of |z|, ~1e-5 for z ~ 100) would cost ~1e-5
relative error in the gradient.

Row statistics are taken relative to the row maximum ``m``:
``CE = sum_k Q_k (m - z_k) + |Q| * log sum_k exp(z_k - m)``. Both terms are >= 0, so nothing
cancels, unlike ``|Q| * lse - <Q, z>``, which loses digits when the logits are large.

Two engines compute the same statistics and gradient: ``"torch"`` (below, chunked over batch rows)
and ``"triton"`` (:mod:`.triton_kernels`, CUDA only). :mod:`.dispatch` picks one.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

# Elements of one float32 (V, rows, K) student chunk: bounds the transient memory of the torch engine
# (a few such buffers live at once) independently of B.
CHUNK_ELEMENTS = 1 << 23


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for every input dtype except float64 (kept, e.g. for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_chunk_rows(num_views: int, num_classes: int) -> int:
    """Batch rows per chunk so one float32 (V, rows, K) block holds about ``CHUNK_ELEMENTS``."""
    return max(1, CHUNK_ELEMENTS // (num_views * num_classes))


def _targets(probs: Tensor) -> tuple[Tensor, Tensor]:
    """Targets of a (T, rows, K) probability block: (T, rows, K) for the global views and the
    (rows, K) sum of all views, which every local view shares.

    Sums are built from the kept views in view order (not ``total - q_s``), exactly as
    :func:`.cross_entropy.other_view_targets`, so both round identically.
    """
    num_teacher = probs.shape[0]
    total = probs[0]
    for t in range(1, num_teacher):
        total = total + probs[t]
    if num_teacher == 1:  # view 0 is paired with no teacher view
        return torch.zeros_like(probs), total
    if num_teacher == 2:  # the official layout: Q_0 = P_1, Q_1 = P_0, no arithmetic at all
        return probs.flip(0), total
    per_view = []
    for s in range(num_teacher):
        kept = [probs[t] for t in range(num_teacher) if t != s]
        target = kept[0]
        for q in kept[1:]:
            target = target + q
        per_view.append(target)
    return torch.stack(per_view), total


def _row_stats(z: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(cross-entropy, max, log sum exp(z - max), target mass) of each row of ``z`` (..., K) vs ``q``.

    ``q`` broadcasts against ``z``. Elementwise products and sums only: a matmul/einsum reduction
    rounds worse (ln K on all-zero logits must come out to 1e-6).
    """
    m = z.amax(dim=-1, keepdim=True)
    gap = m - z  # >= 0
    log_s = torch.log(torch.exp(-gap).sum(dim=-1))
    mass = q.sum(dim=-1).expand(log_s.shape)
    ce = (q * gap).sum(dim=-1) + mass * log_s
    return ce, m.squeeze(-1), log_s, mass


def torch_forward(
    student: Tensor, teacher: Tensor, student_temp: float, num_views: int, chunk_rows: Optional[int] = None
) -> tuple[Tensor, Tensor]:
    """Per-row statistics of the fused cross-entropy, pure PyTorch.

    Args:
        student: (V*B, K) crop-major logits, any floating dtype (upcast one chunk at a time).
        teacher: (T, B, K) probabilities in the compute dtype.
        student_temp: tau.
        num_views: V.
        chunk_rows: batch rows per chunk (all V views of them at once); None: ``default_chunk_rows``.

    Returns:
        ``(ce, stats)`` in the compute dtype: ce (V*B,) the row cross-entropies ``-<Q_s, log p_s>``;
        stats (3, V*B) the row max ``m`` of ``z = x / tau``, ``log sum exp(z - m)`` and the row sum
        of ``Q_s``.
    """
    num_teacher, batch, k = teacher.shape
    dtype = compute_dtype(student.dtype)
    chunk_rows = chunk_rows or default_chunk_rows(num_views, k)
    views = student.unflatten(0, (num_views, batch))
    pieces: list[list[Tensor]] = []
    for b0 in range(0, batch, chunk_rows):
        b1 = min(b0 + chunk_rows, batch)
        z = views[:, b0:b1].to(dtype) / student_temp  # (V, rows, K): the only upcast copy
        targets, total = _targets(teacher[:, b0:b1])
        stats = list(_row_stats(z[:num_teacher], targets))  # few large ops per chunk, not per view
        if num_views > num_teacher:
            local = _row_stats(z[num_teacher:], total)  # the local views all share one target
            stats = [torch.cat([g, l]) for g, l in zip(stats, local)]
        pieces.append(stats)  # 4 x (V, rows)
    ce, row_max, log_sum, mass = (torch.cat(col, dim=1).flatten() for col in zip(*pieces))
    return ce, torch.stack([row_max, log_sum, mass])


def torch_backward(
    scale: Tensor,
    student: Tensor,
    teacher: Tensor,
    stats: Tensor,
    student_temp: float,
    num_views: int,
    chunk_rows: Optional[int] = None,
) -> Tensor:
    """``(mass * softmax(z / tau) - Q) * scale`` for every student row, in the student's dtype.

    Args:
        scale: 0-dim tensor ``g / (tau * B * n_pairs)`` in the compute dtype.
        student, teacher, student_temp, num_views, chunk_rows: as :func:`torch_forward`.
        stats: (3, V*B) statistics from :func:`torch_forward`.

    Returns:
        (V*B, K) gradient, dtype of ``student``; the float32 softmax is recomputed chunk by chunk.
    """
    num_teacher, batch, k = teacher.shape
    dtype = compute_dtype(student.dtype)
    chunk_rows = chunk_rows or default_chunk_rows(num_views, k)
    views = student.unflatten(0, (num_views, batch))
    grad = torch.empty((num_views, batch, k), dtype=student.dtype, device=student.device)
    row_max, log_sum, mass = (x.view(num_views, batch, 1) for x in stats)
    for b0 in range(0, batch, chunk_rows):
        b1 = min(b0 + chunk_rows, batch)
        z = views[:, b0:b1].to(dtype) / student_temp
        targets, total = _targets(teacher[:, b0:b1])
        p = torch.exp((z - row_max[:, b0:b1]) - log_sum[:, b0:b1])  # softmax, all views at once
        g = slice(0, num_teacher)
        grad[g, b0:b1] = ((mass[g, b0:b1] * p[g] - targets) * scale).to(student.dtype)
        if num_views > num_teacher:
            rest = slice(num_teacher, None)
            grad[rest, b0:b1] = ((mass[rest, b0:b1] * p[rest] - total) * scale).to(student.dtype)
    return grad.view(student.shape)


def _engine_forward(engine: str, *args: Any) -> tuple[Tensor, Tensor]:
    if engine == "triton":
        from . import triton_kernels  # registers torch.ops.dino_pytorch.*

        student, teacher, student_temp, num_views, _ = args
        return torch.ops.dino_pytorch.mvce_forward(student, teacher, student_temp, num_views)
    return torch_forward(*args)


def _engine_backward(engine: str, *args: Any) -> Tensor:
    if engine == "triton":
        from . import triton_kernels  # noqa: F401

        scale, student, teacher, stats, student_temp, num_views, _ = args
        return torch.ops.dino_pytorch.mvce_backward(scale, student, teacher, stats, student_temp, num_views)
    return torch_backward(*args)


class MultiviewCrossEntropy(torch.autograd.Function):
    """Autograd Function of the DINO cross-entropy; use :func:`.dispatch.multiview_cross_entropy`.

    Inputs: student (V*B, K) crop-major logits (any floating dtype), teacher (T, B, K)
    probabilities, tau, V, chunk_rows (torch engine; None = default) and the engine name.
    Output: 0-dim loss in the compute dtype (float32, or float64 for float64 logits).
    Saved for backward: the student logits (the input itself, no copy), the teacher probabilities in
    the compute dtype and (3, V*B) row statistics. The teacher is a target: it gets no gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student: Tensor,
        teacher: Tensor,
        student_temp: float,
        num_views: int,
        chunk_rows: Optional[int],
        engine: str,
    ) -> Tensor:
        dtype = compute_dtype(student.dtype)
        teacher = teacher.detach().to(dtype)
        num_teacher, batch = teacher.shape[0], teacher.shape[1]
        ce, stats = _engine_forward(engine, student, teacher, student_temp, num_views, chunk_rows)
        normaliser = batch * num_teacher * (num_views - 1)
        ctx.save_for_backward(student, teacher, stats)
        ctx.student_temp, ctx.num_views, ctx.chunk_rows, ctx.engine = student_temp, num_views, chunk_rows, engine
        ctx.normaliser = normaliser
        return ce.sum() / normaliser

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Optional[Tensor], None, None, None, None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        student, teacher, stats = ctx.saved_tensors
        # A tensor, not .item(): no host sync, and the Triton kernel reads it from device memory.
        scale = grad_output.to(stats.dtype) / (ctx.student_temp * ctx.normaliser)
        grad = _engine_backward(
            ctx.engine, scale, student, teacher, stats, ctx.student_temp, ctx.num_views, ctx.chunk_rows
        )
        return grad, None, None, None, None, None
