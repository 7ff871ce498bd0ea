"""The head's last layer and the DINO cross-entropy, fused and chunked: the logits never exist at once.

The last layer is weight-normalised and bias-free, ``W = g * v / ||v||`` row-wise, so its logits are
a per-prototype scale of one matrix product, ``S = (x @ v.T) * s`` with ``s = g / ||v||`` (K,): no
normalised copy of the (K, D) weight is made. For a block of batch rows (those rows of every view),
forward makes the block's logits, their row cross-entropies and gradient (the engine of
:mod:`.engine`: the cross-entropy's own forward and backward), and from them the gradients of the
features and of the weight:

    dS = (|Q| softmax(S / tau) - Q) / (tau * B * n_pairs)
    dx = (dS * s) @ v                dW += dS.T @ x        (dW: the gradient of W, (K, D))

then drops the block. After the last block the weight-norm backward turns ``dW`` into
``dv = s * (dW - (u . dW) u)`` and ``dg = u . dW`` with ``u = v / ||v||`` (in place, no (K, D)
temporary). Backward only scales by the incoming gradient.

Memory: one block of logits and its gradient (V * ``chunk_rows`` x K, float32 each)
instead of the (V*B, K) logits, their gradient and the normalised weight with its gradient. Time:
the same three matrix products as the unfused path, but on blocks, and the weight and its gradient
are read once per block: blocks are 32 MiB of logits by default (128 rows at K = 65 536), not the
few rows other fused-linear losses default to.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .cross_entropy import RowStats, row_entropy
from .engine import CrossEntropyEngine, engine_for

# Bytes of float32 logits per block (128 rows at K = 65 536: 12 batch rows of 10 views): matrix
# products of 128 rows ran within ~18 % of one product over all 640 rows, 64 rows 45 % slower.
BLOCK_BYTES = 1 << 25


def _block_rows(num_views: int, k: int, chunk_rows: Optional[int]) -> int:
    return chunk_rows or max(1, BLOCK_BYTES // (4 * k * num_views))


def _block_loss_and_grad(
    engine: CrossEntropyEngine, s: Tensor, teacher: Tensor, coef: Tensor, student_temp: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Row cross-entropies (V*rows,), log-sum-exp (V*rows,) and ``dS = (|Q| softmax(s / tau) - Q) * coef``
    of a block of logits ``s`` (V*rows, K), crop-major over the block's rows; teacher (T, rows, K)."""
    ce, stats = engine.forward(s, teacher, student_temp, True)
    return ce, engine.row_lse(s, stats, student_temp), engine.backward(coef, s, teacher, stats, student_temp, True)


class FusedLastLayerCrossEntropy(torch.autograd.Function):
    """Autograd Function of :func:`fused_last_layer_cross_entropy`.

    Inputs: features (V*B, D) float32, weight_v (K, D), weight_g (K, 1), teacher (T, B, K), tau, V,
    chunk_rows. Outputs: the 0-dim loss, (V*B,) student log-sum-exp and (T*B,) teacher entropies
    (no gradient). Saved for backward: the feature and weight gradients computed in forward.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight_v: Tensor, weight_g: Tensor, teacher: Tensor,
        student_temp: float, num_views: int, chunk_rows: Optional[int],
    ) -> tuple[Tensor, Tensor, Tensor]:
        teacher = teacher.detach().float()
        num_teacher, batch, k = teacher.shape
        need_x, need_v, need_g = ctx.needs_input_grad[:3]
        x, v, g = x.detach().float(), weight_v.detach().float(), weight_g.detach().float()
        norm = v.norm(dim=1)  # (K,)
        scale = g.view(-1) / norm  # s_k = g_k / ||v_k||: W = s * v row-wise
        normaliser = batch * num_teacher * (num_views - 1)
        coef = torch.full((), 1.0 / (student_temp * normaliser), device=x.device)
        engine = engine_for(x)
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros_like(v) if (need_v or need_g) else None
        ce = x.new_empty(num_views, batch)
        lse = x.new_empty(num_views, batch)
        rows = _block_rows(num_views, k, chunk_rows)
        views_x = x.view(num_views, batch, -1)
        views_grad_x = grad_x.view(num_views, batch, -1) if grad_x is not None else None
        for b0 in range(0, batch, rows):
            b1 = min(b0 + rows, batch)
            # Rows b0:b1 of every view: V * rows logits, so the matrix products stay large enough to
            # run near full speed.
            xb = views_x[:, b0:b1].reshape(-1, x.shape[1])
            s = torch.mm(xb, v.t()).mul_(scale)  # (V * rows, K): this block's logits
            block_ce, block_lse, ds = _block_loss_and_grad(engine, s, teacher[:, b0:b1], coef, student_temp)
            del s
            ce[:, b0:b1], lse[:, b0:b1] = block_ce.view(num_views, -1), block_lse.view(num_views, -1)
            if grad_w is not None:
                grad_w.addmm_(ds.t(), xb)  # dW += dS.T @ x
            if views_grad_x is not None:
                views_grad_x[:, b0:b1] = torch.mm(ds.mul_(scale), v).view(num_views, b1 - b0, -1)  # dx = (dS s) @ v
            del ds
        grad_v = grad_g = None
        if grad_w is not None:
            # Weight-norm backward, in place on dW: dg = u . dW, dv = s * (dW - (u . dW) u).
            # Row dot products as a batched matmul: no (K, D) temporary.
            dot = torch.bmm(grad_w.unsqueeze(1), v.unsqueeze(2)).view(-1) / norm
            grad_g = dot.view(-1, 1).to(weight_g.dtype) if need_g else None
            if need_v:
                grad_w.addcmul_(v, (dot / norm).view(-1, 1), value=-1.0).mul_(scale.view(-1, 1))
                grad_v = grad_w.to(weight_v.dtype)
        entropy = row_entropy(teacher).flatten()
        lse = lse.flatten()
        ctx.save_for_backward(grad_x, grad_v, grad_g)
        ctx.mark_non_differentiable(lse, entropy)
        return ce.sum() / normaliser, lse, entropy

    @staticmethod
    def backward(
        ctx: Any, grad_output: Tensor, _grad_lse: Any, _grad_entropy: Any
    ) -> tuple[Optional[Tensor], ...]:
        grads = list(ctx.saved_tensors)
        # A product with the incoming gradient, read on the device: no host sync to test for 1.
        grads = [None if t is None else t * grad_output.to(t.dtype) for t in grads]
        return grads[0], grads[1], grads[2], None, None, None, None


def fused_last_layer_cross_entropy(
    bottleneck_features: Tensor,
    weight_v: Tensor,
    weight_g: Tensor,
    teacher_probs: Tensor,
    student_temp: float,
    num_views: int,
    chunk_rows: Optional[int] = None,
    return_stats: bool = False,
) -> Any:
    """DINO loss of ``last_layer(bottleneck_features)`` without materialising the (V*B, K) logits.

    Equals ``multiview_cross_entropy(head.last_layer(x), teacher_probs, tau)`` for a weight-normalised
    bias-free last layer (``DINOHead.last_layer``), loss and gradients of x, v and g.

    Args:
        bottleneck_features: (V*B, D) crop-major, already L2-normalised (``DINOHead.forward_bottleneck``).
        weight_v: (K, D) direction ``v`` (parametrization ``original1``).
        weight_g: (K, 1) gain ``g`` (``original0``); frozen (no gradient) with ``norm_last_layer``.
        teacher_probs: (T, B, K) or (T*B, K) probabilities, targets only.
        student_temp: tau_s.
        num_views: V.
        chunk_rows: batch rows per block, each taken from all V views (default: about 32 MiB of
            float32 logits, 12 rows at V = 10, K = 65 536).
        return_stats: also return ``RowStats(lse (V*B,), teacher_entropy (T*B,))``.

    Returns:
        0-dim float32 loss, or ``(loss, RowStats)``.
    """
    rows, dim = bottleneck_features.shape
    if rows % num_views or weight_v.shape[1] != dim or weight_g.shape != (weight_v.shape[0], 1):
        raise ValueError(f"features {tuple(bottleneck_features.shape)}, v {tuple(weight_v.shape)}, "
                         f"g {tuple(weight_g.shape)}: expected (V*B, D), (K, D), (K, 1) with V={num_views}")
    batch = rows // num_views
    teacher = teacher_probs if teacher_probs.ndim == 3 else teacher_probs.unflatten(0, (-1, batch))
    if teacher.shape[1:] != (batch, weight_v.shape[0]) or not 1 <= teacher.shape[0] <= num_views:
        raise ValueError(f"teacher_probs {tuple(teacher_probs.shape)}: expected (T, B={batch}, K) with T <= V")
    loss, lse, entropy = FusedLastLayerCrossEntropy.apply(
        bottleneck_features, weight_v, weight_g, teacher, float(student_temp), num_views, chunk_rows
    )
    return (loss, RowStats(lse, entropy)) if return_stats else loss
