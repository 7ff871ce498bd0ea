"""Lazily ``torch.compile``-d CPU kernels, each checked once against its eager twin.

The CPU kernels of this package (the closed-form loss of :mod:`.closed_form`, the centred teacher
softmax of :mod:`.teacher_targets`) are plain PyTorch functions shaped so that inductor fuses each
into one loop nest. They are registered here by name and compiled on first use. Whatever goes wrong
falls back to the eager twin, the function itself, with one line on stderr and for good in this
process: no C++ compiler, an unsupported platform, or a kernel that compiles but computes something
else (seen: non-finite rows from the loss kernel under ``ATEN_CPU_CAPABILITY=avx2``). The first
result of every compiled graph (name and input shapes) is therefore compared with the eager twin
before it is used.

``DINO_PYTORCH_DISABLE_COMPILE=1`` turns compiling off.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, Optional

import torch
from torch import Tensor

DISABLE_COMPILE_ENV = "DINO_PYTORCH_DISABLE_COMPILE"

_KERNELS: dict[str, Callable[..., Any]] = {}
_FAILED: list[str] = []
_CHECKED: set[tuple[Any, ...]] = set()


def register(name: str, fn: Callable[..., Any]) -> None:
    """Make ``fn`` compilable as ``name`` (its eager form stays the twin)."""
    _KERNELS[name] = fn


def compile_disabled() -> bool:
    """True when ``DINO_PYTORCH_DISABLE_COMPILE=1`` or a compile already failed in this process."""
    return bool(_FAILED) or os.environ.get(DISABLE_COMPILE_ENV, "0").strip() == "1"


def allowed() -> bool:
    """Compiling not disabled or failed, and not already inside a compiled graph (an outer
    ``torch.compile`` fuses the eager twin itself)."""
    return not compile_disabled() and not torch.compiler.is_compiling()


def worthwhile(device: torch.device, numel: int, min_elements: int) -> bool:
    """The rule every caller shares: a CPU input of at least ``min_elements`` (below it a compile,
    seconds once per shape, does not pay off), and :func:`allowed`."""
    return device.type == "cpu" and numel >= min_elements and allowed()


@functools.cache
def _compiled(name: str) -> Callable[..., Any]:
    # dynamic=False: the shapes of a training run are fixed, and static loops vectorise best.
    compiled: Callable[..., Any] = torch.compile(_KERNELS[name], dynamic=False)
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


def signature(arg: Any) -> Any:
    """What tells compiled graphs apart: shapes and dtypes of tensors (also in lists), other values."""
    if isinstance(arg, Tensor):
        return tuple(arg.shape), arg.dtype
    if isinstance(arg, (list, tuple)):
        return tuple(map(signature, arg))
    return arg


def _fail(message: str) -> None:
    _FAILED.append(message)
    print(f"dino_pytorch: {message}; using the eager engine", file=sys.stderr)


def run(name: str, eager: Callable[[], Any], *args: Any, reference: Optional[Callable[[], Any]] = None,
        restore: Optional[Callable[[Any], Any]] = None, observe: Optional[Callable[[Any], Any]] = None,
        key: Optional[tuple[Any, ...]] = None) -> Any:
    """The compiled kernel ``name`` on ``args``; ``eager()`` when compiling is off or fails.

    On the first call of each graph the result is compared with the eager twin (``reference()``,
    or ``eager()`` itself). Kernels that write into an argument destroy their input, so for them
    ``reference`` must compute the expected value before the compiled call, into new memory,
    ``observe(result)`` gives what of the compiled call to compare with it (e.g. the overwritten
    input too), and ``restore(expected)`` what to return (and write back) when they disagree.
    ``key`` names the graph (default: ``name`` and :func:`signature` of the arguments); a caller
    that runs the same long list of tensors every step passes it, computed once.
    """
    if not compile_disabled():
        # one check per compiled graph: dynamic=False compiles anew for each shape
        key = key if key is not None else (name, *map(signature, args))
        check = key not in _CHECKED
        expected = reference() if check and reference is not None else None
        try:
            result = _compiled(name)(*args)
        except Exception as err:  # no C++ compiler, unsupported platform, ...: keep training
            first = str(err).splitlines()[0] if str(err) else ""
            _fail(f"torch.compile of the {name} kernel failed ({type(err).__name__}: {first[:200]})")
            expected = None
        else:
            if not check:
                return result
            _CHECKED.add(key)
            if expected is None:
                expected = eager()
            if _agree(observe(result) if observe is not None else result, expected):
                return result
            _fail(f"the compiled {name} kernel disagrees with the eager engine on its first call")
            return restore(expected) if restore is not None else expected
        if expected is not None and restore is not None:
            return restore(expected)
    return eager()
