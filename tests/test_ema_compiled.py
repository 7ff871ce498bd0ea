"""ops/ema_lerp.py: the EMA of a large CPU group as one compiled kernel, against the formula.

The size rule is lowered to 0 so that a small model takes the compiled path (a compile of a few
seconds, once per process and group).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dino_pytorch import EMATeacher
from dino_pytorch.ops import compiled, ema_lerp


def student_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))


@pytest.fixture
def compile_small(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ema_lerp, "COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(compiled, "_FAILED", [])
    monkeypatch.delenv(compiled.DISABLE_COMPILE_ENV, raising=False)


def test_compiled_ema_follows_the_formula_without_recompiling(compile_small, monkeypatch):
    student = student_net()
    teacher = EMATeacher(student)
    expected = [p.detach().double().clone() for p in teacher.parameters()]
    calls: list[str] = []
    real = compiled._compiled

    def counting(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(compiled, "_compiled", counting)
    for step, m in enumerate([0.9, 0.99, 0.996]):
        perturb(student, step)
        # the momentum changes every step: after the first, the same graph must serve
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            assert teacher.update(momentum=m) == m
        for e, q in zip(expected, student.parameters()):
            e.mul_(m).add_((1 - m) * q.detach().double())
        for p, e in zip(teacher.parameters(), expected):
            assert (p.double() - e).abs().max() <= 1e-6 * (1 + e.abs().max())
    assert calls == ["ema lerp"] * 3 and not compiled.compile_disabled()
    # freezing a student layer (requires_grad off) changes no compiled input: still no recompile
    student[0].requires_grad_(False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        teacher.update(momentum=0.9)


def test_compiled_ema_skip_and_a_half_precision_student(compile_small):
    student = student_net()
    teacher = EMATeacher(student)
    before = [p.clone() for p in teacher.parameters()]
    perturb(student, 0)
    teacher.update(momentum=0.9, skip=torch.tensor(True))
    assert all(torch.equal(p, b) for p, b in zip(teacher.parameters(), before))
    student.to(torch.bfloat16)  # a bf16 student still updates the float32 teacher (a new group)
    teacher.update(momentum=0.5)
    for p, b, q in zip(teacher.parameters(), before, student.parameters()):
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, 0.5 * b + 0.5 * q.float(), rtol=1e-6, atol=1e-6)


def test_small_groups_and_other_rules_stay_eager(monkeypatch):
    t = [torch.zeros(10)]
    assert not ema_lerp.compile_worthwhile(t)  # 10 elements < COMPILE_MIN_ELEMENTS
    monkeypatch.setattr(ema_lerp, "COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(compiled, "_FAILED", [])
    monkeypatch.delenv(compiled.DISABLE_COMPILE_ENV, raising=False)
    assert ema_lerp.compile_worthwhile(t)
    monkeypatch.setenv(compiled.DISABLE_COMPILE_ENV, "1")
    assert not ema_lerp.compile_worthwhile(t)
    assert not ema_lerp.compile_worthwhile([torch.zeros(10, device="meta")])
