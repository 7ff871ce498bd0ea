"""The teacher side's two ops on the engine: the centred sharpened softmax and the centre's column sum.

Both run on the engine :func:`.engine.engine_for` picks for the teacher logits (Triton kernels on
CUDA, PyTorch elsewhere), like the cross-entropy.
"""
from __future__ import annotations

from torch import Tensor

from .engine import engine_for


def centered_teacher_softmax(teacher_logits: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """``softmax((t - c) / tau_t)`` in float32, detached.

    Args:
        teacher_logits: (N, K) logits, any floating dtype.
        center: (1, K) float32 centre.
        teacher_temp: tau_t > 0.

    Returns:
        (N, K) float32 probabilities.
    """
    return engine_for(teacher_logits).centered_softmax(teacher_logits.detach(), center, float(teacher_temp))


def teacher_column_sum(teacher_logits: Tensor) -> Tensor:
    """Sum of the rows of (N, K) raw teacher logits, accumulated in float32: (1, K) float32, detached.

    The centre's batch statistic; no float32 copy of half-precision input is made.
    """
    return engine_for(teacher_logits).column_sum(teacher_logits.detach())
