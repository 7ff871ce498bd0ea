"""The eager engine: PyTorch on every device, one (rows, K) block at a time. The reference engine.

Forward is ``log_softmax(x / tau)`` per block (one fused kernel: the official numerics) times its
target, summed over K; backward recomputes ``softmax(x / tau)`` per block. Each block is freed
before the next, so nothing of size (V, B, K) lives besides the logits and the gradient, and the
only statistic saved is ``|Q|`` per row.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import Tensor

from .cross_entropy import other_view_targets

# Elements of one float32 block of logits: bounds the transient memory (a few such blocks live at
# once) independently of B; 16 MB keeps a block's rows in the last-level cache.
BLOCK_ELEMENTS = 1 << 22


def _once_per_tensor(fn: Any, tensors: list[Tensor]) -> list[Tensor]:
    """``[fn(t) for t in tensors]``, computing ``fn`` once per distinct tensor object (the local
    views share one target tensor)."""
    done: dict[int, Tensor] = {}
    for t in tensors:
        if id(t) not in done:
            done[id(t)] = fn(t)
    return [done[id(t)] for t in tensors]


class EagerEngine:
    """:class:`.engine.CrossEntropyEngine` in PyTorch ops, for any device and floating dtype.

    Args:
        chunk_rows: rows of one view per block (default: about ``BLOCK_ELEMENTS`` logits a block).
    """

    name = "eager"

    def __init__(self, chunk_rows: Optional[int] = None) -> None:
        self.chunk_rows = chunk_rows

    def _blocks(self, num_views: int, batch: int, k: int) -> Iterator[tuple[int, int, int]]:
        """(view, first row, last row) blocks of at most ``chunk_rows`` rows of one view."""
        rows = self.chunk_rows or max(1, BLOCK_ELEMENTS // k)
        for v in range(num_views):
            for b0 in range(0, batch, rows):
                yield v, b0, min(b0 + rows, batch)

    def forward(self, logits: Tensor, teacher: Tensor, temp: float, skip_own: bool) -> tuple[Tensor, Tensor]:
        _, batch, k = teacher.shape
        views = logits.unflatten(0, (-1, batch))
        targets = other_view_targets(list(teacher.unbind(0)), views.shape[0], skip_own)
        mass = torch.stack(_once_per_tensor(lambda q: q.sum(dim=-1), targets))
        ce = torch.empty(views.shape[:2], dtype=teacher.dtype, device=logits.device)
        for v, b0, b1 in self._blocks(views.shape[0], batch, k):
            log_p = torch.log_softmax(views[v, b0:b1].to(teacher.dtype) / temp, dim=-1)
            # Elementwise product + sum: a matmul reduction rounds worse (ln K must come out to 1e-6
            # on all-zero logits).
            ce[v, b0:b1] = log_p.mul_(targets[v][b0:b1]).sum(dim=-1).neg_()
        return ce.flatten(), mass.flatten()

    def backward(
        self, scale: Tensor, logits: Tensor, teacher: Tensor, stats: Tensor, temp: float, skip_own: bool
    ) -> Tensor:
        _, batch, k = teacher.shape
        views = logits.unflatten(0, (-1, batch))
        num_views = views.shape[0]
        per_row = scale.ndim > 0
        row_scale = scale.view(num_views, batch, 1) if per_row else scale
        # Scale the (at most T + 1 distinct) targets once, not once per block, unless per row.
        targets = other_view_targets(list(teacher.unbind(0)), num_views, skip_own)
        if not per_row:
            targets = _once_per_tensor(lambda q: q * scale, targets)
        mass = stats.view(num_views, batch, 1) * row_scale
        grad = torch.empty(views.shape, dtype=logits.dtype, device=logits.device)
        for v, b0, b1 in self._blocks(num_views, batch, k):
            p = torch.softmax(views[v, b0:b1].to(teacher.dtype) / temp, dim=-1).mul_(mass[v, b0:b1])
            q = targets[v][b0:b1] * row_scale[v, b0:b1] if per_row else targets[v][b0:b1]
            torch.sub(p, q, out=grad[v, b0:b1])
        return grad.view(logits.shape)

    def row_lse(self, logits: Tensor, stats: Tensor, temp: float) -> Tensor:
        # One extra in-cache reduction, only when the statistics are asked for.
        return torch.cat([torch.logsumexp(block.float() / temp, dim=-1) for block in logits.split(16)])

    def centered_softmax(self, x: Tensor, center: Tensor, temp: float) -> Tensor:
        # The official code gets float32 here by type promotion (half - float32 centre); explicitly.
        return torch.softmax((x.detach().float() - center) / temp, dim=-1)

    def column_sum(self, x: Tensor) -> Tensor:
        # dtype= accumulates in float32 without a float32 copy of half-precision input.
        return torch.sum(x.detach(), dim=0, keepdim=True, dtype=torch.float32)
