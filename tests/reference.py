"""Naive, independent implementations of the official DINO formulas (float64 where it matters).

Written from ../shared/reference/official-dino.md, deliberately loop-based and unoptimised:
they are what the library is checked against.
"""
from __future__ import annotations

import math

import torch


def official_loss(student, teacher, center, teacher_temp, student_temp=0.1, center_momentum=0.9, ncrops=None,
                  n_teacher=2):
    """Per-pair loop of the official DINOLoss.forward. Returns (loss, new_center) in float64.

    student: (V*B, K); teacher: (n_teacher*B, K) (official: 2); center: (1, K).
    """
    student, teacher, center = student.double(), teacher.double(), center.double()
    batch = teacher.shape[0] // n_teacher
    ncrops = ncrops or student.shape[0] // batch
    s = [student[v * batch:(v + 1) * batch] / student_temp for v in range(ncrops)]
    q = torch.softmax((teacher - center) / teacher_temp, dim=-1)
    q = [q[i * batch:(i + 1) * batch] for i in range(n_teacher)]
    total, n_terms = 0.0, 0
    for iq in range(n_teacher):
        for v in range(ncrops):
            if v == iq:
                continue
            log_p = torch.log_softmax(s[v], dim=-1)
            term = torch.zeros((), dtype=torch.float64)
            for b in range(batch):
                term = term + torch.sum(-q[iq][b] * log_p[b])
            total = total + term / batch
            n_terms += 1
    loss = total / n_terms
    batch_center = teacher.sum(dim=0, keepdim=True) / teacher.shape[0]
    new_center = center * center_momentum + batch_center * (1 - center_momentum)
    return loss, new_center


def sinkhorn_knopp_naive(teacher, teacher_temp, n_iterations=3):
    """DINOv2's Sinkhorn-Knopp (single process), float64, written as in the paper's appendix."""
    q = torch.exp(teacher.double() / teacher_temp).t()
    k, b = q.shape
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


def official_head_forward(state, x, nlayers=3, use_bn=False):
    """Official DINOHead forward from an official-format state_dict, float64, no BN (eval not needed)."""
    x = x.double()
    linear_idx = [0, 2, 4] if nlayers == 3 else None
    for j, i in enumerate(linear_idx):
        x = x @ state[f"mlp.{i}.weight"].double().t() + state[f"mlp.{i}.bias"].double()
        if j < len(linear_idx) - 1:
            x = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))  # exact GELU
    x = x / torch.clamp(x.norm(dim=-1, keepdim=True), min=1e-12)
    g = state["last_layer.weight_g"].double()
    v = state["last_layer.weight_v"].double()
    w = g * v / v.norm(dim=1, keepdim=True)
    return x @ w.t()


def official_cosine_scheduler(base, final, epochs, niter, warmup_epochs=0, start_warmup_value=0.0):
    """Element by element, in plain Python floats."""
    warmup_iters = warmup_epochs * niter
    out = []
    if warmup_epochs > 0:
        if warmup_iters == 1:
            out.append(float(start_warmup_value))
        else:
            step = (base - start_warmup_value) / (warmup_iters - 1)
            out += [start_warmup_value + i * step for i in range(warmup_iters)]
            out[-1] = base
    n = epochs * niter - warmup_iters
    out += [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)) for i in range(n)]
    return out
