"""Collapse diagnostics: is the teacher uniform (all prototypes equal) or one-hot (one prototype)?

Both DINO collapse modes leave fingerprints in the teacher distribution P_t:
- uniform collapse: the entropy of each row approaches ln K and the loss sits at ln K;
- single-prototype collapse: the mean distribution over the batch concentrates, so its KL to the
  uniform distribution approaches ln K.
Healthy training has low per-row entropy (sharp) but a mean distribution close to uniform.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


@torch.no_grad()
def collapse_metrics(teacher_probs: Tensor, center: Tensor) -> dict[str, Tensor]:
    """Health numbers of a batch of teacher targets (0-dim tensors; call ``.item()`` when logging).

    Args:
        teacher_probs: (N, K) teacher probabilities (rows sum to 1).
        center: (1, K) the loss centre.

    Returns:
        ``teacher_entropy`` (mean row entropy, nats; ln K = uniform), ``teacher_kl_uniform``
        (KL(mean row || uniform), nats; ln K = one prototype for everything), ``center_norm``
        (L2 norm of the centre), ``prototypes_used`` (distinct argmax prototypes in the batch).
    """
    p = teacher_probs.float()
    k = p.shape[-1]
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean()
    mean = p.mean(0)
    kl = (mean * (torch.log(mean.clamp_min(1e-30)) + math.log(k))).sum()
    used = torch.unique(p.argmax(-1)).numel()
    return {
        "teacher_entropy": entropy,
        "teacher_kl_uniform": kl,
        "center_norm": center.float().norm(),
        "prototypes_used": torch.tensor(float(used)),
    }
