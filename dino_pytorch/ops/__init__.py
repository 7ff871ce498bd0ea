"""Numerical kernels of the DINO loss, each with a pure-PyTorch reference.

This package is the one place where a fast path is chosen (:mod:`.dispatch`); callers
(``DINOLoss``) never pick one. Set ``DINO_PYTORCH_DISABLE_TRITON=1`` to force the PyTorch path.
"""
from .cross_entropy import multiview_cross_entropy_reference, other_view_targets
from .dispatch import (
    RowStats,
    backend_for,
    centered_teacher_softmax,
    multiview_cross_entropy,
    teacher_column_sum,
)
from .fused_cross_entropy import MultiviewCrossEntropy, MultiviewCrossEntropyStats
from .fused_head_loss import FusedLastLayerCrossEntropy, fused_last_layer_cross_entropy
from .teacher_targets import sinkhorn_knopp

__all__ = [
    "FusedLastLayerCrossEntropy",
    "MultiviewCrossEntropy",
    "MultiviewCrossEntropyStats",
    "RowStats",
    "backend_for",
    "centered_teacher_softmax",
    "fused_last_layer_cross_entropy",
    "multiview_cross_entropy",
    "multiview_cross_entropy_reference",
    "other_view_targets",
    "sinkhorn_knopp",
    "teacher_column_sum",
]
