"""Mixed precision for a DINO step: the autocast context and the gradient scaler of a precision name,
and whether a device runs a half precision natively.

``"fp32"`` runs as is; ``"bf16"`` autocasts to bfloat16 (no scaler needed: its exponent range is
float32's); ``"fp16"`` autocasts to float16 and needs a :class:`torch.amp.GradScaler`, as the
official ``--use_fp16``. The loss itself always computes in float32 (:mod:`dino_pytorch.ops`).
``"auto"`` is a request, not a precision: :func:`resolve_precision` turns it into ``"bf16"`` where
the device does bf16 natively and ``"fp32"`` elsewhere.

Native support on a CPU cannot be read off ``torch.backends.cpu.get_cpu_capability()``: it says
``"AVX512"`` with or without AVX512-BF16 / AMX. ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``
is not enough either. Measured on a 2-core Xeon with AVX512-BF16, AVX512-FP16 and AMX-BF16 (torch
2.14, one thread; the time of a 256 x 256 x 256 bf16 or fp16 matmul over an fp32 one, minimum of
5), capping oneDNN's instruction set with ``ONEDNN_MAX_CPU_ISA``:

| `ONEDNN_MAX_CPU_ISA` | mkldnn bf16 query | bf16 / fp32 | mkldnn fp16 query | fp16 / fp32 |
|---|---|---|---|---|
| unset (AMX) | True | 0.3 | True | 1.1 |
| `AVX512_CORE_BF16` (no AMX) | True | 1.8 | False | about 65 |
| `AVX512_CORE` (no BF16) | True | 5.1 | False | about 65 |
| `AVX2` (the developers' reference class) | False | 43 | False | about 65 |

An autocast 3x3 convolution (16 x 32 x 28 x 28) follows: bf16 / fp32 0.6 with AMX, 3.7 on
`AVX512_CORE`, 21 on `AVX2`. `ATEN_CPU_CAPABILITY=avx2` alone changes neither (0.3: oneDNN still
uses AMX), so an AVX2 machine is emulated with `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`.
The query is therefore trusted when it says False (no probe: emulated, tens of times slower), and
otherwise a probe of a few milliseconds times the matmul itself (:func:`cpu_slowdown`); it honours
both variables because it measures what runs.
"""
from __future__ import annotations

import contextlib
import functools
import time
from typing import Optional, Union

import torch

from .validate import check_choice

PRECISIONS = ("fp32", "bf16", "fp16")
"""The precisions a step runs in: what :func:`autocast` and :func:`grad_scaler` accept."""
PRECISION_REQUESTS = ("auto", *PRECISIONS)
"""What a user may ask for: a precision, or ``"auto"`` (:func:`resolve_precision`)."""
# A half precision is native on a CPU when its matmul takes at most this multiple of fp32's time.
# Measured: bf16 0.3 with AMX, 1.8 and more without (table above); fp16 at fp32 speed (1.1 with
# AVX512-FP16) is not slow, so it counts as native, while "auto" never picks fp16. 1.4 sits between.
NATIVE_MAX_SLOWDOWN = 1.4
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: Union[str, torch.device]) -> contextlib.AbstractContextManager[object]:
    """The autocast context for ``precision`` on ``device``'s type (a no-op for ``"fp32"``)."""
    _check_resolved(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[precision])


def grad_scaler(precision: str, device: Union[str, torch.device]) -> Optional[torch.amp.GradScaler]:
    """A :class:`torch.amp.GradScaler` for ``"fp16"``, else None (nothing to scale)."""
    _check_resolved(precision)
    return torch.amp.GradScaler(torch.device(device).type) if precision == "fp16" else None


def _check_resolved(precision: str) -> None:
    if precision == "auto":
        raise ValueError("precision='auto' is a request: resolve it first with resolve_precision('auto', device)")
    check_choice("precision", precision, PRECISIONS)


@functools.cache
def cpu_slowdown(precision: str) -> float:
    """Time of a CPU matmul in ``precision`` over the same matmul in float32 (1.0 for ``"fp32"``).

    ``inf`` without timing anything when oneDNN reports no support (``torch.ops.mkldnn``'s query, or
    a build without oneDNN: the matmul is emulated, tens of times slower); otherwise a probe of 5 interleaved
    256 x 256 x 256 matmuls each, on one thread (a one-core ratio barely moves with other
    processes' load; two threads' did, 0.06 to 0.97), minimum times. It takes 15 to 35 ms, oneDNN's
    first-use kernel generation included, once per process.
    """
    check_choice("precision", precision, PRECISIONS)
    if precision == "fp32":
        return 1.0
    if not _onednn_supports(precision):
        return float("inf")
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 256, generator=generator), torch.randn(256, 256, generator=generator)
    pairs = {"fp32": (a, b), precision: (a.to(_DTYPES[precision]), b.to(_DTYPES[precision]))}
    best = dict.fromkeys(pairs, float("inf"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for round_ in range(6):  # round 0 warms up (oneDNN builds its kernels on first use)
            for name, (x, y) in pairs.items():
                start = time.perf_counter()
                torch.mm(x, y)
                if round_:
                    best[name] = min(best[name], time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return best[precision] / max(best["fp32"], 1e-9)


def _onednn_supports(precision: str) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(getattr(torch.ops.mkldnn, f"_is_mkldnn_{precision}_supported")())
    except (AttributeError, RuntimeError):  # a private query a version may lack: let the probe decide
        return True


def native_precision(precision: str, device: Union[str, torch.device]) -> bool:
    """Whether ``device`` runs ``precision`` natively, i.e. not several times slower than fp32.

    fp32: always. CUDA: bf16 where ``torch.cuda.is_bf16_supported(including_emulation=False)``
    (Ampere and later), fp16 always. CPU: the half precision's matmul takes at most
    ``NATIVE_MAX_SLOWDOWN`` times fp32's (:func:`cpu_slowdown`): bf16 with AMX, fp16 with
    AVX512-FP16. Other device types (mps, xpu, ...): unknown, False.
    """
    check_choice("precision", precision, PRECISIONS)
    if precision == "fp32":
        return True
    kind = torch.device(device).type
    if kind == "cuda":
        return precision == "fp16" or torch.cuda.is_bf16_supported(including_emulation=False)
    if kind == "cpu":
        return cpu_slowdown(precision) <= NATIVE_MAX_SLOWDOWN
    return False


def resolve_precision(precision: str, device: Union[str, torch.device]) -> str:
    """``"auto"`` -> ``"bf16"`` where ``device`` does bf16 natively (:func:`native_precision`), else
    ``"fp32"``; any other name of ``PRECISION_REQUESTS`` is returned as it is.

    Raises ValueError naming ``precision`` and its value for an unknown name.
    """
    check_choice("precision", precision, PRECISION_REQUESTS)
    if precision != "auto":
        return precision
    return "bf16" if native_precision("bf16", device) else "fp32"


def support_note(precision: str, device: Union[str, torch.device]) -> str:
    """A few words on ``precision``'s native support on ``device``, for a program's one-line message,
    e.g. ``"native bf16 on this CPU: a bf16 matmul takes 0.30x the fp32 time"`` or ``"no native bf16 on
    this CPU, no AMX: oneDNN reports no bf16 support, so it is emulated"``."""
    native = native_precision(precision, device)
    kind = torch.device(device).type
    if precision == "fp32":
        return f"fp32 on this {kind}"
    if kind == "cpu":
        slowdown = cpu_slowdown(precision)
        measured = (f"oneDNN reports no {precision} support, so it is emulated" if slowdown == float("inf")
                    else f"a {precision} matmul takes {slowdown:.2f}x the fp32 time")
        if native:
            return f"native {precision} on this CPU: {measured}"
        return f"no native {precision} on this CPU, no {'AMX' if precision == 'bf16' else 'AVX512-FP16'}: {measured}"
    if kind == "cuda":
        return f"{'native' if native else 'no native'} {precision} on {torch.cuda.get_device_name(device)}"
    return f"{precision} support on a {kind} device is not known"
