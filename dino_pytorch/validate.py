"""Argument checks, one rule each, shared by every module of the library.

Every check takes the argument's name as the user spells it and raises with one message shape,
``"{name}={value!r}, expected {what}"``, so an error always names the argument, the value given and
what would have been accepted. ``bool`` is never accepted where a number is expected (``True`` as a
size or a probability is a mistake, even though Python treats it as 1). Checks return the value
normalised (ints as ``int``, numbers as ``float``) so callers store what the check returns.
"""
from __future__ import annotations

import math
import os
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any, Optional, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


def is_number(value: Any) -> bool:
    """An int or a float, and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    """An int (numpy integers included through ``__index__``), and not a bool."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return type(value).__module__ == "numpy" and hasattr(value, "__index__") and not isinstance(value, float)


def check_int(name: str, value: Any, minimum: Optional[int] = None, *, error: type = ValueError) -> int:
    """An int ``>= minimum`` (any int when ``minimum`` is None)."""
    if not is_int(value):
        what = "an int" if minimum is None else f"an int >= {minimum}"
        raise error(f"{name}={value!r}, expected {what}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value!r}, expected an int >= {minimum}")
    return int(value)


def check_positive_int(name: str, value: Any, *, error: type = ValueError) -> int:
    """An int ``>= 1``."""
    if not is_int(value) or value < 1:
        raise (error if not is_int(value) else ValueError)(f"{name}={value!r}, expected a positive int")
    return int(value)


def check_positive_ints(**values: Any) -> tuple[int, ...]:
    """:func:`check_positive_int` on each keyword (``in_dim=in_dim, ...``); the values in order."""
    return tuple(check_positive_int(name, value) for name, value in values.items())


def check_optional_positive_int(name: str, value: Any) -> Optional[int]:
    """None, or an int ``>= 1``."""
    if value is None:
        return None
    if not is_int(value) or value < 1:
        raise ValueError(f"{name}={value!r}, expected None or a positive int")
    return int(value)


def check_float(
    name: str,
    value: Any,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
    what: Optional[str] = None,
    error: type = ValueError,
) -> float:
    """A finite number in the interval given by ``low`` / ``high`` (closed unless ``*_open``)."""
    ok = is_number(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if what is None:
            bounds = []
            if low is not None:
                bounds.append(f"{'>' if low_open else '>='} {low}")
            if high is not None:
                bounds.append(f"{'<' if high_open else '<='} {high}")
            what = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
        kind = error if not is_number(value) else ValueError
        raise kind(f"{name}={value!r}, expected {what}")
    return float(value)


def check_positive_float(name: str, value: Any) -> float:
    """A finite number ``> 0`` (temperatures, learning rates)."""
    return check_float(name, value, low=0.0, low_open=True, what="a finite number > 0")


def check_probability(name: str, value: Any, *, error: type = ValueError) -> float:
    """A number in [0, 1] (probabilities, momenta, fractions)."""
    return check_float(name, value, low=0.0, high=1.0, what="a number in [0, 1]", error=error)


def check_bool(name: str, value: Any) -> bool:
    """A real ``bool`` (not 0 / 1, not a string)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r}, expected True or False")
    return value


def check_choice(name: str, value: T, choices: Collection[T]) -> T:
    """One of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r}, expected one of {', '.join(repr(c) for c in choices)}")
    return value


def check_number_pair(name: str, value: Any, *, error: type = TypeError) -> tuple[float, float]:
    """A ``(low, high)`` pair of finite numbers (order not checked)."""
    if (
        not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2
        or not all(is_number(v) for v in value)
    ):
        raise error(f"{name}={value!r}, expected a (low, high) pair of numbers")
    lo, hi = float(value[0]), float(value[1])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name}={value!r}, expected a (low, high) pair of finite numbers")
    return lo, hi


def check_path(name: str, value: Any) -> str:
    """A file path: a ``str`` or an ``os.PathLike`` (``pathlib.Path``) naming one; returned as a str."""
    if isinstance(value, os.PathLike):
        path = os.fspath(value)
        if isinstance(path, str):
            return path
    elif isinstance(value, str):
        return value
    raise TypeError(f"{name}={value!r}, expected a str or os.PathLike path")


def check_device(name: str, value: Any) -> torch.device:
    """A ``torch.device``, or what ``torch.device()`` parses (``"cpu"``, ``"cuda:1"``, a CUDA index):
    the device itself, so a misspelt one is named before any work starts. Whether the device is
    present is not checked here."""
    import torch

    if isinstance(value, torch.device):
        return value
    if not isinstance(value, str) and not is_int(value):
        raise TypeError(f"{name}={value!r}, expected a torch.device or a device string such as 'cpu' or 'cuda:0'")
    try:
        return torch.device(value if isinstance(value, str) else int(value))
    except (RuntimeError, ValueError):
        raise ValueError(
            f"{name}={value!r}, expected a torch.device or a device string such as 'cpu', 'cuda', 'cuda:0' or 'mps'"
        ) from None
