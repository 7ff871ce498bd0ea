"""The closed-form engine of the fused cross-entropy: a graph shaped for ``torch.compile``, and its eager twin.

Per student row ``z = x / tau`` with target ``Q`` (the other teacher views), relative to the row max
``m`` (as the Triton kernels):

    CE  = sum_k Q_k (m - z_k) + |Q| * log_sum,      log_sum = log sum_k exp(z_k - m)
    dz  = (|Q| * exp((z - m) - log_sum) - Q) * scale

Both sums of the forward have non-negative terms (nothing cancels) and ``z - m`` is exact near the
max, so the gradient keeps float32 accuracy for logits of any size. Only ``log_sum`` is saved (one
number per row, as many bytes as the eager engine's statistic): backward recomputes ``m`` with a max
pass over a row that it then reads again from cache, and ``|Q|`` from the teacher rows.

``Q`` is never built per view: ``Q[v] = sum_i w[v, i] * P[i]`` with ``w`` a (V, T) 0/1 mask (0 for
``i == v``). Adding exact zeros does not round, so this is bit-for-bit the reference's sum of the
kept views in view order, and inductor turns it into T loads per element inside the fused loops.

Compiled (inductor, CPU, :mod:`.compiled`): forward is one kernel, per row a max loop and one loop
summing the exponentials and ``Q (m - z)`` (the row stays in L2 between them), so DRAM sees the
logits once; backward is one kernel writing the gradient into a buffer it is given. With
``overwrite_logits`` one kernel does both, writing the gradient over the logits in a third loop per
row: one read and one write of the logits and one exponential per element fewer. The eager twin
runs the same functions on blocks of rows sized to stay in cache.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from . import compiled
from .compiled import DISABLE_COMPILE_ENV, compile_disabled  # noqa: F401  (re-exported for dispatch)

# Rows per eager block: 8 rows of K = 65 536 float32 are 2 MiB, a few such temporaries fit in L2.
EAGER_BLOCK_ELEMENTS = 1 << 19


def view_mask(num_views: int, num_teacher: int, device: torch.device) -> Tensor:
    """(V, T) float32 ``w[v, i] = 1`` where teacher view ``i`` is a target of student view ``v`` (``i != v``)."""
    w = torch.ones(num_views, num_teacher, device=device)
    idx = torch.arange(min(num_views, num_teacher), device=device)
    w[idx, idx] = 0.0
    return w


def targets(probs: Tensor, mask: Tensor) -> Tensor:
    """``Q[v, b] = sum_i mask[v, i] * probs[i, b]``: (v, b, K) from probs (T, b, K) and mask (v, T)."""
    q = mask[:, 0, None, None] * probs[0]
    for i in range(1, probs.shape[0]):
        q = q + mask[:, i, None, None] * probs[i]
    return q


def _per_view(mask: Tensor, student_temp: float) -> Tensor:
    """tau as a (v, 1, 1) tensor computed from an input (so inductor cannot fold it to a constant).

    Dividing by a per-view value (the same float32 as dividing by tau) keeps every loop of the
    compiled kernel on one (view, row, K) nest, so inductor fuses the max,
    the sums and the write of a row into one outer iteration and the row stays in cache."""
    return mask[:, :1, None] * 0.0 + student_temp


def forward_rows(x: Tensor, probs: Tensor, mask: Tensor, student_temp: float, entropy: bool) -> tuple[Tensor, ...]:
    """Row statistics of a (v, b, K) block of logits against probs (T, b, K).

    Returns:
        ``(ce, log_sum, lse)``, each (v, b) float32, plus the (T, b) teacher row entropies
        ``-sum P log P`` when ``entropy`` (read from the same teacher rows).
    """
    z = x.float() / _per_view(mask, student_temp)
    q = targets(probs, mask)
    m = z.amax(dim=-1, keepdim=True)
    log_sum = torch.exp(z - m).sum(dim=-1, keepdim=True).log()
    mass = q.sum(dim=-1, keepdim=True)
    ce = (q * (m - z)).sum(dim=-1, keepdim=True) + mass * log_sum
    out: tuple[Tensor, ...] = (ce.squeeze(-1), log_sum.squeeze(-1), (m + log_sum).squeeze(-1))
    if entropy:
        out = out + (_entropy(probs),)
    return out


def grad_rows(x: Tensor, probs: Tensor, mask: Tensor, log_sum: Tensor, scale: Tensor, student_temp: float) -> Tensor:
    """``(|Q| softmax(z) - Q) * scale`` for a (v, b, K) block, in ``x``'s dtype; log_sum (v, b)."""
    z = x.float() / _per_view(mask, student_temp)
    q = targets(probs, mask)
    m = z.amax(dim=-1, keepdim=True)
    mass = q.sum(dim=-1, keepdim=True)
    # exp(-(m - z)), not exp(z - m): the same float32 value, but it keeps inductor from rewriting
    # ``z - max(z)`` into a guarded form (sign and finiteness tests per element; 15 % slower).
    return ((mass * torch.exp(-(m - z) - log_sum.unsqueeze(-1)) - q) * scale).to(x.dtype)


def grad_rows_into(
    out: Tensor, x: Tensor, probs: Tensor, mask: Tensor, log_sum: Tensor, scale: Tensor, student_temp: float
) -> Tensor:
    """:func:`grad_rows` written into ``out`` (same shape and dtype as ``x``)."""
    return out.copy_(grad_rows(x, probs, mask, log_sum, scale, student_temp))


def loss_and_grad_rows(
    x: Tensor, probs: Tensor, mask: Tensor, scale: Tensor, student_temp: float, entropy: bool
) -> tuple[Tensor, ...]:
    """:func:`forward_rows`, and ``x`` overwritten with :func:`grad_rows` in the same pass.

    Compiled, each row is read from memory once: a max loop, a loop of sums and a loop writing the
    gradient, the row staying in L2 between them (one kernel; the gradient's exponential is
    spelled ``exp(-(m - z))`` so it is not shared with the sum's, which would make inductor store
    every exponential in a (v, b, K) buffer).
    """
    z = x.float() / _per_view(mask, student_temp)
    q = targets(probs, mask)
    m = z.amax(dim=-1, keepdim=True)
    total = torch.exp(z - m).sum(dim=-1, keepdim=True)
    log_sum = total.log()
    mass = q.sum(dim=-1, keepdim=True)
    ce = (q * (m - z)).sum(dim=-1, keepdim=True) + mass * log_sum
    x.copy_((torch.exp(-(m - z)) * (mass / total) - q) * scale)
    out: tuple[Tensor, ...] = (ce.squeeze(-1), log_sum.squeeze(-1), (m + log_sum).squeeze(-1))
    if entropy:
        out = out + (_entropy(probs),)
    return out


def _entropy(probs: Tensor) -> Tensor:
    """(T, b) ``-sum P log P`` of each teacher row (0 log 0 = 0)."""
    plogp = torch.where(probs > 0, probs * torch.log(probs), torch.zeros_like(probs))
    return -plogp.sum(dim=-1)


# -- eager twin: the same functions on cache-sized blocks of rows ---------------------------------
def _blocks(num_views: int, batch: int, k: int, chunk_rows: Optional[int]) -> Any:
    rows = chunk_rows or max(1, EAGER_BLOCK_ELEMENTS // k)
    for v in range(num_views):
        for b0 in range(0, batch, rows):
            yield v, b0, min(b0 + rows, batch)


def eager_forward(
    x: Tensor, probs: Tensor, mask: Tensor, student_temp: float, entropy: bool, chunk_rows: Optional[int] = None
) -> tuple[Tensor, ...]:
    """:func:`forward_rows` over x (V, B, K) one (1, rows, K) block at a time: the same outputs, (V, B) each."""
    num_views, batch, k = x.shape
    outs = [torch.empty(num_views, batch, device=x.device) for _ in range(3)]
    for v, b0, b1 in _blocks(num_views, batch, k, chunk_rows):
        block = forward_rows(x[v : v + 1, b0:b1], probs[:, b0:b1], mask[v : v + 1], student_temp, False)
        for out, value in zip(outs, block):
            out[v, b0:b1] = value[0]
    if entropy:
        plogp = torch.special.xlogy(probs, probs)
        outs.append(-plogp.sum(dim=-1))
    return tuple(outs)


def eager_grad(
    x: Tensor, probs: Tensor, mask: Tensor, log_sum: Tensor, scale: Tensor, student_temp: float,
    out: Optional[Tensor] = None, chunk_rows: Optional[int] = None,
) -> Tensor:
    """:func:`grad_rows` over x (V, B, K) block by block, into ``out`` (default: a new tensor)."""
    num_views, batch, k = x.shape
    out = torch.empty_like(x) if out is None else out
    for v, b0, b1 in _blocks(num_views, batch, k, chunk_rows):
        out[v : v + 1, b0:b1] = grad_rows(
            x[v : v + 1, b0:b1], probs[:, b0:b1], mask[v : v + 1], log_sum[v : v + 1, b0:b1], scale, student_temp
        )
    return out


def eager_loss_and_grad(
    x: Tensor, probs: Tensor, mask: Tensor, scale: Tensor, student_temp: float, entropy: bool,
    chunk_rows: Optional[int] = None,
) -> tuple[Tensor, ...]:
    """:func:`loss_and_grad_rows` eagerly: :func:`eager_forward`, then :func:`eager_grad` over ``x``
    (each block is read before it is written)."""
    outs = eager_forward(x, probs, mask, student_temp, entropy, chunk_rows)
    eager_grad(x, probs, mask, outs[1], scale, student_temp, out=x, chunk_rows=chunk_rows)
    return outs


# -- compiled: lazily, once per process; any failure falls back to the eager twin ----------------
compiled.register("loss forward", forward_rows)
compiled.register("loss gradient", grad_rows_into)
compiled.register("loss and gradient", loss_and_grad_rows)


def compiled_forward(
    x: Tensor, probs: Tensor, mask: Tensor, student_temp: float, entropy: bool
) -> tuple[Tensor, ...]:
    """:func:`forward_rows` over all of x (V, B, K) as one compiled kernel (eager twin on failure)."""
    return compiled.run(
        "loss forward", lambda: eager_forward(x, probs, mask, student_temp, entropy),
        x, probs, mask, student_temp, entropy,
    )


def compiled_grad(
    out: Tensor, x: Tensor, probs: Tensor, mask: Tensor, log_sum: Tensor, scale: Tensor, student_temp: float
) -> Tensor:
    """:func:`grad_rows` over all of x (V, B, K) into ``out`` as one compiled kernel (eager twin on failure)."""
    return compiled.run(
        "loss gradient", lambda: eager_grad(x, probs, mask, log_sum, scale, student_temp, out=out),
        out, x, probs, mask, log_sum, scale, student_temp,
    )


def compiled_loss_and_grad(
    x: Tensor, probs: Tensor, mask: Tensor, scale: Tensor, student_temp: float, entropy: bool
) -> tuple[Tensor, ...]:
    """:func:`loss_and_grad_rows` over x (V, B, K) as one compiled kernel; x ends up holding the gradient."""
    def reference() -> tuple[Tensor, ...]:  # before the kernel overwrites x: the twin on a copy
        copy = x.clone()
        return (copy, *eager_loss_and_grad(copy, probs, mask, scale, student_temp, entropy))

    def restore(expected: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        x.copy_(expected[0])
        return expected[1:]

    return compiled.run(
        "loss and gradient", lambda: eager_loss_and_grad(x, probs, mask, scale, student_temp, entropy),
        x, probs, mask, scale, student_temp, entropy,
        reference=reference, observe=lambda result: (x, *result), restore=restore,
    )
