"""The numerical core of the DINO and iBOT losses: one cross-entropy over two engines.

An engine (:mod:`.engine`) is the eager PyTorch one (every device, the reference) or the Triton one
(CUDA); :func:`engine_for` is the one place that chooses, and ``DINO_PYTORCH_ENGINE=eager|triton``
forces a choice (a test hook). Callers never pick.
"""
from .centering import centered_teacher_softmax, teacher_column_sum
from .cross_entropy import (
    CrossEntropyFunction,
    RowStats,
    cross_entropy,
    multiview_cross_entropy,
    multiview_cross_entropy_reference,
    other_view_targets,
    row_entropy,
    weighted_cross_entropy,
)
from .eager import EagerEngine
from .engine import ENGINE_ENV, CrossEntropyEngine, engine_for
from .fused_head_loss import FusedLastLayerCrossEntropy, fused_last_layer_cross_entropy
from .views import ViewLayout, split_views

__all__ = [
    "ENGINE_ENV",
    "CrossEntropyEngine",
    "CrossEntropyFunction",
    "EagerEngine",
    "FusedLastLayerCrossEntropy",
    "RowStats",
    "ViewLayout",
    "centered_teacher_softmax",
    "cross_entropy",
    "engine_for",
    "fused_last_layer_cross_entropy",
    "multiview_cross_entropy",
    "multiview_cross_entropy_reference",
    "other_view_targets",
    "row_entropy",
    "split_views",
    "teacher_column_sum",
    "weighted_cross_entropy",
]
