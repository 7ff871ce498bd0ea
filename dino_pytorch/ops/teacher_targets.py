"""Teacher targets from teacher logits: centred sharpened softmax, or Sinkhorn-Knopp. Always float32 inside.

Not the EMA teacher network, which is :mod:`dino_pytorch.teacher`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import distributed
from . import compiled


def centered_teacher_softmax(teacher_logits: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """``softmax((t - c) / tau_t)`` in float32.

    Args:
        teacher_logits: (N, K) logits, any floating dtype.
        center: (1, K) float32 centre.
        teacher_temp: tau_t > 0.

    Returns:
        (N, K) float32 probabilities, detached.
    """
    # The official code gets float32 here by type promotion (half - float32 centre); do it explicitly.
    return torch.softmax((teacher_logits.detach().float() - center) / teacher_temp, dim=-1)


def _softmax_over_temperature(teacher_logits: Tensor, center: Tensor, teacher_temp: Tensor) -> Tensor:
    # The temperature is a 0-dim tensor: as a float, each value of its schedule would compile anew.
    return torch.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1)


compiled.register("teacher softmax", _softmax_over_temperature)


def compiled_centered_teacher_softmax(teacher_logits: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """:func:`centered_teacher_softmax` as one compiled CPU kernel (one read of the logits, one
    write of the probabilities, against three new tensors eagerly); the eager function on failure."""
    logits = teacher_logits.detach()
    temp = torch.tensor(float(teacher_temp), dtype=torch.float32)  # float32, as the eager division
    return compiled.run(
        "teacher softmax", lambda: centered_teacher_softmax(logits, center, teacher_temp), logits, center, temp
    )


def _logsumexp_all_ranks(x: Tensor, dim: Optional[int]) -> Tensor:
    """logsumexp over ``dim`` (None: everything) and over all ranks' entries along it."""
    shift = (x.amax() if dim is None else x.amax(dim=dim, keepdim=True)).detach().clone()
    distributed.all_reduce_max(shift)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    total = torch.exp(x - shift)
    total = total.sum() if dim is None else total.sum(dim=dim, keepdim=True)
    distributed.all_reduce_sum(total)
    return shift + torch.log(total)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, num_iterations: int = 3) -> Tensor:
    """Sinkhorn-Knopp teacher targets, as in DINOv2, in float32, over all ranks' rows.

    Args:
        teacher_logits: (N, K) logits of all teacher views of this rank, any floating dtype.
        teacher_temp: tau_t > 0.
        num_iterations: alternating prototype/sample normalisations (DINOv2 uses 3).

    Returns:
        (N, K) float32 rows, each summing to 1 after the final sample normalisation.

    The same iteration as DINOv2's ``exp`` / divide loop, carried out on logarithms: identical in
    exact arithmetic, but ``exp(t / tau)`` can neither overflow to inf nor underflow a whole sample
    to 0 (both of which turn DINOv2's version into NaN for large logits).
    """
    log_q = (teacher_logits.float() / teacher_temp).t()  # (K, N): prototypes x samples
    num_prototypes = log_q.shape[0]
    num_samples = torch.tensor([float(log_q.shape[1])], device=log_q.device)
    distributed.all_reduce_sum(num_samples)
    log_k, log_n = math.log(num_prototypes), torch.log(num_samples)
    log_q = log_q - _logsumexp_all_ranks(log_q, None)
    for _ in range(num_iterations):
        log_q = log_q - _logsumexp_all_ranks(log_q, 1) - log_k
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - log_n
    return torch.exp(log_q + log_n).t()
