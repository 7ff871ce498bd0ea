"""The soft-target cross-entropy of DINO and iBOT, over an engine, with a closed-form backward.

For student view ``s`` every (teacher view i, student view s) term shares ``log softmax(z_s / tau)``,
so the official double loop over pairs collapses to one soft-target cross-entropy per student row
against ``Q_s``, the sum of the teacher rows of the *other* views (``skip_own``; iBOT pairs each
masked patch with its own teacher row instead, ``Q = P``):

    ce_r = -<Q_r, log softmax(z_r / tau)>               loss = coef * sum_r w_r ce_r
    dloss/dz_r = (|Q_r| softmax(z_r / tau) - Q_r) * coef * w_r / tau

``|Q_r|`` is the row sum of ``Q_r`` (the number of teacher views paired with the row, for
probabilities). Backward needs only the logits (alive anyway for the head's backward), the targets
and per-row statistics: no (rows, K) log-probability tensor is saved. DINO: ``coef = 1 / (B T (V-1))``
(the official mean over pairs of batch means), ``w = 1``; iBOT: ``coef = 1 / 2B``, ``w = 1 / |M_i|``.

An engine (:mod:`.engine`) computes the row cross-entropies and the gradient; this module is the
autograd glue and the engine-free reference every engine is tested against.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .engine import CrossEntropyEngine, compute_dtype, engine_for
from .views import MultiView, split_views


class RowStats(NamedTuple):
    """Per-row statistics of the cross-entropy (float32, no gradient).

    lse: (V*B,) ``log sum_k exp(x_k / tau)`` of each student row.
    teacher_entropy: (T*B,) ``-sum_k P_k log P_k`` of each teacher row (nats; ln K = uniform).
    """

    lse: Tensor
    teacher_entropy: Tensor


def row_entropy(probs: Tensor) -> Tensor:
    """``-sum_k P_k log P_k`` over the last dim (``0 log 0 = 0``): (..., K) -> (...)."""
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


def other_view_targets(teacher_probs: Sequence[Tensor], num_student_views: int, skip_own: bool = True) -> list[Tensor]:
    """``Q_s`` for every student view s: the sum of the teacher views, without view s when ``skip_own``.

    Teacher view i is the same image view as student view i, so that pair is left out. Sums are
    built from the kept views directly (not ``total - q_s``), so no cancellation error creeps in,
    and with the official two teacher views ``Q_0`` / ``Q_1`` are the other view itself, no copy.
    Returns ``num_student_views`` tensors of shape (B, K); views beyond the teacher's share one
    object (the sum of all teacher views).
    """
    all_views = teacher_probs[0]
    for q in teacher_probs[1:]:
        all_views = all_views + q
    targets = []
    for s in range(num_student_views):
        if not skip_own or s >= len(teacher_probs):
            targets.append(all_views)
            continue
        kept = [q for t, q in enumerate(teacher_probs) if t != s]
        if not kept:  # a single teacher view: its own student view has no partner
            targets.append(torch.zeros_like(all_views))
            continue
        target = kept[0]
        for q in kept[1:]:
            target = target + q
        targets.append(target)
    return targets


def multiview_cross_entropy_reference(
    student_logits: Sequence[Tensor], teacher_probs: Sequence[Tensor], student_temp: float
) -> Tensor:
    """Pure-PyTorch DINO cross-entropy, one ``log_softmax`` per student view: the reference.

    Args:
        student_logits: V tensors of shape (B, K), any floating dtype (computed in float32).
        teacher_probs: T <= V tensors of shape (B, K), probabilities; teacher view i is the same
            image view as student view i.
        student_temp: the student temperature tau_s.

    Returns:
        0-dim float32 tensor: the mean over the T * (V - 1) pairs of the batch-mean cross-entropy.
    """
    num_student, num_teacher = len(student_logits), len(teacher_probs)
    targets = other_view_targets(teacher_probs, num_student)
    total = student_logits[0].new_zeros((), dtype=torch.float32)
    for z, target in zip(student_logits, targets):
        log_p = F.log_softmax(z.float() / student_temp, dim=-1)
        total = total + torch.sum(-target * log_p, dim=-1).mean()
    return total / (num_teacher * (num_student - 1))


def _differentiable_grad(logits: Tensor, teacher: Tensor, scale: Tensor, temp: float, skip_own: bool) -> Tensor:
    """The closed-form gradient with autograd-tracked ops, for ``create_graph=True`` (e.g. a
    Hessian-vector product): the engines write into new memory and are not differentiable."""
    num_teacher, batch, _ = teacher.shape
    views = logits.unflatten(0, (-1, batch)).to(teacher.dtype)
    targets = torch.stack(other_view_targets(list(teacher.unbind(0)), views.shape[0], skip_own))
    scale = scale.reshape(-1, 1).unflatten(0, (-1, batch)) if scale.ndim else scale
    grad = (targets.sum(dim=-1, keepdim=True) * torch.softmax(views / temp, dim=-1) - targets) * scale
    return grad.flatten(0, 1).to(logits.dtype)


class CrossEntropyFunction(torch.autograd.Function):
    """Autograd Function of :func:`cross_entropy`: ``coef * sum_r w_r ce_r`` over an engine.

    Inputs: logits (N, K) with N = V*B crop-major rows (any floating dtype), teacher (T, B, K)
    targets in the compute dtype, weights (N,) or None, tau, skip_own, coef, the engine object and
    whether to return row statistics. Outputs: the 0-dim loss in the compute dtype, and (N,) lse and
    (T*B,) teacher entropies (empty unless asked for; no gradient). Saved for backward: the logits
    (the input itself, no copy), the targets, the weights and the engine's row statistics.
    """

    @staticmethod
    def forward(
        ctx: Any, logits: Tensor, teacher: Tensor, weights: Optional[Tensor], temp: float, skip_own: bool,
        coef: float, engine: CrossEntropyEngine, want_stats: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        ce, stats = engine.forward(logits, teacher, temp, skip_own)
        loss = (ce if weights is None else ce * weights).sum() * coef
        lse = engine.row_lse(logits, stats, temp) if want_stats else ce.new_empty(0)
        entropy = row_entropy(teacher).flatten() if want_stats else ce.new_empty(0)
        ctx.save_for_backward(logits, teacher, stats, weights)
        ctx.temp, ctx.skip_own, ctx.coef, ctx.engine = temp, skip_own, coef, engine
        ctx.mark_non_differentiable(lse, entropy)
        return loss, lse, entropy

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, *_: Any) -> tuple[Optional[Tensor], ...]:
        logits, teacher, stats, weights = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            # A tensor, not .item(): no host sync, and the Triton kernel reads it on the device.
            scale = grad_loss.to(teacher.dtype) * (ctx.coef / ctx.temp)
            if weights is not None:
                scale = scale * weights
            if torch.is_grad_enabled():  # create_graph=True
                grad = _differentiable_grad(logits, teacher, scale, ctx.temp, ctx.skip_own)
            else:
                grad = ctx.engine.backward(scale, logits, teacher, stats, ctx.temp, ctx.skip_own)
        return grad, None, None, None, None, None, None, None


def cross_entropy(
    logits: Tensor, teacher: Tensor, temp: float, coef: float, *, weights: Optional[Tensor] = None,
    skip_own: bool = True, engine: Optional[CrossEntropyEngine] = None, return_stats: bool = False,
) -> Any:
    """``coef * sum_r w_r ce_r`` (module docstring) on ``engine`` (default: :func:`.engine_for`).

    Args:
        logits: (V*B, K) crop-major logits, any floating dtype.
        teacher: (T, B, K) targets; no gradient flows into them.
        temp: tau_s.
        coef: the normaliser.
        weights: (V*B,) per-row weights, or None for 1.
        skip_own: leave out teacher view i for student view i (DINO), or pair row r with teacher row
            r alone (iBOT: V = T = 1).
        engine: an engine object; None chooses one for ``logits``.
        return_stats: also return :class:`RowStats`.

    Returns:
        the 0-dim loss (float32; float64 for float64 logits), or ``(loss, RowStats)``.
    """
    engine = engine_for(logits) if engine is None else engine
    teacher = teacher.detach().to(compute_dtype(logits.dtype))
    if weights is not None:  # constants, like the targets, in the compute dtype
        weights = weights.detach().to(teacher.dtype)
    loss, lse, entropy = CrossEntropyFunction.apply(
        logits, teacher, weights, float(temp), skip_own, float(coef), engine, return_stats
    )
    return (loss, RowStats(lse, entropy)) if return_stats else loss


def multiview_cross_entropy(
    student: MultiView, teacher_probs: MultiView, student_temp: float, *, batch_size: Optional[int] = None,
    return_stats: bool = False,
) -> Any:
    """DINO multi-view cross-entropy with a memory-lean closed-form backward.

    Equals :func:`multiview_cross_entropy_reference`: the mean over the T * (V - 1) (teacher view i,
    student view v != i) pairs of the batch-mean cross-entropy.

    Args:
        student: (V*B, K) crop-major logits (``MultiCropWrapper`` output), (V, B, K), or a list of
            V (B, K). Any floating dtype; computed in float32 (float64 stays float64).
        teacher_probs: (T, B, K), (T*B, K) or a list of T (B, K) probabilities, T <= V; teacher
            view i is student view i. Targets only: no gradient flows into them.
        student_temp: tau_s.
        batch_size: B, when both inputs are 2-D and T is not 2 (see :mod:`.views`).
        return_stats: also return :class:`RowStats` from the same passes.

    Returns:
        0-dim float32 loss (float64 for float64 logits); its gradient has the logits' dtype. With
        ``return_stats``: ``(loss, RowStats(lse (V*B,), teacher_entropy (T*B,)))``.
    """
    layout = split_views(student, teacher_probs, batch_size=batch_size, names=("student", "teacher_probs"))
    coef = 1.0 / (layout.batch * layout.num_teacher * (layout.num_views - 1))
    return cross_entropy(layout.student.flatten(0, 1), layout.teacher, student_temp, coef, return_stats=return_stats)


def weighted_cross_entropy(
    logits: Tensor, targets: Tensor, student_temp: float, weights: Optional[Tensor] = None
) -> Tensor:
    """``sum_r w_r * -<t_r, log softmax(z_r / tau)>``: one target row per logit row (iBOT's masked patches).

    Args:
        logits: (M, K) student logits, any floating dtype.
        targets: (M, K) teacher probabilities, no gradient.
        student_temp: tau_s.
        weights: (M,) per-row weights (iBOT: ``1 / |M_i|`` for the patches of image i), or None for 1.

    Returns:
        0-dim float32 sum (float64 for float64 logits).
    """
    if logits.ndim != 2 or targets.shape != logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)}: expected both (M, K)")
    if weights is not None and weights.shape != logits.shape[:1]:
        raise ValueError(f"weights has shape {tuple(weights.shape)}, expected ({logits.shape[0]},)")
    return cross_entropy(logits, targets.unsqueeze(0), student_temp, 1.0, weights=weights, skip_own=False)
