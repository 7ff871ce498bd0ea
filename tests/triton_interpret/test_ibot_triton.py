"""IBOTPatchLoss on the Triton engine under the Triton interpreter (CPU), against the eager engine.

The route a GPU takes: the weighted cross-entropy (one target row per logit row, a weight per row),
the centred softmax and the centre's column sum on the kernels; M = 0 launches no softmax kernel on
an empty grid. Run by ``tests/test_triton_interpret.py`` with ``TRITON_INTERPRET=1``.
"""
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    raise ImportError("tests/triton_interpret needs TRITON_INTERPRET=1 set before triton is imported")

from dino_pytorch import IBOTPatchLoss, ops  # noqa: E402
from dino_pytorch.ops import triton_kernels as tk  # noqa: E402

K, N = 96, 8
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel(a, b):
    return (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1e-30)


def run(monkeypatch, engine, student, teacher, masks):
    """Loss, student gradient and centre of one training forward on ``engine``."""
    monkeypatch.setenv(ops.ENGINE_ENV, engine)
    loss_fn = IBOTPatchLoss(K, teacher_temp=0.07)
    s = student.clone().requires_grad_(True)
    loss = loss_fn(s, teacher, masks)
    loss.backward()
    return loss.detach(), s.grad, loss_fn.center


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ibot_patch_loss_triton_equals_eager(monkeypatch, dtype):
    calls = []
    original = tk.cross_entropy_forward
    monkeypatch.setattr(tk, "cross_entropy_forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(4, N, generator=g) < 0.4
    masks[1] = False  # an image without a mask
    m = int(masks.sum())
    student = (2 * torch.randn(m, K, generator=g)).to(dtype)
    teacher = torch.randn(m, K, generator=g).to(dtype)
    triton = run(monkeypatch, "triton", student, teacher, masks)
    assert calls, "the Triton kernels did not run"
    eager = run(monkeypatch, "eager", student, teacher, masks)
    for ours, ref in zip(triton, eager):
        assert rel(ours, ref) <= TOL[dtype]


def test_no_masked_patch_on_triton(monkeypatch):
    loss, grad, center = run(monkeypatch, "triton", torch.randn(0, K), torch.randn(0, K),
                             torch.zeros(4, N, dtype=torch.bool))
    assert loss.item() == 0.0 and grad.shape == (0, K) and torch.equal(center, torch.zeros(1, K))
