"""The engine protocol of the cross-entropy and the one place where an engine is chosen.

Two engines implement it: :class:`.eager.EagerEngine` (PyTorch, every device: the reference) and
:class:`.triton_engine.TritonEngine` (Triton kernels, CUDA). :func:`engine_for` picks one:

- Triton for a CUDA float32 / bfloat16 / float16 tensor when ``triton`` imports;
- eager for everything else (the CPU, float64, no triton).

``DINO_PYTORCH_ENGINE=eager|triton`` forces one, read at every call: a test hook, not a route
of its own. Forcing Triton on CPU tensors needs ``TRITON_INTERPRET=1`` set before triton is
imported (the Triton interpreter; how the CUDA route is tested without a GPU). float64 always
runs eagerly: the kernels compute in float32.
"""
from __future__ import annotations

import os
from typing import Any, Protocol

import torch
from torch import Tensor

ENGINE_ENV = "DINO_PYTORCH_ENGINE"
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CrossEntropyEngine(Protocol):
    """What the cross-entropy (:mod:`.cross_entropy`) and the teacher ops need from an engine.

    Shapes: ``logits`` (V*B, K) crop-major rows; ``teacher`` (T, B, K) targets in the compute dtype
    (:func:`compute_dtype` of the logits); student row ``v*B + b`` is paired with teacher rows
    ``(t, b)``, all t, or all t != v when ``skip_own``.
    """

    name: str

    def forward(self, logits: Tensor, teacher: Tensor, temp: float, skip_own: bool) -> tuple[Tensor, Tensor]:
        """``(ce, stats)``: (V*B,) row cross-entropies in the compute dtype, and the engine's row
        statistics (whatever its backward needs besides the logits and targets)."""
        ...

    def backward(
        self, scale: Tensor, logits: Tensor, teacher: Tensor, stats: Tensor, temp: float, skip_own: bool
    ) -> Tensor:
        """``(|Q| softmax(z / tau) - Q) * scale`` per row, (V*B, K) in the logits' dtype, new memory.
        ``scale``: 0-dim, or (V*B,) per row, in the compute dtype."""
        ...

    def row_lse(self, logits: Tensor, stats: Tensor, temp: float) -> Tensor:
        """(V*B,) float32 ``log sum exp(z / tau)`` per row."""
        ...

    def centered_softmax(self, x: Tensor, center: Tensor, temp: float) -> Tensor:
        """``softmax((x - c) / temp)`` per row: x (N, K) any floating dtype, c (1, K) float32 -> (N, K) float32."""
        ...

    def column_sum(self, x: Tensor) -> Tensor:
        """Column sum of (N, K) ``x`` accumulated in float32: (1, K) float32."""
        ...


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for every input dtype except float64 (kept, e.g. for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Built once, on first use: plain module state rather than functools caches, which torch.compile
# traces through with a warning.
_CACHE: dict[str, Any] = {}


def triton_importable() -> bool:
    """True when ``import triton`` works (cached: importing is slow and its result fixed)."""
    if "importable" not in _CACHE:
        try:
            import triton  # noqa: F401
        except Exception:  # ImportError, or a broken install raising anything else
            _CACHE["importable"] = False
        else:
            _CACHE["importable"] = True
    return bool(_CACHE["importable"])


def forced_engine() -> str:
    """``"eager"``, ``"triton"`` or ``""`` (not forced), from ``DINO_PYTORCH_ENGINE``."""
    name = os.environ.get(ENGINE_ENV, "").strip().lower()
    if name not in ("", "eager", "triton"):
        raise ValueError(f"{ENGINE_ENV}={name!r}, expected 'eager' or 'triton' (or unset)")
    return name


def engine_for(x: Tensor) -> CrossEntropyEngine:
    """The engine for tensor ``x`` (see the module docstring): the one choice in the package."""
    forced = forced_engine()
    if forced == "eager" or x.dtype not in TRITON_DTYPES:
        return eager_engine()
    if forced == "triton":
        if not triton_importable():
            raise RuntimeError(f"{ENGINE_ENV}=triton, but triton does not import; install triton or unset it")
        if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"{ENGINE_ENV}=triton with a {x.device.type} tensor needs TRITON_INTERPRET=1 set "
                               "before triton is imported (the Triton interpreter); CUDA tensors need nothing")
        return triton_engine()
    if x.device.type == "cuda" and triton_importable():
        return triton_engine()
    return eager_engine()


def eager_engine() -> CrossEntropyEngine:
    if "eager" not in _CACHE:
        from .eager import EagerEngine

        _CACHE["eager"] = EagerEngine()
    engine: CrossEntropyEngine = _CACHE["eager"]
    return engine


def triton_engine() -> CrossEntropyEngine:
    if "triton" not in _CACHE:
        # Importing the module registers the kernels' torch.ops: an engine cannot exist without them.
        from .triton_engine import TritonEngine

        _CACHE["triton"] = TritonEngine()
    engine: CrossEntropyEngine = _CACHE["triton"]
    return engine
