"""Multi-view soft-target cross-entropy, the core of the DINO loss.

For student view ``s`` every term shares ``log_softmax(z_s / tau)``, so the official double loop
over (teacher view, student view) pairs collapses to one soft-target cross-entropy per student
view against ``Q_s``, the sum of the teacher distributions of the *other* views:

    loss = sum_s mean_b( -<Q_s[b], log p_s[b]> ) / n_pairs,   n_pairs = T * (V - 1)

which equals the official mean over pairs of batch means. ``log_softmax`` runs once per student
view instead of once per pair.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def other_view_targets(teacher_probs: Sequence[Tensor], num_student_views: int) -> list[Tensor]:
    """``Q_s`` for every student view s: the sum of the teacher views with index != s.

    Teacher view i is the same image view as student view i, so that pair is left out. Sums are
    built from the kept views directly (not ``total - q_s``) so no cancellation error creeps in,
    and with the official two teacher views ``Q_0``/``Q_1`` are the other view itself, no copy.
    Returns ``num_student_views`` tensors of shape (B, K); views beyond the teacher's share one
    object (the sum of all teacher views).
    """
    num_teacher = len(teacher_probs)
    all_views = teacher_probs[0]
    for q in teacher_probs[1:]:
        all_views = all_views + q
    targets = []
    for s in range(num_student_views):
        if s < num_teacher:
            kept = [q for t, q in enumerate(teacher_probs) if t != s]
            if not kept:  # a single teacher view: its own student view has no partner
                targets.append(torch.zeros_like(all_views))
                continue
            target = kept[0]
            for q in kept[1:]:
                target = target + q
            targets.append(target)
        else:
            targets.append(all_views)
    return targets


def multiview_cross_entropy_reference(
    student_logits: Sequence[Tensor], teacher_probs: Sequence[Tensor], student_temp: float
) -> Tensor:
    """Pure-PyTorch DINO cross-entropy; the reference every fast path is tested against.

    Args:
        student_logits: V tensors of shape (B, K), any floating dtype (computed in float32).
        teacher_probs: T <= V tensors of shape (B, K), float32 probabilities; teacher view i is the
            same image view as student view i.
        student_temp: the student temperature tau_s.

    Returns:
        0-dim float32 tensor: the mean over the T * (V - 1) pairs of the batch-mean cross-entropy.
    """
    num_student, num_teacher = len(student_logits), len(teacher_probs)
    targets = other_view_targets(teacher_probs, num_student)
    total = student_logits[0].new_zeros((), dtype=torch.float32)
    for z, target in zip(student_logits, targets):
        log_p = F.log_softmax(z.float() / student_temp, dim=-1)
        total = total + torch.sum(-target * log_p, dim=-1).mean()
    return total / (num_teacher * (num_student - 1))
