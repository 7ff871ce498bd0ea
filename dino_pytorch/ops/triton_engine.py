"""The Triton engine: the kernels of :mod:`.triton_kernels` behind the engine protocol (CUDA).

Each row is streamed once per pass with an online logsumexp, and the statistics saved are the row
max ``m``, ``log sum exp(z - m)`` and ``|Q|``: keeping ``(m, log_sum)`` rather than one ``lse`` lets
backward compute ``exp((z - m) - log_sum)`` with ``z - m`` exact near the max (``exp(z - lse)``
would cost ~1e-5 relative error for logits ~ 100). The forward takes the loss relative to the max,
``CE = sum_k Q_k (m - z_k) + |Q| log sum_k exp(z_k - m)``: both terms are >= 0, so nothing cancels.

The kernels are called through their ``torch.ops.dino_pytorch`` custom ops (opaque to
``torch.compile``), which importing :mod:`.triton_kernels` registers: this module imports it, so an
engine object cannot exist without its ops.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import triton_kernels  # noqa: F401  (registers torch.ops.dino_pytorch.*)


class TritonEngine:
    """:class:`.engine.CrossEntropyEngine` on the Triton kernels: float32 / bfloat16 / float16 logits,
    float32 targets and statistics; CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``)."""

    name = "triton"

    def forward(self, logits: Tensor, teacher: Tensor, temp: float, skip_own: bool) -> tuple[Tensor, Tensor]:
        ce, stats = torch.ops.dino_pytorch.mvce_forward(logits, teacher, temp, skip_own)
        return ce, stats

    def backward(
        self, scale: Tensor, logits: Tensor, teacher: Tensor, stats: Tensor, temp: float, skip_own: bool
    ) -> Tensor:
        grad: Tensor = torch.ops.dino_pytorch.mvce_backward(scale, logits, teacher, stats, temp, skip_own)
        return grad

    def row_lse(self, logits: Tensor, stats: Tensor, temp: float) -> Tensor:
        return stats[0] + stats[1]  # the row max of z plus log sum exp(z - max)

    def centered_softmax(self, x: Tensor, center: Tensor, temp: float) -> Tensor:
        out: Tensor = torch.ops.dino_pytorch.centered_softmax(x.detach(), center, float(temp))
        return out

    def column_sum(self, x: Tensor) -> Tensor:
        out: Tensor = torch.ops.dino_pytorch.column_sum(x.detach())
        return out
