"""Triton kernels of the DINO loss (CUDA), each the twin of a PyTorch function.

| kernel                          | PyTorch twin                                   |
|---------------------------------|------------------------------------------------|
| ``centered_softmax``            | :meth:`.eager.EagerEngine.centered_softmax`    |
| ``cross_entropy_forward``       | :meth:`.eager.EagerEngine.forward`             |
| ``cross_entropy_backward``      | :meth:`.eager.EagerEngine.backward`            |
| ``column_sum``                  | :meth:`.eager.EagerEngine.column_sum`          |

Inputs may be float32, bfloat16 or float16; every kernel accumulates in float32. One program owns
one row and walks K in ``BLOCK_K`` tiles with an online (streaming) logsumexp, so a row is read once
per pass whatever K. The teacher targets ``Q_s`` are summed inside the kernels from the (T, B, K)
probabilities (predicated loads skip the student's own view when ``SKIP_OWN``) instead of being
materialised per view; iBOT's one-target-per-row case is V = T = 1 without ``SKIP_OWN``.

The launchers are also registered as ``torch.ops.dino_pytorch.*`` custom ops with fake (meta)
implementations, so ``torch.compile`` treats them as opaque calls instead of breaking the graph.

This module imports ``triton``: import it only where triton is importable (:mod:`.engine` does,
through :mod:`.triton_engine`; importing it is what registers the ops).
Under ``TRITON_INTERPRET=1`` (set before triton is imported) the launchers run on CPU tensors.
"""
# No `from __future__ import annotations`: torch.library reads the op schemas from real annotations.
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

# Widest K tile of the row kernels; 4096 float32 per program step keeps registers in check at 8 warps.
MAX_BLOCK_K = 4096
# Column-sum tile: narrow, so K=65536 still gives hundreds of programs.
COLUMN_BLOCK_K = 256
# Initial running max: finite (unlike -inf), so "mass * (m_new - m)" is 0, not NaN, on the first tile.
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _scalar(value, BLOCK_K: tl.constexpr):
    # A 0-d float32 tensor, the type the loop-carried reductions have.
    return tl.max(tl.full([BLOCK_K], value, tl.float32), axis=0)


@triton.jit
def _targets_tile(p_row, stride_pt, cols, mask, s, NUM_TEACHER: tl.constexpr, SKIP_OWN: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    # Q_s tile: sum over teacher views t (t != s when SKIP_OWN), in view order (as the eager engine).
    # The load of the skipped view is predicated off, so it costs no memory traffic; +0.0 is exact.
    q = tl.zeros([BLOCK_K], dtype=tl.float32)
    for t in tl.static_range(NUM_TEACHER):
        if SKIP_OWN:
            q += tl.load(p_row + t * stride_pt + cols, mask=mask & (s != t), other=0.0)
        else:
            q += tl.load(p_row + t * stride_pt + cols, mask=mask, other=0.0)
    return q


@triton.jit
def _program_row(z_ptr, p_ptr, batch, num_views, stride_z, stride_pb):
    """This program's student view s, image b, logits row and the row pointers of z and of P[:, b].

    Programs are batch-major (all V views of image b are neighbours), so the T teacher rows of b
    are read from HBM once and then hit L2 for the other views.
    """
    pid = tl.program_id(0)
    b = pid // num_views
    s = pid % num_views
    row = s * batch + b
    return s, row, z_ptr + row.to(tl.int64) * stride_z, p_ptr + b.to(tl.int64) * stride_pb


@triton.jit
def _cross_entropy_forward_kernel(
    z_ptr, p_ptr, ce_ptr, stats_ptr,
    batch, num_views, K,
    stride_z, stride_pt, stride_pb,
    temp,
    NUM_TEACHER: tl.constexpr,
    SKIP_OWN: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    s, row, z_row, p_row = _program_row(z_ptr, p_ptr, batch, num_views, stride_z, stride_pb)
    offs = tl.arange(0, BLOCK_K)
    m = _scalar(_NEG_BIG, BLOCK_K)
    total = _scalar(0.0, BLOCK_K)  # sum exp(z - m)
    gap = _scalar(0.0, BLOCK_K)  # sum Q (m - z) >= 0
    mass = _scalar(0.0, BLOCK_K)  # sum Q
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs
        mask = cols < K
        z = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32) / temp
        q = _targets_tile(p_row, stride_pt, cols, mask, s, NUM_TEACHER, SKIP_OWN, BLOCK_K)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        # Re-base the gap to the new max, then add this tile (masked lanes: z = -inf, q = 0).
        gap = gap + mass * (m_new - m) + tl.sum(q * tl.where(mask, m_new - z, 0.0), axis=0)
        mass = mass + tl.sum(q, axis=0)
        m = m_new
    log_total = tl.log(total)
    rows = batch * num_views
    tl.store(ce_ptr + row, gap + mass * log_total)
    tl.store(stats_ptr + row, m)
    tl.store(stats_ptr + rows + row, log_total)
    tl.store(stats_ptr + 2 * rows + row, mass)


@triton.jit
def _cross_entropy_backward_kernel(
    z_ptr, p_ptr, stats_ptr, scale_ptr, out_ptr,
    batch, num_views, K,
    stride_z, stride_pt, stride_pb, stride_out,
    temp,
    NUM_TEACHER: tl.constexpr,
    SKIP_OWN: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    s, row, z_row, p_row = _program_row(z_ptr, p_ptr, batch, num_views, stride_z, stride_pb)
    out_row = out_ptr + row.to(tl.int64) * stride_out
    rows = batch * num_views
    row_max = tl.load(stats_ptr + row)
    log_total = tl.load(stats_ptr + rows + row)
    mass = tl.load(stats_ptr + 2 * rows + row)
    # g * coef / tau (times the row's weight when ROW_SCALE), read on the device: no host sync.
    if ROW_SCALE:
        scale = tl.load(scale_ptr + row)
    else:
        scale = tl.load(scale_ptr)
    offs = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs
        mask = cols < K
        z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32) / temp
        q = _targets_tile(p_row, stride_pt, cols, mask, s, NUM_TEACHER, SKIP_OWN, BLOCK_K)
        # (z - m) first: exact near the max, so the softmax keeps full precision (see torch twin).
        grad = (mass * tl.exp((z - row_max) - log_total) - q) * scale
        tl.store(out_row + cols, grad.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _centered_softmax_kernel(
    x_ptr, c_ptr, out_ptr, K, stride_x, stride_out, temp, BLOCK_K: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    out_row = out_ptr + row * stride_out
    offs = tl.arange(0, BLOCK_K)
    m = _scalar(_NEG_BIG, BLOCK_K)
    total = _scalar(0.0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs
        mask = cols < K
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.where(mask, (x - tl.load(c_ptr + cols, mask=mask, other=0.0)) / temp, float("-inf"))
        m_new = tl.maximum(m, tl.max(y, axis=0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(y - m_new), axis=0)
        m = m_new
    inv_total = 1.0 / total
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs
        mask = cols < K
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        y = (x - tl.load(c_ptr + cols, mask=mask, other=0.0)) / temp
        tl.store(out_row + cols, tl.exp(y - m) * inv_total, mask=mask)


@triton.jit
def _column_sum_kernel(x_ptr, out_ptr, N, K, stride_x, BLOCK_K: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = cols < K
    ptrs = x_ptr + cols
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for _ in range(0, N):
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        ptrs += stride_x  # pointer arithmetic is 64-bit: no int32 overflow on huge N * K
    tl.store(out_ptr + cols, acc, mask=mask)


# -- launchers ------------------------------------------------------------------------------------
def _row_block(k: int, block_k: Optional[int]) -> tuple[int, int]:
    block = block_k or min(triton.next_power_of_2(k), MAX_BLOCK_K)
    return block, (8 if block >= 2048 else 4)


def _unit_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_teacher(teacher: Tensor) -> Tensor:
    if teacher.dtype != torch.float32 or teacher.ndim != 3:
        raise ValueError(f"teacher must be (T, B, K) float32, got {tuple(teacher.shape)} {teacher.dtype}")
    return _unit_stride(teacher)


def centered_softmax(x: Tensor, center: Tensor, temp: float, block_k: Optional[int] = None) -> Tensor:
    """``softmax((x - c) / temp)`` per row. x: (N, K) any float dtype; center: (1, K) or (K,) float32.

    Returns (N, K) float32.
    """
    x = _unit_stride(x)
    center = center.reshape(-1).float().contiguous()
    n, k = x.shape
    out = torch.empty((n, k), dtype=torch.float32, device=x.device)
    block, warps = _row_block(k, block_k)
    _centered_softmax_kernel[(n,)](
        x, center, out, k, x.stride(0), out.stride(0), float(temp), BLOCK_K=block, num_warps=warps
    )
    return out


def column_sum(x: Tensor, block_k: Optional[int] = None) -> Tensor:
    """Column sum of (N, K) ``x`` accumulated in float32. Returns (1, K) float32."""
    x = _unit_stride(x)
    n, k = x.shape
    out = torch.empty((1, k), dtype=torch.float32, device=x.device)
    block = block_k or min(triton.next_power_of_2(k), COLUMN_BLOCK_K)
    _column_sum_kernel[(triton.cdiv(k, block),)](x, out, n, k, x.stride(0), BLOCK_K=block, num_warps=2)
    return out


def cross_entropy_forward(
    student: Tensor, teacher: Tensor, student_temp: float, skip_own: bool = True, block_k: Optional[int] = None
) -> tuple[Tensor, Tensor]:
    """``(ce (V*B,), stats (3, V*B))`` float32, as :meth:`.eager.EagerEngine.forward`.

    student: (V*B, K) crop-major logits (fp32/bf16/fp16); teacher: (T, B, K) float32 probabilities.
    stats: row max, ``log sum exp(z - max)`` and ``|Q|`` of each row, with ``z = x / tau``.
    """
    student, teacher = _unit_stride(student), _check_teacher(teacher)
    num_teacher, batch, k = teacher.shape
    rows = student.shape[0]
    ce = torch.empty(rows, dtype=torch.float32, device=student.device)
    stats = torch.empty((3, rows), dtype=torch.float32, device=student.device)
    block, warps = _row_block(k, block_k)
    _cross_entropy_forward_kernel[(rows,)](
        student, teacher, ce, stats,
        batch, rows // batch, k,
        student.stride(0), teacher.stride(0), teacher.stride(1),
        float(student_temp),
        NUM_TEACHER=num_teacher, SKIP_OWN=skip_own, BLOCK_K=block, num_warps=warps,
    )
    return ce, stats


def cross_entropy_backward(
    scale: Tensor, student: Tensor, teacher: Tensor, stats: Tensor, student_temp: float, skip_own: bool = True,
    block_k: Optional[int] = None,
) -> Tensor:
    """``(mass * softmax(z / tau) - Q) * scale`` per row, (V*B, K) in the student's dtype.

    scale: 0-dim, or (V*B,) per row, float32 on the device; stats: (3, V*B) float32 from the forward.
    """
    student, teacher = _unit_stride(student), _check_teacher(teacher)
    num_teacher, batch, k = teacher.shape
    rows = student.shape[0]
    out = torch.empty((rows, k), dtype=student.dtype, device=student.device)
    block, warps = _row_block(k, block_k)
    _cross_entropy_backward_kernel[(rows,)](
        student, teacher, stats.contiguous(), scale.float().reshape(-1).contiguous(), out,
        batch, rows // batch, k,
        student.stride(0), teacher.stride(0), teacher.stride(1), out.stride(0),
        float(student_temp),
        NUM_TEACHER=num_teacher, SKIP_OWN=skip_own, ROW_SCALE=scale.ndim > 0, BLOCK_K=block, num_warps=warps,
    )
    return out


# -- torch.library ops: opaque to torch.compile ----------------------------------------------------
@torch.library.custom_op("dino_pytorch::mvce_forward", mutates_args=())
def _mvce_forward_op(student: Tensor, teacher: Tensor, student_temp: float, skip_own: bool) -> tuple[Tensor, Tensor]:
    return cross_entropy_forward(student, teacher, student_temp, skip_own)


@_mvce_forward_op.register_fake
def _(student: Tensor, teacher: Tensor, student_temp: float, skip_own: bool) -> tuple[Tensor, Tensor]:
    rows = student.shape[0]
    return student.new_empty((rows,), dtype=torch.float32), student.new_empty((3, rows), dtype=torch.float32)


@torch.library.custom_op("dino_pytorch::mvce_backward", mutates_args=())
def _mvce_backward_op(
    scale: Tensor, student: Tensor, teacher: Tensor, stats: Tensor, student_temp: float, skip_own: bool
) -> Tensor:
    return cross_entropy_backward(scale, student, teacher, stats, student_temp, skip_own)


@_mvce_backward_op.register_fake
def _(scale: Tensor, student: Tensor, teacher: Tensor, stats: Tensor, student_temp: float, skip_own: bool) -> Tensor:
    return student.new_empty(student.shape)


@torch.library.custom_op("dino_pytorch::centered_softmax", mutates_args=())
def _centered_softmax_op(x: Tensor, center: Tensor, temp: float) -> Tensor:
    return centered_softmax(x, center, temp)


@_centered_softmax_op.register_fake
def _(x: Tensor, center: Tensor, temp: float) -> Tensor:
    return x.new_empty(x.shape, dtype=torch.float32)


@torch.library.custom_op("dino_pytorch::column_sum", mutates_args=())
def _column_sum_op(x: Tensor) -> Tensor:
    return column_sum(x)


@_column_sum_op.register_fake
def _(x: Tensor) -> Tensor:
    return x.new_empty((1, x.shape[1]), dtype=torch.float32)
