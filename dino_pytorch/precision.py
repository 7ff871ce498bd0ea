"""Mixed precision for a DINO step: the autocast context and the gradient scaler of a precision name.

``"fp32"`` runs as is; ``"bf16"`` autocasts to bfloat16 (no scaler needed: its exponent range is
float32's); ``"fp16"`` autocasts to float16 and needs a :class:`torch.amp.GradScaler`, as the
official ``--use_fp16``. The loss itself always computes in float32 (:mod:`dino_pytorch.ops`).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch

from .validate import check_choice

PRECISIONS = ("fp32", "bf16", "fp16")


def autocast(precision: str, device: Union[str, torch.device]) -> contextlib.AbstractContextManager[object]:
    """The autocast context for ``precision`` on ``device``'s type (a no-op for ``"fp32"``)."""
    check_choice("precision", precision, PRECISIONS)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def grad_scaler(precision: str, device: Union[str, torch.device]) -> Optional[torch.amp.GradScaler]:
    """A :class:`torch.amp.GradScaler` for ``"fp16"``, else None (nothing to scale)."""
    check_choice("precision", precision, PRECISIONS)
    return torch.amp.GradScaler(torch.device(device).type) if precision == "fp16" else None
