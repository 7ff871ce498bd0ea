"""The head's last layer and the DINO cross-entropy, fused and chunked: the logits never exist at once.

The last layer is weight-normalised and bias-free, ``W = g * v / ||v||`` row-wise, so its logits are
a per-prototype scale of one matrix product, ``S = (x @ v.T) * s`` with ``s = g / ||v||`` (K,): no
normalised copy of the (K, D) weight is made. For a block of rows of one view, forward makes the
block's logits, its row cross-entropies (the closed form of :mod:`.closed_form`), the block's logit
gradient in place of the logits, and from it the gradients of the features and of the weight:

    dS = (|Q| softmax(S / tau) - Q) / (tau * B * n_pairs)
    dx = (dS * s) @ v                dW += dS.T @ x        (dW: the gradient of W, (K, D))

then drops the block. After the last block the weight-norm backward turns ``dW`` into
``dv = s * (dW - (u . dW) u)`` and ``dg = u . dW`` with ``u = v / ||v||`` (in place, no (K, D)
temporary). Backward only scales by the incoming gradient (skipped when it is 1 on the CPU).

Memory: one block of logits (``chunk_rows`` x K, float32) and a few block-sized temporaries instead of
the (V*B, K) logits, their gradient and the normalised weight with its gradient. Time: the same
three matrix products as the unfused path; the weight is re-read once per block (so blocks are a
whole view of 64 rows by default, not the 2 rows other fused-linear losses default to).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .closed_form import targets, view_mask
from .dispatch import RowStats

# Bytes of float32 logits per block (64 rows at K = 65 536): a whole view per block.
BLOCK_BYTES = 1 << 24


def _block_rows(k: int, chunk_rows: Optional[int]) -> int:
    return chunk_rows or max(1, BLOCK_BYTES // (4 * k))


def _block_loss_and_grad(s: Tensor, q: Tensor, student_temp: float, coef: float) -> tuple[Tensor, Tensor]:
    """Row cross-entropies (rows,) and log-sum-exp (rows,) of logits ``s`` (rows, K), float32;
    ``s`` is overwritten with ``dS = (|Q| softmax(s / tau) - Q) * coef``. q: (rows, K) targets."""
    s.div_(student_temp)
    m = s.amax(dim=-1, keepdim=True)
    s.sub_(m)  # z - m <= 0, exact near the max
    ce = torch.mul(q, s).sum(dim=-1, keepdim=True).neg_()  # sum Q (m - z): non-negative terms
    s.exp_()
    log_sum = s.sum(dim=-1, keepdim=True).log_()
    mass = q.sum(dim=-1, keepdim=True)
    ce.addcmul_(mass, log_sum)
    # softmax = exp(z - m) / sum; dS = (|Q| softmax - Q) * coef, all in place.
    s.mul_(mass * torch.exp(-log_sum)).sub_(q).mul_(coef)
    return ce.squeeze(-1), (m + log_sum).squeeze(-1)


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
        coef = 1.0 / (student_temp * normaliser)
        mask = view_mask(num_views, num_teacher, x.device)
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros_like(v) if (need_v or need_g) else None
        ce = x.new_empty(x.shape[0])
        lse = x.new_empty(x.shape[0])
        rows = _block_rows(k, chunk_rows)
        for view in range(num_views):
            for b0 in range(0, batch, rows):
                b1 = min(b0 + rows, batch)
                r0, r1 = view * batch + b0, view * batch + b1
                xb = x[r0:r1]
                s = torch.mm(xb, v.t()).mul_(scale)  # (rows, K): this block's logits
                q = targets(teacher[:, b0:b1], mask[view : view + 1])[0]
                ce[r0:r1], lse[r0:r1] = _block_loss_and_grad(s, q, student_temp, coef)
                del q
                if grad_w is not None:
                    grad_w.addmm_(s.t(), xb)  # dW += dS.T @ x
                if grad_x is not None:
                    torch.mm(s.mul_(scale), v, out=grad_x[r0:r1])  # dx = (dS * s) @ v
                del s
        grad_v = grad_g = None
        if grad_w is not None:
            # Weight-norm backward, in place on dW: dg = u . dW, dv = s * (dW - (u . dW) u).
            # Row dot products as a batched matmul: no (K, D) temporary.
            dot = torch.bmm(grad_w.unsqueeze(1), v.unsqueeze(2)).view(-1) / norm
            grad_g = dot.view(-1, 1).to(weight_g.dtype) if need_g else None
            if need_v:
                grad_w.addcmul_(v, (dot / norm).view(-1, 1), value=-1.0).mul_(scale.view(-1, 1))
                grad_v = grad_w.to(weight_v.dtype)
        entropy = -torch.special.xlogy(teacher, teacher).sum(dim=-1).flatten()
        ctx.save_for_backward(grad_x, grad_v, grad_g)
        ctx.mark_non_differentiable(lse, entropy)
        return ce.sum() / normaliser, lse, entropy

    @staticmethod
    def backward(
        ctx: Any, grad_output: Tensor, _grad_lse: Any, _grad_entropy: Any
    ) -> tuple[Optional[Tensor], ...]:
        grads = list(ctx.saved_tensors)
        # The loss is usually the root (gradient 1): skip three full passes then. A CPU read is free.
        if not (grad_output.device.type == "cpu" and grad_output.item() == 1.0):
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
        chunk_rows: rows of one view per block (default: 16 MiB of float32 logits, 64 rows at K = 65 536).
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
