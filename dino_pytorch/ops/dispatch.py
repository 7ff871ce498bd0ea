"""The one place where a backend is chosen: Triton kernels or the PyTorch path.

Rule: a CUDA tensor of dtype float32/bfloat16/float16, with ``triton`` importable and the
environment variable ``DINO_PYTORCH_DISABLE_TRITON`` not set to ``1`` -> ``"triton"``; anything
else (CPU, float64, no triton, disabled) -> ``"torch"``. Without a GPU, launching a Triton kernel
fails ("0 active drivers"), which is why the device decides and not just the import.

Within the PyTorch backend the loss has two engines (:func:`loss_engine`): ``"compiled"`` (the
closed form as ``torch.compile``-d CPU kernels, :mod:`.closed_form`) for large float32/half CPU
logits, and ``"torch"`` (eager ``log_softmax`` blocks) for the rest: float64, small inputs (not
worth a compile), inside an outer ``torch.compile`` (which compiles the eager engine itself), or
with ``DINO_PYTORCH_DISABLE_COMPILE=1`` or after a failed compile. The centred teacher softmax
follows the same rule (one compiled kernel, or the eager function).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Literal, NamedTuple, Optional, Union, overload

import torch
from torch import Tensor

from . import compiled, teacher_targets
from .fused_cross_entropy import MultiviewCrossEntropy, MultiviewCrossEntropyStats
from .views import MultiView, split_views

DISABLE_ENV = "DINO_PYTORCH_DISABLE_TRITON"


class RowStats(NamedTuple):
    """Per-row statistics of the fused loss (float32, no gradient).

    lse: (V*B,) ``log sum_k exp(x_k / tau)`` of each student row.
    teacher_entropy: (T*B,) ``-sum_k P_k log P_k`` of each teacher row (nats; ln K = uniform).
    """

    lse: Tensor
    teacher_entropy: Tensor
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def triton_importable() -> bool:
    """True when ``import triton`` works (cached: importing is slow and its result fixed)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising anything else
        return False
    return True


def triton_disabled() -> bool:
    """True when ``DINO_PYTORCH_DISABLE_TRITON=1``; read at each eager call."""
    return os.environ.get(DISABLE_ENV, "0").strip() == "1"


@torch.compiler.assume_constant_result
def triton_enabled() -> bool:
    """Not disabled and importable; torch.compile evaluates it once, while tracing (so a compiled
    graph keeps the backend it was traced with)."""
    return not triton_disabled() and triton_importable()


def backend_for(x: Union[Tensor, torch.device, str], dtype: Optional[torch.dtype] = None) -> str:
    """``"triton"`` or ``"torch"``: the backend the ops of this package use for ``x``.

    Args:
        x: a tensor, or a device (``torch.device("cuda")``, ``"cpu"``) to ask about a device alone.
        dtype: the dtype to ask about with a device (a tensor brings its own).
    """
    if isinstance(x, Tensor):
        device, dtype = x.device, x.dtype
    else:
        device = torch.device(x)
    if device.type != "cuda":
        return "torch"
    if dtype is not None and dtype not in TRITON_DTYPES:
        return "torch"
    return "triton" if triton_enabled() else "torch"


# Below this many logits a compile (seconds, once per shape) does not pay for itself.
COMPILE_MIN_ELEMENTS = 1 << 20
COMPILE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def loss_engine(rows: Tensor) -> str:
    """``"triton"``, ``"compiled"`` or ``"torch"``: the engine of the fused loss for (V*B, K) logits."""
    backend = backend_for(rows)
    if backend == "triton":
        return backend
    return "compiled" if compile_worthwhile(rows) else "torch"


def compile_worthwhile(x: Tensor, numel: Optional[int] = None) -> bool:
    """A large (``numel``, default ``x.numel()``) float32/half CPU tensor, compiling allowed, and not
    already inside a compiled graph."""
    size = x.numel() if numel is None else numel
    return x.dtype in COMPILE_DTYPES and compiled.worthwhile(x.device, size, COMPILE_MIN_ELEMENTS)


def _triton_ops() -> Any:
    from . import triton_kernels  # noqa: F401  (registers torch.ops.dino_pytorch.*)

    return torch.ops.dino_pytorch


@overload
def multiview_cross_entropy(
    student: MultiView, teacher_probs: MultiView, student_temp: float, *, batch_size: Optional[int] = ...,
    chunk_rows: Optional[int] = ..., overwrite_logits: bool = ..., return_stats: Literal[False] = ...,
) -> Tensor: ...


@overload
def multiview_cross_entropy(
    student: MultiView, teacher_probs: MultiView, student_temp: float, *, batch_size: Optional[int] = ...,
    chunk_rows: Optional[int] = ..., overwrite_logits: bool = ..., return_stats: Literal[True],
) -> tuple[Tensor, RowStats]: ...


def multiview_cross_entropy(
    student: MultiView,
    teacher_probs: MultiView,
    student_temp: float,
    *,
    batch_size: Optional[int] = None,
    chunk_rows: Optional[int] = None,
    overwrite_logits: bool = False,
    return_stats: bool = False,
) -> Union[Tensor, tuple[Tensor, RowStats]]:
    """DINO multi-view cross-entropy with a memory-lean closed-form backward.

    Equals :func:`.cross_entropy.multiview_cross_entropy_reference`: the mean over the
    T * (V - 1) (teacher view i, student view v != i) pairs of the batch-mean cross-entropy.

    Args:
        student: (V*B, K) crop-major logits (``MultiCropWrapper`` output), (V, B, K), or a list of
            V (B, K). Any floating dtype; computed in float32 (float64 stays float64).
        teacher_probs: (T, B, K), (T*B, K) or a list of T (B, K) probabilities, T <= V; teacher view i
            is student view i. Targets only: no gradient flows into them.
        student_temp: tau_s.
        batch_size: B, needed only when both tensors are 2-D.
        chunk_rows: eager torch engine only: batch rows per chunk (None: about 16 MB of float32 logits per chunk).
        overwrite_logits: opt-in (CPU engines): forward computes the gradient together with the
            loss (one pass over the logits instead of three) and writes it over the logits, which
            hold the gradient from then on; nothing else is saved for backward. Only for logits
            that nothing reads after the loss: the output of a linear layer is fine; a leaf (or a
            view of one) is refused, and any other node that saved the logits raises on backward
            (their version counter is bumped). Ignored off the CPU and inside ``torch.compile``.
        return_stats: also return per-row statistics, from the same passes as the loss.

    Returns:
        0-dim float32 loss (float64 for float64 logits); its gradient has the logits' dtype. With
        ``return_stats``: ``(loss, RowStats(lse (V*B,), teacher_entropy (T*B,)))``.
    """
    rows, teacher, num_views = split_views(student, teacher_probs, batch_size)
    if overwrite_logits and rows.requires_grad and (rows.is_leaf or (rows._base is not None and rows._base.is_leaf)):
        raise ValueError("overwrite_logits=True would overwrite a leaf tensor with its own gradient; "
                         "pass the output of a layer (e.g. the head's last linear layer)")
    # CPU only (on CUDA the Triton kernels stream each row once anyway, and the caching allocator has
    # no page faults); inside an outer torch.compile the input is not mutated: the graph fuses itself.
    overwrite_logits = overwrite_logits and rows.device.type == "cpu" and not torch.compiler.is_compiling()
    engine = loss_engine(rows)
    # The engine stays the last argument unless overwriting is asked for (callers and tests read it there).
    args: tuple[Any, ...] = (rows, teacher, float(student_temp), num_views, chunk_rows, engine)
    args += (True,) if overwrite_logits else ()
    if return_stats:
        loss, lse, entropy = MultiviewCrossEntropyStats.apply(*args)
        return loss, RowStats(lse, entropy)
    return MultiviewCrossEntropy.apply(*args)


def centered_teacher_softmax(teacher_logits: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """``softmax((t - c) / tau_t)`` in float32; see :func:`.teacher_targets.centered_teacher_softmax`.

    Args:
        teacher_logits: (N, K), any floating dtype. center: (1, K) float32. teacher_temp: tau_t.

    Returns:
        (N, K) float32, detached.
    """
    if backend_for(teacher_logits) == "triton":
        return _triton_ops().centered_softmax(teacher_logits.detach(), center, float(teacher_temp))
    if compile_worthwhile(teacher_logits):
        return teacher_targets.compiled_centered_teacher_softmax(teacher_logits, center, teacher_temp)
    return teacher_targets.centered_teacher_softmax(teacher_logits, center, teacher_temp)


def teacher_column_sum(teacher_logits: Tensor) -> Tensor:
    """Sum of the rows of (N, K) raw teacher logits, accumulated in float32: (1, K) float32, detached.

    The centre's batch statistic; no float32 copy of half-precision input is made.
    """
    x = teacher_logits.detach()
    if backend_for(x) == "triton":
        return _triton_ops().column_sum(x)
    return torch.sum(x, dim=0, keepdim=True, dtype=torch.float32)
