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

Compiled (inductor, CPU): forward is one kernel, per row a max loop and one loop summing the
exponentials and ``Q (m - z)`` (the row stays in L2 between them), so DRAM sees the logits once;
backward is one kernel writing the gradient (or, with ``inplace``, overwriting the logits). The
eager twin runs the same functions on blocks of rows sized to stay in cache.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, Optional

import torch
from torch import Tensor

DISABLE_COMPILE_ENV = "DINO_PYTORCH_DISABLE_COMPILE"
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
        plogp = torch.where(probs > 0, probs * torch.log(probs), torch.zeros_like(probs))
        out = out + (-plogp.sum(dim=-1),)
    return out


def grad_rows(x: Tensor, probs: Tensor, mask: Tensor, log_sum: Tensor, scale: Tensor, student_temp: float) -> Tensor:
    """``(|Q| softmax(z) - Q) * scale`` for a (v, b, K) block, in ``x``'s dtype; log_sum (v, b)."""
    z = x.float() / _per_view(mask, student_temp)
    q = targets(probs, mask)
    m = z.amax(dim=-1, keepdim=True)
    mass = q.sum(dim=-1, keepdim=True)
    return ((mass * torch.exp((z - m) - log_sum.unsqueeze(-1)) - q) * scale).to(x.dtype)


def grad_rows_inplace(
    x: Tensor, probs: Tensor, mask: Tensor, log_sum: Tensor, scale: Tensor, student_temp: float
) -> Tensor:
    """:func:`grad_rows` written into ``x`` itself (its storage is reused for the gradient)."""
    return x.copy_(grad_rows(x, probs, mask, log_sum, scale, student_temp))


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
    inplace: bool, chunk_rows: Optional[int] = None,
) -> Tensor:
    """:func:`grad_rows` over x (V, B, K) block by block; into ``x`` when ``inplace``."""
    num_views, batch, k = x.shape
    out = x if inplace else torch.empty_like(x)
    for v, b0, b1 in _blocks(num_views, batch, k, chunk_rows):
        out[v : v + 1, b0:b1] = grad_rows(
            x[v : v + 1, b0:b1], probs[:, b0:b1], mask[v : v + 1], log_sum[v : v + 1, b0:b1], scale, student_temp
        )
    return out


# -- compiled: lazily, once per process; any failure falls back to the eager twin ----------------
_FAILED: list[str] = []


def compile_disabled() -> bool:
    """True when ``DINO_PYTORCH_DISABLE_COMPILE=1`` or a compile already failed in this process."""
    return bool(_FAILED) or os.environ.get(DISABLE_COMPILE_ENV, "0").strip() == "1"


@functools.cache
def _compiled(name: str) -> Callable[..., Any]:
    fn = {"forward": forward_rows, "grad": grad_rows, "grad_inplace": grad_rows_inplace}[name]
    # dynamic=False: the shapes of a training run are fixed, and static loops vectorise best.
    compiled: Callable[..., Any] = torch.compile(fn, dynamic=False)  # type: ignore[call-overload]
    return compiled


def _agree(compiled: Any, reference: Any) -> bool:
    """Same non-finite entries, and the finite ones within 1e-3 of the reference's largest value
    (the engines only sum in different orders: measured differences are ~1e-6 relative)."""
    pairs = zip(compiled, reference) if isinstance(reference, tuple) else [(compiled, reference)]
    for a, b in pairs:
        finite = torch.isfinite(b)
        if not torch.equal(torch.isfinite(a), finite):
            return False
        if finite.any():
            bound = 1e-3 * float(b[finite].abs().max()) + 1e-12
            if float((a[finite].float() - b[finite].float()).abs().max()) > bound:
                return False
    return True


_CHECKED: set[tuple[Any, ...]] = set()


def _run_compiled(name: str, eager: Callable[[], Any], *args: Any, reference: Optional[Callable[[], Any]] = None,
                  restore: Optional[Callable[[Any], Any]] = None) -> Any:
    """The compiled ``name`` on ``args``; the eager twin when compiling is off or fails.

    The first result of each compiled graph (kind and shapes) in a process is checked against the
    eager twin (``reference``, or ``eager`` itself): a compiler can also miscompile instead of
    failing (seen: non-finite rows from the forward kernel under ``ATEN_CPU_CAPABILITY=avx2``), and
    that must not reach training. On disagreement the process switches to the eager engine for
    good, with one line. ``reference`` is computed before the compiled call (for in-place kernels,
    which destroy their input) and ``restore(reference)`` gives the value to return in that case.
    """
    if not compile_disabled():
        # one check per compiled graph: dynamic=False compiles anew for each shape
        key = (name, *((tuple(a.shape), a.dtype) if isinstance(a, Tensor) else a for a in args))
        check = key not in _CHECKED
        expected = reference() if check and reference is not None else None
        try:
            result = _compiled(name)(*args)
        except Exception as err:  # no C++ compiler, unsupported platform, ...: keep training
            _FAILED.append(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            print(f"dino_pytorch: torch.compile of the fused loss failed ({_FAILED[-1][:200]}); "
                  "using the eager engine", file=sys.stderr)
        else:
            if not check:
                return result
            _CHECKED.add(key)
            if expected is None:
                expected = eager()
            if _agree(result, expected):
                return result
            _FAILED.append(f"compiled {name} disagrees with the eager engine")
            print(f"dino_pytorch: the compiled fused loss ({name}) disagrees with the eager engine on its "
                  "first call; using the eager engine", file=sys.stderr)
            return restore(expected) if restore is not None else expected
    return eager()


def compiled_forward(
    x: Tensor, probs: Tensor, mask: Tensor, student_temp: float, entropy: bool
) -> tuple[Tensor, ...]:
    """:func:`forward_rows` over all of x (V, B, K) as one compiled kernel (eager twin on failure)."""
    return _run_compiled(
        "forward", lambda: eager_forward(x, probs, mask, student_temp, entropy), x, probs, mask, student_temp, entropy
    )


def compiled_grad(
    x: Tensor, probs: Tensor, mask: Tensor, log_sum: Tensor, scale: Tensor, student_temp: float, inplace: bool
) -> Tensor:
    """:func:`grad_rows` over all of x (V, B, K) as one compiled kernel (eager twin on failure)."""
    name = "grad_inplace" if inplace else "grad"
    return _run_compiled(
        name, lambda: eager_grad(x, probs, mask, log_sum, scale, student_temp, inplace),
        x, probs, mask, log_sum, scale, student_temp,
        # in place, the compiled kernel overwrites x: the check's reference is taken first, into a new buffer
        reference=(lambda: eager_grad(x, probs, mask, log_sum, scale, student_temp, False)) if inplace else None,
        restore=(lambda expected: x.copy_(expected)) if inplace else None,
    )
