"""What an in-place or approximate fast path gets wrong, checked on the default path.

Each case once broke a fast path of this package (a gradient stored in fp16 before the loss scale,
logits overwritten with their gradient, a backward that was not differentiable): the default path
must give the right gradient for each, against float64 on the same (rounded) inputs.
"""
import pytest
import torch
from torch import nn

from dino_pytorch import DINO, DINOLoss
from dino_pytorch.ops import multiview_cross_entropy

K, B, V = 512, 16, 6
SCALE = 2.0**16  # GradScaler's initial loss scale


def teacher_logits(seed=1):
    return torch.randn(2 * B, K, generator=torch.Generator().manual_seed(seed)) * 3


def float64_loss(student, teacher, tau_s=0.1, tau_t=0.04):
    """The official per-pair loop in float64 (zero centre)."""
    probs = torch.softmax(teacher.double() / tau_t, -1).chunk(2)
    views = (student.double() / tau_s).chunk(V)
    total = sum(-(probs[i] * torch.log_softmax(views[v], -1)).sum(-1).mean()
                for i in range(2) for v in range(V) if v != i)
    return total / (2 * (V - 1))


@pytest.mark.parametrize("as_list", [False, True])
def test_fp16_logits_under_a_loss_scale(as_list):
    logits = (torch.randn(V * B, K, generator=torch.Generator().manual_seed(0)) * 3).half()
    student = logits.clone().requires_grad_(True)
    inputs = list(student.chunk(V)) if as_list else student
    (DINOLoss(K)(inputs, teacher_logits()) * SCALE).backward()
    exact = logits.double().requires_grad_(True)  # the same rounded logits
    (float64_loss(exact, teacher_logits()) * SCALE).backward()
    grad = student.grad.double()
    assert ((grad - exact.grad).norm() / exact.grad.norm()).item() <= 2e-3
    # No more entries flushed to zero than the exact gradient rounded to fp16 has.
    assert (grad == 0).sum() <= (exact.grad.half() == 0).sum()


def test_a_second_loss_on_the_same_logits():
    w = torch.randn(32, K, generator=torch.Generator().manual_seed(2), requires_grad=True)
    x = torch.randn(V * B, 32, generator=torch.Generator().manual_seed(3))
    teacher = teacher_logits()
    logits = x @ w
    loss = DINOLoss(K)(logits, teacher) + 0.5 * logits.square().mean()  # e.g. a logit regulariser
    loss.backward()
    w64 = w.detach().double().requires_grad_(True)
    logits64 = x.double() @ w64
    (float64_loss(logits64, teacher) + 0.5 * logits64.square().mean()).backward()
    assert ((w.grad.double() - w64.grad).norm() / w64.grad.norm()).item() <= 1e-5


def test_head_output_unchanged_after_dino_forward_and_backward():
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    dino = DINO(backbone, out_dim=K, hidden_dim=32, bottleneck_dim=16)
    seen = []
    dino.student.head.register_forward_hook(lambda m, i, out: seen.append((out, out.detach().clone())))
    views = [torch.randn(4, 3, 24, 24) for _ in range(2)] + [torch.randn(4, 3, 12, 12) for _ in range(2)]
    loss = dino(views)
    out, copy = seen[-1]
    assert torch.equal(out.detach(), copy)
    loss.backward()
    assert torch.equal(out.detach(), copy)


def test_create_graph_gives_the_right_hessian_vector_product():
    student = torch.randn(V * B, K, generator=torch.Generator().manual_seed(4)).double().requires_grad_(True)
    probs = torch.softmax(teacher_logits().double() / 0.04, -1).view(2, B, K)
    (grad,) = torch.autograd.grad(multiview_cross_entropy(student, probs, 0.1), student, create_graph=True)
    vector = torch.randn_like(student)
    (hvp,) = torch.autograd.grad((grad * vector).sum(), student)
    exact = student.detach().clone().requires_grad_(True)
    (g64,) = torch.autograd.grad(float64_loss(exact, teacher_logits()), exact, create_graph=True)
    (hvp64,) = torch.autograd.grad((g64 * vector).sum(), exact)
    assert ((hvp - hvp64).norm() / hvp64.norm()).item() <= 1e-10
