"""Every public entry that reaches the Triton engine, run on it under the Triton interpreter (CPU).

``DINO_PYTORCH_ENGINE=triton`` sends CPU tensors to the Triton engine here (the interpreter runs the
kernels), so this is the route a GPU takes, through the same calls a user makes; each result is
compared with the eager engine's in the same process (fp32 <= 1e-5 relative, half <= 1e-2). A
counter on the kernel launchers proves the Triton engine really ran. Run by
``tests/test_triton_interpret.py`` in a process with ``TRITON_INTERPRET=1``; small shapes (the
interpreter is ~100x slower than eager PyTorch).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

if os.environ.get("TRITON_INTERPRET") != "1":
    raise ImportError("tests/triton_interpret needs TRITON_INTERPRET=1 set before triton is imported")

from dino_pytorch import DINO, DINOLoss, ops  # noqa: E402
from dino_pytorch.ops import triton_kernels as tk  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
K, B = 96, 3


def rel(a, b):
    return (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1e-30)


@pytest.fixture
def launches(monkeypatch):
    """Counts of each launcher's calls, by name; the engine env var set per run by ``on``."""
    counts = {}
    for name in ("cross_entropy_forward", "cross_entropy_backward", "centered_softmax", "column_sum"):
        original = getattr(tk, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(tk, name, counted)
    return counts


def on(monkeypatch, engine, fn):
    monkeypatch.setenv(ops.ENGINE_ENV, engine)
    return fn()


def both(monkeypatch, launches, fn):
    """``fn()`` on the Triton engine, then on the eager one; asserts the Triton kernels ran."""
    triton = on(monkeypatch, "triton", fn)
    assert launches.get("cross_entropy_forward", 0) >= 1, launches
    launches.clear()
    eager = on(monkeypatch, "eager", fn)
    assert not launches, launches
    return triton, eager


def views_and_teacher(dtype, seed=0, views=4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(views * B, K, generator=g) * 2).to(dtype), (torch.randn(2 * B, K, generator=g) * 2).to(dtype)


def loss_and_grad(loss_fn, student, teacher, divide=1):
    s = student.clone().requires_grad_(True)
    loss = loss_fn(s, teacher) / divide
    loss.backward()
    return loss.detach(), s.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_dino_loss(monkeypatch, launches, dtype, centering):
    student, teacher = views_and_teacher(dtype)

    def run():
        loss_fn = DINOLoss(K, centering=centering)
        first = loss_and_grad(loss_fn, student, teacher)
        second = loss_and_grad(loss_fn, student, teacher, divide=4)  # accumulation's loss / steps
        return first, second, loss_fn.center.clone()

    (t1, t2, t_center), (e1, e2, e_center) = both(monkeypatch, launches, run)
    for (lt, gt), (le, ge) in ((t1, e1), (t2, e2)):
        assert rel(lt, le) <= 1e-5 and gt.dtype == dtype and rel(gt, ge) <= TOL[dtype]
    assert rel(t_center, e_center) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_teacher_ops(monkeypatch, launches, dtype):
    _, teacher = views_and_teacher(dtype, seed=1)
    center = torch.randn(1, K) * 0.3
    monkeypatch.setenv(ops.ENGINE_ENV, "triton")
    probs, column = ops.centered_teacher_softmax(teacher, center, 0.04), ops.teacher_column_sum(teacher)
    assert launches == {"centered_softmax": 1, "column_sum": 1}
    monkeypatch.setenv(ops.ENGINE_ENV, "eager")
    assert rel(probs, ops.centered_teacher_softmax(teacher, center, 0.04)) <= TOL[dtype]
    assert rel(column, ops.teacher_column_sum(teacher)) <= 1e-5


def test_weighted_cross_entropy(monkeypatch, launches):
    student, _ = views_and_teacher(torch.float32, seed=2)
    targets = torch.softmax(torch.randn(student.shape) / 0.05, -1)
    weights = torch.rand(student.shape[0])
    (lt, gt), (le, ge) = both(monkeypatch, launches, lambda: loss_and_grad(
        lambda s, t: ops.weighted_cross_entropy(s, t, 0.1, weights), student, targets))
    assert rel(lt, le) <= 1e-5 and rel(gt, ge) <= 1e-5


def test_fused_head_loss(monkeypatch, launches):
    g = torch.Generator().manual_seed(3)
    x = nn.functional.normalize(torch.randn(4 * B, 16, generator=g), dim=-1).requires_grad_(True)
    v, w = torch.randn(K, 16, generator=g).requires_grad_(True), torch.ones(K, 1)
    probs = torch.softmax(torch.randn(2, B, K, generator=g) / 0.05, -1)

    def run():
        loss = ops.fused_last_layer_cross_entropy(x, v, w, probs, 0.1, 4, chunk_rows=2)
        return (loss.detach(), *torch.autograd.grad(loss, (x, v)))

    triton, eager = both(monkeypatch, launches, run)
    assert all(rel(a, b) <= 1e-5 for a, b in zip(triton, eager))


def test_dino_three_lines(monkeypatch, launches):
    g = torch.Generator().manual_seed(4)
    views = [torch.randn(B, 1, 12, 12, generator=g) for _ in range(2)] + [
        torch.randn(B, 1, 8, 8, generator=g) for _ in range(2)]

    def run():
        torch.manual_seed(0)
        backbone = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        dino = DINO(backbone, out_dim=K, hidden_dim=16, bottleneck_dim=8)
        loss = dino(views)
        loss.backward()
        dino.update_teacher()
        return loss.detach(), backbone[0].weight.grad.clone(), dino.criterion.center.clone()

    triton, eager = both(monkeypatch, launches, run)
    assert all(rel(a, b) <= 1e-5 for a, b in zip(triton, eager))


def test_first_call_of_a_fresh_process():
    # The ops register when the engine is built, not as a side effect of another call: the
    # multi-view cross-entropy must work as the very first call of a process.
    code = (
        "import torch\nfrom dino_pytorch import ops\n"
        "s = torch.randn(4 * 3, 96, generator=torch.Generator().manual_seed(0), requires_grad=True)\n"
        "p = torch.softmax(torch.randn(2, 3, 96, generator=torch.Generator().manual_seed(1)), -1)\n"
        "loss = ops.multiview_cross_entropy(s, p, 0.1)\nloss.backward()\n"
        "assert ops.engine_for(s).name == 'triton'\nprint(repr(loss.item()), repr(s.grad.norm().item()))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", ops.ENGINE_ENV: "triton"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr[-3000:]
    loss, grad_norm = map(float, out.stdout.split())
    s = torch.randn(4 * 3, 96, generator=torch.Generator().manual_seed(0), requires_grad=True)
    p = torch.softmax(torch.randn(2, 3, 96, generator=torch.Generator().manual_seed(1)), -1)
    expected = ops.multiview_cross_entropy_reference(list(s.chunk(4)), list(p), 0.1)
    expected.backward()
    assert abs(loss - expected.item()) <= 1e-5 * abs(expected.item())
    assert abs(grad_norm - s.grad.norm().item()) <= 1e-5 * s.grad.norm().item()
