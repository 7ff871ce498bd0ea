"""Each Triton kernel under the Triton interpreter (CPU tensors) against its PyTorch twin.

Run by ``tests/test_triton_interpret.py`` in a process with ``TRITON_INTERPRET=1``; skipped when
collected without it (launching a compiled kernel needs a GPU). Shapes are small: the interpreter
is ~100x slower than eager PyTorch.
"""
import importlib.util
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
    # Collected only through tests/test_triton_interpret.py, which sets the variable: fail loudly.
    raise ImportError("tests/triton_interpret needs triton and TRITON_INTERPRET=1 set before triton is imported")

from dino_pytorch.ops import triton_kernels as tk  # noqa: E402
from dino_pytorch.ops.eager import EagerEngine  # noqa: E402

EAGER = EagerEngine()

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
SHAPES = [  # (V, T, B, K, block_k): several K tiles with a ragged last one, a single tile, T=1, T=V
    (4, 2, 3, 1000, 256),
    (2, 1, 2, 300, None),
    (3, 3, 1, 513, 128),
]


def rel(a, b):
    return (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1e-30)


def make(views, teachers, batch, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(views * batch, k, generator=g) * 2).to(dtype)
    probs = torch.softmax(torch.randn(teachers, batch, k, generator=g) / 0.07, dim=-1)
    return student, probs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("views, teachers, batch, k, block", SHAPES)
def test_cross_entropy_forward(views, teachers, batch, k, block, dtype):
    student, probs = make(views, teachers, batch, k, dtype)
    ce, stats = tk.cross_entropy_forward(student, probs, 0.1, block_k=block)
    ce_ref, mass_ref = EAGER.forward(student, probs, 0.1, True)  # the twin reads the same rounded logits
    assert ce.dtype == stats.dtype == torch.float32 and stats.shape == (3, views * batch)
    assert rel(ce, ce_ref) <= TOL[dtype]
    # The kernel's own statistics: row max and log-sum-exp relative to it, of z = x / tau.
    z = student.float() / 0.1
    row_max = z.amax(dim=-1)
    assert rel(stats[0], row_max) <= TOL[dtype]
    assert rel(stats[1], torch.logsumexp(z - row_max[:, None], dim=-1)) <= TOL[dtype]
    assert rel(stats[2], mass_ref) <= TOL[dtype]


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("views, teachers, batch, k, block", SHAPES)
def test_cross_entropy_backward(views, teachers, batch, k, block, dtype, per_row):
    student, probs = make(views, teachers, batch, k, dtype, seed=1)
    _, stats = tk.cross_entropy_forward(student, probs, 0.1)
    _, mass = EAGER.forward(student, probs, 0.1, True)
    scale = torch.rand(views * batch) if per_row else torch.tensor(0.37)  # per row: iBOT's weights
    grad = tk.cross_entropy_backward(scale, student, probs, stats, 0.1, block_k=block)
    grad_ref = EAGER.backward(scale, student, probs, mass, 0.1, True)
    assert grad.dtype == dtype and grad.shape == student.shape
    assert rel(grad, grad_ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k, block", [(1000, 256), (300, None)])
def test_centered_softmax(k, block, dtype):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, k, generator=g).to(dtype)
    center = torch.randn(1, k, generator=g) * 0.3
    out = tk.centered_softmax(logits, center, 0.04, block_k=block)
    assert out.dtype == torch.float32
    assert rel(out, EAGER.centered_softmax(logits, center, 0.04)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_column_sum(dtype):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 1000, generator=g).to(dtype)
    out = tk.column_sum(logits)
    assert out.shape == (1, 1000) and out.dtype == torch.float32
    assert rel(out, torch.sum(logits, dim=0, keepdim=True, dtype=torch.float32)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_target_row_per_logit_row(dtype):
    # iBOT's form: V = T = 1 and no view skipped, so row r is paired with teacher row r alone.
    student, probs = make(1, 1, 6, 300, dtype, seed=6)
    ce, stats = tk.cross_entropy_forward(student, probs, 0.1, skip_own=False)
    ce_ref, mass = EAGER.forward(student, probs, 0.1, False)
    assert rel(ce, ce_ref) <= TOL[dtype] and rel(stats[2], mass) <= 1e-6
    weights = torch.rand(6)
    grad = tk.cross_entropy_backward(weights, student, probs, stats, 0.1, skip_own=False)
    assert rel(grad, EAGER.backward(weights, student, probs, mass, 0.1, False)) <= TOL[dtype]


def test_custom_op_fake_impls_match():
    # torch.compile on CUDA sees only the fake (meta) impls: check them against the real ones.
    student, probs = make(3, 2, 2, 200, torch.float32, seed=5)
    torch.library.opcheck(
        torch.ops.dino_pytorch.mvce_forward, (student, probs, 0.1, True), test_utils=("test_schema", "test_faketensor")
    )
    _, stats = tk.cross_entropy_forward(student, probs, 0.1)
    torch.library.opcheck(
        torch.ops.dino_pytorch.mvce_backward,
        (torch.tensor(0.5), student, probs, stats, 0.1, True),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch.library.opcheck(torch.ops.dino_pytorch.column_sum, (student,), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(
        torch.ops.dino_pytorch.centered_softmax,
        (student, torch.zeros(1, 200), 0.04),
        test_utils=("test_schema", "test_faketensor"),
    )
