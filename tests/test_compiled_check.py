"""The compiled kernels' first-call check against their eager twins (ops/compiled.run).

A compiler can miscompile instead of failing (seen: non-finite rows from the forward kernel under
ATEN_CPU_CAPABILITY=avx2); these tests stand a fake "compiled" kernel in for inductor, so they run
without a C++ compiler and in milliseconds.
"""
from __future__ import annotations

import pytest
import torch

from dino_pytorch.ops import closed_form, compiled, dispatch, ema_lerp, teacher_targets

compiled_module = compiled

V, T, B, K, TAU = 4, 2, 3, 16, 0.1


@pytest.fixture
def fresh_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled, "_FAILED", [])
    monkeypatch.setattr(compiled, "_CHECKED", set())
    monkeypatch.delenv(compiled.DISABLE_COMPILE_ENV, raising=False)


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(V, B, K, generator=g)
    probs = torch.softmax(torch.randn(T, B, K, generator=g) / 0.04, dim=-1)
    return x, probs, closed_form.view_mask(V, T, x.device)


def _fake_compiled(monkeypatch: pytest.MonkeyPatch, kernels: dict) -> list[str]:
    calls: list[str] = []

    def compiled(name: str):
        def run(*args):
            calls.append(name)
            return kernels[name](*args)
        return run

    monkeypatch.setattr(compiled_module, "_compiled", compiled)
    return calls


def test_a_miscompiled_forward_falls_back_to_eager_with_one_line(fresh_engine, monkeypatch, capsys):
    x, probs, mask = _inputs()
    nan_rows = lambda *args: tuple(torch.full((V, B), float("nan")) for _ in range(3))  # noqa: E731
    calls = _fake_compiled(monkeypatch, {"loss forward": nan_rows})
    expected = closed_form.eager_forward(x, probs, mask, TAU, False)
    got = closed_form.compiled_forward(x, probs, mask, TAU, False)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert capsys.readouterr().err.count("disagrees with the eager engine") == 1
    assert compiled.compile_disabled()  # for good: the next call does not run the bad kernel
    closed_form.compiled_forward(x, probs, mask, TAU, False)
    assert calls == ["loss forward"]


def test_a_miscompiled_overwriting_kernel_still_leaves_the_true_gradient_in_x(fresh_engine, monkeypatch, capsys):
    x, probs, mask = _inputs()
    scale = torch.tensor(0.5)
    want_x = x.clone()
    want_stats = closed_form.eager_loss_and_grad(want_x, probs, mask, scale, TAU, False)
    garbage = lambda x_, *rest: (x_.fill_(float("inf")),) * 3  # noqa: E731
    _fake_compiled(monkeypatch, {"loss and gradient": garbage})
    ptr = x.data_ptr()
    got = closed_form.compiled_loss_and_grad(x, probs, mask, scale, TAU, False)
    assert x.data_ptr() == ptr  # still in the logits' own storage
    torch.testing.assert_close(x, want_x, rtol=0, atol=0)
    for a, b in zip(got, want_stats):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert "disagrees with the eager engine" in capsys.readouterr().err


def test_an_agreeing_overwriting_kernel_is_kept(fresh_engine, monkeypatch, capsys):
    x, probs, mask = _inputs()
    scale = torch.tensor(0.5)
    want_x = x.clone()
    want_stats = closed_form.eager_loss_and_grad(want_x, probs, mask, scale, TAU, False)
    calls = _fake_compiled(monkeypatch, {"loss and gradient": closed_form.eager_loss_and_grad})
    for _ in range(2):
        y = x.clone()
        got = closed_form.compiled_loss_and_grad(y, probs, mask, scale, TAU, False)
        torch.testing.assert_close(y, want_x, rtol=0, atol=0)
        for a, b in zip(got, want_stats):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert calls == ["loss and gradient"] * 2 and not compiled.compile_disabled()
    assert capsys.readouterr().err == ""


def test_a_miscompiled_ema_kernel_leaves_the_true_average(fresh_engine, monkeypatch, capsys):
    teachers = [torch.ones(5), torch.zeros(3)]
    students = [torch.full((5,), 3.0), torch.full((3,), 2.0)]
    _fake_compiled(monkeypatch, {"ema lerp": lambda t, s, w: [x.fill_(float("nan")) for x in t]})
    ema_lerp.ema_lerp_(teachers, students, 0.25, key=("ema lerp", "test"))
    torch.testing.assert_close(teachers[0], torch.full((5,), 1.5))  # 1 + 0.25 (3 - 1)
    torch.testing.assert_close(teachers[1], torch.full((3,), 0.5))
    assert "ema lerp kernel disagrees" in capsys.readouterr().err and compiled.compile_disabled()


def test_the_teacher_softmax_kernel_is_checked_too(fresh_engine, monkeypatch, capsys):
    logits, center = torch.randn(6, 50), torch.randn(1, 50)
    _fake_compiled(monkeypatch, {"teacher softmax": lambda t, c, temp: torch.zeros_like(t)})
    got = teacher_targets.compiled_centered_teacher_softmax(logits, center, 0.04)
    torch.testing.assert_close(got, torch.softmax((logits - center) / 0.04, dim=-1), rtol=0, atol=0)
    assert "teacher softmax kernel disagrees" in capsys.readouterr().err
    # and the dispatch routes large CPU inputs to it, small ones and disabled compiling to eager
    monkeypatch.setattr(dispatch, "COMPILE_MIN_ELEMENTS", 0)
    assert dispatch.compile_worthwhile(logits) is False  # disabled for good by the failure above
    monkeypatch.setattr(compiled, "_FAILED", [])
    assert dispatch.compile_worthwhile(logits) and not dispatch.compile_worthwhile(logits.double())


def test_an_agreeing_kernel_is_used_and_checked_once_per_shape(fresh_engine, monkeypatch, capsys):
    x, probs, mask = _inputs()
    eager_calls: list[int] = []
    real_eager = closed_form.eager_forward

    def counting_eager(*args, **kwargs):
        eager_calls.append(1)
        return real_eager(*args, **kwargs)

    monkeypatch.setattr(closed_form, "eager_forward", counting_eager)
    # a "compiled" kernel that differs from eager only by rounding (1e-6 relative): accepted
    close = lambda *args: tuple(t * (1 + 1e-6) for t in real_eager(*args[:4], args[4]))  # noqa: E731
    calls = _fake_compiled(monkeypatch, {"loss forward": close})
    for _ in range(3):
        closed_form.compiled_forward(x, probs, mask, TAU, False)
    assert calls == ["loss forward"] * 3 and len(eager_calls) == 1  # one check for this shape
    closed_form.compiled_forward(x[:, :2].contiguous(), probs[:, :2].contiguous(), mask, TAU, False)
    assert len(eager_calls) == 2  # a new shape is a new graph: checked again
    assert not compiled.compile_disabled() and capsys.readouterr().err == ""


def test_agree_tells_rounding_from_garbage() -> None:
    b = torch.tensor([1.0, -2.0, float("inf")])
    assert compiled._agree(b * (1 + 1e-6), b)
    assert not compiled._agree(torch.tensor([1.0, -2.0, 3.0]), b)  # a finite value where inf was
    assert not compiled._agree(torch.tensor([1.0, -2.1, float("inf")]), b)  # off by 5 %
