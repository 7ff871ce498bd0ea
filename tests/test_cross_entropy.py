"""The multi-view cross-entropy (autograd Function over the eager engine), its engine choice and compile."""
import math
from types import SimpleNamespace

import pytest
import torch

from dino_pytorch import DINOHead, DINOLoss
from dino_pytorch.ops import (
    CrossEntropyFunction,
    EagerEngine,
    centered_teacher_softmax,
    cross_entropy,
    engine,
    multiview_cross_entropy,
    multiview_cross_entropy_reference,
    teacher_column_sum,
    weighted_cross_entropy,
)
from reference import official_loss


def rel(a, b):
    return (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1e-30)


def make(views, teachers, batch, k, seed=0, scale=1.0, teacher_temp=0.07):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(views * batch, k, generator=g) * scale
    probs = torch.softmax(torch.randn(teachers, batch, k, generator=g) / teacher_temp, dim=-1)
    return student, probs


def per_pair_loop_float64(student, probs, student_temp):
    """Official per-pair loop for any T, float64: mean over (i < T, v != i) of batch-mean CE."""
    num_teacher, batch = probs.shape[:2]
    views = (student.double() / student_temp).chunk(student.shape[0] // batch)
    total, pairs = 0.0, 0
    for i in range(num_teacher):
        for v in range(len(views)):
            if v != i:
                log_p = torch.log_softmax(views[v], dim=-1)
                total = total + torch.sum(-probs[i].double() * log_p, dim=-1).mean()
                pairs += 1
    return total / pairs


SHAPES = [  # (V, T, B, K, chunk_rows)
    (2, 2, 1, 17, None),
    (2, 1, 3, 33, 2),
    (3, 2, 4, 257, 3),
    (10, 2, 5, 257, 2),
    (10, 2, 7, 100, 3),  # 3 does not divide 7
    (5, 3, 2, 64, 1),
    (4, 4, 3, 50, 2),  # T == V: no local views
]


@pytest.mark.parametrize("views, teachers, batch, k, chunk", SHAPES)
def test_loss_and_grad_match_reference_and_float64_loop(views, teachers, batch, k, chunk):
    student, probs = make(views, teachers, batch, k, seed=views * 100 + k)
    ours = student.clone().requires_grad_(True)
    coef = 1.0 / (batch * teachers * (views - 1))
    loss = cross_entropy(ours, probs, 0.1, coef, engine=EagerEngine(chunk_rows=chunk))
    loss.backward()
    assert torch.equal(loss, multiview_cross_entropy(student, probs, 0.1))  # blocks: the same rows' sums

    exact = student.double().requires_grad_(True)
    exact_loss = per_pair_loop_float64(exact, probs, 0.1)
    exact_loss.backward()
    assert loss.dtype == torch.float32 and loss.ndim == 0 and ours.grad.dtype == torch.float32
    assert rel(loss, exact_loss) <= 1e-6
    assert rel(ours.grad, exact.grad) <= 1e-6

    if teachers >= 2:  # the reference needs another teacher view for every global view
        ref = student.clone().requires_grad_(True)
        ref_loss = multiview_cross_entropy_reference(list(ref.chunk(views)), list(probs), 0.1)
        ref_loss.backward()
        assert rel(loss, ref_loss) <= 1e-6
        assert rel(ours.grad, ref.grad) <= 1e-6


@pytest.mark.parametrize("views", [2, 10])
def test_matches_official_loss_with_centre(views):
    g = torch.Generator().manual_seed(views)
    student, teacher = torch.randn(views * 4, 129, generator=g), torch.randn(2 * 4, 129, generator=g)
    center = torch.randn(1, 129, generator=g) * 0.5
    probs = centered_teacher_softmax(teacher, center, 0.07).view(2, 4, 129)
    ours = student.clone().requires_grad_(True)
    multiview_cross_entropy(ours, probs, 0.1).backward()
    s64 = student.double().requires_grad_(True)
    ref, _ = official_loss(s64, teacher, center, 0.07)
    ref.backward()
    assert rel(multiview_cross_entropy(student, probs, 0.1), ref) <= 1e-6
    assert rel(ours.grad, s64.grad) <= 1e-6


def test_large_logits_stay_accurate():
    # z / tau up to ~+-400: |Q| * lse - <Q, z> would cancel; the max-relative form does not.
    student, probs = make(6, 2, 3, 257, scale=10.0)
    ours = student.clone().requires_grad_(True)
    loss = multiview_cross_entropy(ours, probs, 0.1)
    loss.backward()
    exact = student.double().requires_grad_(True)
    exact_loss = per_pair_loop_float64(exact, probs, 0.1)
    exact_loss.backward()
    assert rel(loss, exact_loss) <= 1e-6
    assert rel(ours.grad, exact.grad) <= 1e-6


def test_zero_logits_give_log_k():
    k = 65536
    loss = multiview_cross_entropy(torch.zeros(10 * 2, k), torch.full((2, 2, k), 1.0 / k), 0.1)
    assert abs(loss.item() - math.log(k)) / math.log(k) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits(dtype):
    student, probs = make(6, 2, 4, 257)
    low = student.to(dtype).requires_grad_(True)
    loss = cross_entropy(low, probs, 0.1, 1.0 / (4 * 2 * 5), engine=EagerEngine(chunk_rows=3))
    loss.backward()
    assert loss.dtype == torch.float32 and low.grad.dtype == dtype
    # Same (rounded) logits in float32: only the gradient's final rounding to `dtype` differs.
    same = low.detach().float().requires_grad_(True)
    ref = multiview_cross_entropy_reference(list(same.chunk(6)), list(probs), 0.1)
    ref.backward()
    assert rel(loss, ref) <= 1e-6
    assert rel(low.grad, same.grad) <= 1e-2
    # And against the unrounded float32 data.
    assert rel(loss, multiview_cross_entropy_reference(list(student.chunk(6)), list(probs), 0.1)) <= 1e-2


def test_input_layouts_agree():
    views, teachers, batch, k = 5, 2, 3, 40
    student, probs = make(views, teachers, batch, k)
    expected = multiview_cross_entropy(student, probs, 0.1)
    flat_teacher = probs.flatten(0, 1)
    for s, t, kwargs in [
        (student.view(views, batch, k), probs, {}),
        (student.view(views, batch, k), flat_teacher, {}),
        (student, flat_teacher, {"batch_size": batch}),
        (list(student.chunk(views)), list(probs), {}),
    ]:
        assert torch.equal(multiview_cross_entropy(s, t, 0.1, **kwargs), expected)
    # Both 2-D: the official two teacher views are assumed; other T need batch_size.
    assert torch.equal(multiview_cross_entropy(student, flat_teacher, 0.1), expected)
    three = torch.cat([probs, probs[:1]]).flatten(0, 1)
    with pytest.raises(ValueError, match="rows"):
        multiview_cross_entropy(student, three, 0.1)  # read as T = 2: 9 rows do not split
    assert torch.isfinite(multiview_cross_entropy(student, three, 0.1, batch_size=batch))
    with pytest.raises(ValueError, match="rows"):
        multiview_cross_entropy(student[:-1], probs, 0.1)
    with pytest.raises(ValueError, match="at least 2"):
        multiview_cross_entropy(student[:batch], probs[:1], 0.1)
    with pytest.raises(ValueError, match="teacher_probs has 3 views but student only 2"):
        multiview_cross_entropy(student[: 2 * batch], torch.cat([probs, probs[:1]]), 0.1)


def test_teacher_is_a_constant_target():
    student, probs = make(3, 2, 2, 16)
    probs.requires_grad_(True)
    s = student.clone().requires_grad_(True)
    multiview_cross_entropy(s, probs, 0.1).backward()
    assert probs.grad is None and s.grad is not None


def test_gradcheck_float64():
    student, probs = make(3, 2, 2, 5, scale=3.0)
    student = student.double().requires_grad_(True)
    probs = probs.double()

    def fn(s):
        return CrossEntropyFunction.apply(s, probs, None, 0.1, True, 1 / 8, EagerEngine(chunk_rows=1), False)[0]

    assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-8, rtol=1e-6)


def _saved_bytes(fn, exclude):
    """Bytes of the tensors autograd saves while ``fn`` runs, not counting ``exclude``'s storage."""
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr != exclude.untyped_storage().data_ptr():
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saves_no_log_probability_tensor(dtype):
    views, teachers, batch, k = 10, 2, 4, 1024
    student, probs = make(views, teachers, batch, k)
    student = student.to(dtype).requires_grad_(True)
    log_prob_bytes = views * batch * k * 4
    ours = _saved_bytes(lambda: multiview_cross_entropy(student, probs, 0.1), student)
    assert ours < log_prob_bytes
    assert ours == teachers * batch * k * 4 + views * batch * 4  # teacher probs + one statistic per row
    # The measurement sees what the per-view reference keeps: a log-softmax per view.
    ref = _saved_bytes(
        lambda: multiview_cross_entropy_reference(list(student.chunk(views)), list(probs), 0.1), student
    )
    assert ref >= log_prob_bytes
    # The student logits themselves are saved as they are: no float32 copy of half input.
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        multiview_cross_entropy(student, probs, 0.1)
    ptr = student.untyped_storage().data_ptr()
    assert any(t.dtype == dtype and t.untyped_storage().data_ptr() == ptr for t in saved)


def fake(device, dtype=torch.float32):
    """What engine_for reads of a tensor: a CUDA tensor cannot be made on a machine without one."""
    return SimpleNamespace(device=torch.device(device), dtype=dtype)


def test_engine_choice(monkeypatch):
    monkeypatch.delenv(engine.ENGINE_ENV, raising=False)
    assert engine.engine_for(torch.zeros(2)).name == "eager"
    monkeypatch.setattr(engine, "triton_importable", lambda: True)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert engine.engine_for(fake("cuda", dtype)).name == "triton"
    assert engine.engine_for(fake("cuda:1")).name == "triton"
    assert engine.engine_for(fake("cuda", torch.float64)).name == "eager"  # the kernels compute in float32
    assert engine.engine_for(fake("cpu")).name == "eager"
    monkeypatch.setenv(engine.ENGINE_ENV, "eager")
    assert engine.engine_for(fake("cuda")).name == "eager"
    monkeypatch.setenv(engine.ENGINE_ENV, "bogus")
    with pytest.raises(ValueError, match="DINO_PYTORCH_ENGINE='bogus', expected 'eager' or 'triton'"):
        engine.engine_for(fake("cpu"))
    monkeypatch.setenv(engine.ENGINE_ENV, "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="DINO_PYTORCH_ENGINE=triton with a cpu tensor needs TRITON_INTERPRET=1"):
        engine.engine_for(fake("cpu"))
    monkeypatch.delenv(engine.ENGINE_ENV)
    monkeypatch.setattr(engine, "triton_importable", lambda: False)
    assert engine.engine_for(fake("cuda")).name == "eager"


def test_cpu_tensors_take_the_eager_engine(monkeypatch):
    monkeypatch.delenv(engine.ENGINE_ENV, raising=False)
    engines = []
    original = CrossEntropyFunction.apply

    def spy(*args):
        engines.append(args[6].name)
        return original(*args)

    monkeypatch.setattr(CrossEntropyFunction, "apply", spy)
    student, probs = make(3, 2, 2, 16)
    multiview_cross_entropy(student, probs, 0.1)
    DINOLoss(16)(student, torch.randn(4, 16))
    assert engines == ["eager", "eager"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_teacher_ops_on_cpu(dtype):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(6, 300, generator=g).to(dtype)
    center = torch.randn(1, 300, generator=g)
    expected = torch.softmax((t.double() - center.double()) / 0.04, dim=-1)
    probs = centered_teacher_softmax(t, center, 0.04)
    assert probs.dtype == torch.float32 and rel(probs, expected) <= 1e-5
    column = teacher_column_sum(t)
    assert column.shape == (1, 300) and column.dtype == torch.float32
    assert rel(column, t.double().sum(0, keepdim=True)) <= 1e-6
    if dtype == torch.float32:  # the centre statistic is bit-identical to the official float sum
        assert torch.equal(column, torch.sum(t.float(), dim=0, keepdim=True))


@pytest.mark.parametrize("weighted", [False, True])
def test_weighted_cross_entropy_matches_float64(weighted):
    # iBOT's form: one target row per logit row, a weight per row; float64 naive reference.
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 90, generator=g) * 3
    targets = torch.softmax(torch.randn(7, 90, generator=g) / 0.05, dim=-1)
    weights = torch.rand(7, generator=g) if weighted else None
    ours = logits.clone().requires_grad_(True)
    loss = weighted_cross_entropy(ours, targets, 0.1, weights)
    loss.backward()
    exact = logits.double().requires_grad_(True)
    rows = -(targets.double() * torch.log_softmax(exact / 0.1, dim=-1)).sum(-1)
    (rows * (weights.double() if weighted else 1.0)).sum().backward()
    assert rel(loss, (rows * (weights.double() if weighted else 1.0)).sum()) <= 1e-6
    assert rel(ours.grad, exact.grad) <= 1e-6
    with pytest.raises(ValueError, match=r"weights has shape \(3,\), expected \(7,\)"):
        weighted_cross_entropy(logits, targets, 0.1, torch.ones(3))
    with pytest.raises(ValueError, match="expected both"):
        weighted_cross_entropy(logits, targets[:3], 0.1)


def test_center_counter_stays_out_of_state_dict():
    loss_fn = DINOLoss(32, center_update="manual")
    student, _ = make(4, 2, 3, 32)
    loss_fn(student, torch.randn(6, 32))
    assert list(loss_fn.state_dict()) == ["center"]
    assert int(loss_fn._center_count) == 6
    loss_fn.update_center()
    assert int(loss_fn._center_count) == 0 and torch.count_nonzero(loss_fn.center) > 0


@pytest.mark.slow  # 7-25 s of compiling each
@pytest.mark.parametrize("center_update", ["forward", "manual"])
def test_dino_loss_compiles_fullgraph(center_update):
    torch._dynamo.reset()
    k, views, batch = 64, 4, 3
    eager, compiled = DINOLoss(k, center_update=center_update), DINOLoss(k, center_update=center_update)
    step = torch.compile(compiled, fullgraph=True)
    update = torch.compile(compiled.update_center, fullgraph=True)
    # error_on_recompile: a Python-side counter that changes per call would re-trace here.
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(4):
            student, _ = make(views, 2, batch, k, seed=i)
            teacher = torch.randn(2 * batch, k, generator=torch.Generator().manual_seed(50 + i))
            a, b = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
            la, lb = eager(a, teacher), step(b, teacher)
            la.backward()
            lb.backward()
            assert rel(lb, la) <= 1e-6
            assert rel(b.grad, a.grad) <= 1e-6
            if center_update == "manual" and i % 2 == 1:
                eager.update_center()
                update()
            assert rel(compiled.center, eager.center) <= 1e-6


@pytest.mark.slow  # ~5 s of compiling
def test_dino_head_compiles_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    head = DINOHead(16, 64, hidden_dim=32, bottleneck_dim=8).double()
    compiled = torch.compile(head, fullgraph=True)
    x = torch.randn(5, 16, dtype=torch.float64)
    out_eager = head(x)
    out_eager.square().sum().backward()
    grads_eager = [p.grad.clone() for p in head.parameters() if p.grad is not None]
    head.zero_grad()
    out_compiled = compiled(x)
    out_compiled.square().sum().backward()
    grads_compiled = [p.grad.clone() for p in head.parameters() if p.grad is not None]
    assert rel(out_compiled, out_eager) <= 1e-6
    assert len(grads_eager) == len(grads_compiled) > 0
    for ge, gc in zip(grads_eager, grads_compiled):
        assert rel(gc, ge) <= 1e-6
