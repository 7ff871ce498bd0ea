"""The three-line path copies and saves no more logits than calling the loss on the concatenated outputs.

Bytes of logits (tensors whose last dimension is K) made by cat / stack / clone / copy and saved
for backward are counted while ``dino(views)`` runs, and while
``criterion(student(views), teacher(globals))`` runs on the same model; they must agree within
one (B, K) block (saved: at most that more). The loss must equal the per-view reference for 1, 2 and 3 global views.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dino_pytorch import DINO
from reference import official_loss

K, B = 512, 4
COPY_OPS = {"cat", "stack", "clone", "copy_", "_to_copy", "contiguous"}


class CopiedLogitBytes(TorchDispatchMode):
    """Sums the bytes of every (.., K) tensor produced by a copying op."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in COPY_OPS:
            for t in out if isinstance(out, (list, tuple)) else [out]:
                if isinstance(t, torch.Tensor) and t.ndim >= 1 and t.shape[-1] == K:
                    self.bytes += t.numel() * t.element_size()
        return out


def saved_logit_bytes(fn):
    """(result, bytes of (.., K) tensors saved for backward, counted once per storage)."""
    seen: dict[int, int] = {}

    def pack(t):
        if t.ndim >= 1 and t.shape[-1] == K:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def make(num_global: int) -> tuple[DINO, list[torch.Tensor]]:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    dino = DINO(backbone, out_dim=K, hidden_dim=32, bottleneck_dim=16, embed_dim=8, num_global_views=num_global)
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(B, 3, 16, 16, generator=g) for _ in range(num_global)]
    views += [torch.randn(B, 3, 8, 8, generator=g) for _ in range(3)]
    return dino, views


@pytest.mark.parametrize("num_global", [1, 2, 3])
def test_three_line_path_copies_no_more_logits(num_global):
    dino, views = make(num_global)
    dino.criterion.center.normal_()  # a non-trivial centre

    with CopiedLogitBytes() as mode:
        loss_three_lines, saved_three_lines = saved_logit_bytes(lambda: dino(views))
    copied_three_lines = mode.bytes

    def by_hand():
        student = dino.student(views)
        teacher = dino.teacher(views[:num_global])
        return dino.criterion(student, teacher, num_teacher_views=num_global)

    with CopiedLogitBytes() as mode:
        loss_by_hand, saved_by_hand = saved_logit_bytes(by_hand)
    copied_by_hand = mode.bytes

    block = B * K * 4
    assert abs(copied_three_lines - copied_by_hand) <= block, (copied_three_lines, copied_by_hand)
    # DINO lets the loss write the gradient over its own head's output, which then saves no teacher
    # targets: fewer saved bytes than by hand, never more.
    assert saved_three_lines <= saved_by_hand + block, (saved_three_lines, saved_by_hand)
    assert saved_by_hand > 0  # the counter sees the saved logits at all
    torch.testing.assert_close(loss_three_lines, loss_by_hand, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_global", [1, 2, 3])
def test_three_line_loss_matches_reference(num_global):
    dino, views = make(num_global)
    dino.criterion.center.normal_()
    loss = dino(views)
    with torch.no_grad():
        student, teacher = dino.student(views), dino.teacher(views[:num_global])
    expected, _ = official_loss(student, teacher, dino.criterion.center, dino.criterion.teacher_temp,
                                dino.criterion.student_temp, n_teacher=num_global)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_concatenated_teacher_split_by_the_given_count():
    dino, views = make(3)
    with torch.no_grad():
        student, teacher = dino.student(views), dino.teacher(views[:3])
    as_lists = dino.criterion(list(student.chunk(len(views))), list(teacher.chunk(3)))
    concatenated = dino.criterion(student, teacher, num_teacher_views=3)
    torch.testing.assert_close(concatenated, as_lists, rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_teacher_views=0"):
        dino.criterion(student, teacher, num_teacher_views=0)


def test_dino_leaves_its_head_output_intact_and_matches_the_loss_by_hand():
    dino, views = make(2)
    dino.criterion.center.normal_()
    center = dino.criterion.center.clone()  # both paths see the same centre
    outputs = []
    dino.student.head.register_forward_hook(lambda m, i, out: outputs.append((out, out.detach().clone())))
    loss = dino(views)
    out, before = outputs[-1]
    assert torch.equal(out.detach(), before)  # a forward hook or entropy logging reads the logits
    loss.backward()
    assert torch.equal(out.detach(), before)  # and so does anything after backward
    grads = {n: p.grad.clone() for n, p in dino.student.named_parameters() if p.grad is not None}
    dino.zero_grad(set_to_none=True)
    dino.criterion.center.copy_(center)
    by_hand = dino.criterion(dino.student(views), dino.teacher(views[:2]), num_teacher_views=2)
    torch.testing.assert_close(loss, by_hand, rtol=1e-6, atol=1e-6)
    by_hand.backward()
    assert grads and all(rel_close(grads[n], p.grad) for n, p in dino.student.named_parameters() if n in grads)


def rel_close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).norm()) <= 1e-5 * float(b.norm()) + 1e-12
