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
    q = torch.softmax((teacher - center) / teacher_temp, dim=-1)
    loss = cross_entropy_pairs_naive(student, q, student_temp, ncrops, n_teacher)
    batch_center = teacher.sum(dim=0, keepdim=True) / teacher.shape[0]
    new_center = center * center_momentum + batch_center * (1 - center_momentum)
    return loss, new_center


def cross_entropy_pairs_naive(student, targets, student_temp=0.1, ncrops=None, n_teacher=2):
    """Mean over (teacher view i, student view v != i) of E_b[-<q_i, log_softmax(s_v / tau_s)>], float64.

    student: (V*B, K) logits; targets: (n_teacher*B, K) teacher probabilities, crop-major.
    """
    student, targets = student.double(), targets.double()
    batch = targets.shape[0] // n_teacher
    ncrops = ncrops or student.shape[0] // batch
    s = [student[v * batch:(v + 1) * batch] / student_temp for v in range(ncrops)]
    q = [targets[i * batch:(i + 1) * batch] for i in range(n_teacher)]
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
    return total / n_terms


def sinkhorn_loss_naive(student, teacher, teacher_temp, student_temp=0.1, n_iterations=3, n_teacher=2):
    """DINOv2-style loss: Sinkhorn-Knopp targets over all teacher rows, then the per-pair loop (float64)."""
    q = sinkhorn_knopp_naive(teacher, teacher_temp, n_iterations)
    return cross_entropy_pairs_naive(student, q, student_temp, n_teacher=n_teacher)


def sinkhorn_knopp_naive(teacher, teacher_temp, n_iterations=3):
    """DINOv2's Sinkhorn-Knopp (single process), float64, written as in the paper's appendix."""
    q = torch.exp(teacher.double() / teacher_temp).t()
    k, b = q.shape
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).t()


def official_head_forward(state, x, nlayers=3, use_bn=False, bn_training=False, bn_eps=1e-5):
    """Official DINOHead forward from an official-format state_dict, float64.

    Layout of the official ``mlp``: ``nlayers == 1``: one Linear (keys ``mlp.weight``); else
    Linear, [BatchNorm1d], GELU per hidden layer, then the Linear to the bottleneck, numbered as
    ``nn.Sequential`` numbers them. BatchNorm uses its running statistics (eval mode), or with
    ``bn_training`` the batch's own (mean, biased variance), as ``BatchNorm1d.train()`` does.
    """
    x = x.double()
    nlayers = max(nlayers, 1)
    if nlayers == 1:
        x = x @ state["mlp.weight"].double().t() + state["mlp.bias"].double()
    else:
        stride = 3 if use_bn else 2
        for j in range(nlayers):
            i = j * stride
            x = x @ state[f"mlp.{i}.weight"].double().t() + state[f"mlp.{i}.bias"].double()
            if j == nlayers - 1:
                break
            if use_bn:
                b = f"mlp.{i + 1}"
                if bn_training:
                    mean = x.sum(dim=0) / x.shape[0]
                    var = ((x - mean) ** 2).sum(dim=0) / x.shape[0]
                else:
                    mean, var = state[f"{b}.running_mean"].double(), state[f"{b}.running_var"].double()
                x = (x - mean) / torch.sqrt(var + bn_eps) * state[f"{b}.weight"].double() + state[f"{b}.bias"].double()
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


def official_teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs):
    """Official per-epoch teacher temperature (np.linspace warm-up, endpoint included), plain floats."""
    n = warmup_teacher_temp_epochs
    if n == 1:
        warmup = [float(warmup_teacher_temp)]
    else:
        warmup = [warmup_teacher_temp + i * (teacher_temp - warmup_teacher_temp) / (n - 1) for i in range(n)]
    return warmup + [float(teacher_temp)] * (nepochs - n)
