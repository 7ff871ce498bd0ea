"""The Triton path on a real GPU: kernels vs the torch engine, DINOLoss, compile (tests/cuda runs only with CUDA)."""
import math

import pytest
import torch

from dino_pytorch import DINOLoss
from dino_pytorch.ops import (
    EagerEngine,
    centered_teacher_softmax,
    cross_entropy,
    engine,
    engine_for,
    multiview_cross_entropy_reference,
    teacher_column_sum,
)

EAGER = EagerEngine()


def mvce(student, probs, engine_obj):
    teachers, batch = probs.shape[:2]
    views = student.shape[0] // batch
    return cross_entropy(student, probs, 0.1, 1.0 / (batch * teachers * (views - 1)), engine=engine_obj)

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel(a, b):
    return (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1e-30)


def make(views, teachers, batch, k, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    student = torch.randn(views * batch, k, generator=g, device="cuda").to(dtype)
    probs = torch.softmax(torch.randn(teachers, batch, k, generator=g, device="cuda") / 0.07, dim=-1)
    return student, probs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("views, teachers, batch, k", [(10, 2, 8, 65536), (2, 1, 3, 1000), (4, 4, 5, 4099)])
def test_triton_engine_matches_torch_engine(views, teachers, batch, k, dtype):
    student, probs = make(views, teachers, batch, k, dtype)
    a, b = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    la = mvce(a, probs, engine.triton_engine())
    lb = mvce(b, probs, EAGER)
    la.backward()
    lb.backward()
    assert rel(la, lb) <= 1e-5
    assert a.grad.dtype == dtype and rel(a.grad, b.grad) <= TOL[dtype]


def test_triton_matches_reference_in_float32():
    student, probs = make(10, 2, 16, 65536, torch.float32, seed=1)
    a, b = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    la = mvce(a, probs, engine.triton_engine())
    lb = multiview_cross_entropy_reference(list(b.chunk(10)), list(probs), 0.1)
    la.backward()
    lb.backward()
    assert rel(la, lb) <= 1e-6
    assert rel(a.grad, b.grad) <= 1e-5


def test_log_k_on_gpu():
    k = 65536
    zeros, uniform = torch.zeros(20, k, device="cuda"), torch.full((2, 2, k), 1.0 / k, device="cuda")
    loss = mvce(zeros, uniform, engine.triton_engine())
    assert abs(loss.item() - math.log(k)) / math.log(k) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_teacher_kernels(dtype):
    g = torch.Generator(device="cuda").manual_seed(2)
    t = torch.randn(128, 65536, generator=g, device="cuda").to(dtype)
    center = torch.randn(1, 65536, generator=g, device="cuda") * 0.3
    assert engine_for(t).name == "triton"
    ref = EAGER.centered_softmax(t, center, 0.04)
    assert rel(centered_teacher_softmax(t, center, 0.04), ref) <= TOL[dtype]
    assert rel(teacher_column_sum(t), t.double().sum(0, keepdim=True)) <= 1e-5


def test_dino_loss_on_gpu_matches_cpu():
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(10 * 8, 4096, generator=g), torch.randn(2 * 8, 4096, generator=g)
    cpu, gpu = DINOLoss(4096), DINOLoss(4096).cuda()
    a, b = student.clone().requires_grad_(True), student.cuda().requires_grad_(True)
    for _ in range(2):  # the second call uses the updated centre
        la, lb = cpu(a, teacher), gpu(b, teacher.cuda())
    la.backward()
    lb.backward()
    assert rel(lb.cpu(), la) <= 1e-5
    assert rel(b.grad.cpu(), a.grad) <= 1e-5
    assert rel(gpu.center.cpu(), cpu.center) <= 1e-5


def test_engine_env_forces_eager(monkeypatch):
    monkeypatch.setenv(engine.ENGINE_ENV, "eager")
    assert engine_for(torch.zeros(1, device="cuda")).name == "eager"


def test_dino_loss_compiles_with_triton_ops():
    torch._dynamo.reset()
    eager, compiled = DINOLoss(4096).cuda(), DINOLoss(4096).cuda()
    step = torch.compile(compiled, fullgraph=True)
    for i in range(3):
        student, _ = make(6, 2, 4, 4096, torch.bfloat16, seed=10 + i)
        teacher = torch.randn(8, 4096, device="cuda").bfloat16()
        a, b = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
        la, lb = eager(a, teacher), step(b, teacher)
        la.backward()
        lb.backward()
        assert rel(lb, la) <= 1e-5
        assert rel(b.grad, a.grad) <= 1e-2
        assert rel(compiled.center, eager.center) <= 1e-5
