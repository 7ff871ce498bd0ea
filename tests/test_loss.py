import math

import pytest
import torch

from dino_pytorch import DINOLoss
from reference import official_loss, sinkhorn_knopp_naive, sinkhorn_loss_naive

K = 257


def make(batch=3, ncrops=6, k=K, seed=0, scale=1.0):
    # scale 1 already exceeds real DINO logits (cosines in [-1, 1] with norm_last_layer=True).
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(ncrops * batch, k, generator=g) * scale
    t = torch.randn(2 * batch, k, generator=g) * scale
    return s, t


def rel(a, b):
    return (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1e-30)


@pytest.mark.parametrize("ncrops", [2, 3, 10])
@pytest.mark.parametrize("batch", [1, 4])
def test_loss_center_and_grad_match_official(ncrops, batch):
    s, t = make(batch, ncrops)
    # Seeded: float32 itself is ~1e-6 from float64 here, so data drawn from the global RNG (whose
    # state depends on which tests ran before) made the 1e-6 bound flaky for the official loop too.
    center = torch.randn(1, K, generator=torch.Generator().manual_seed(1)) * 0.5
    loss_fn = DINOLoss(K, ncrops, 0.04, 0.07, 0, 10)
    loss_fn.center.copy_(center)
    s32 = s.clone().requires_grad_(True)
    loss = loss_fn(s32, t, epoch=3)
    loss.backward()

    s64 = s.double().requires_grad_(True)
    ref_loss, ref_center = official_loss(s64, t, center, teacher_temp=0.07)
    ref_loss.backward()

    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert rel(loss, ref_loss) <= 1e-6
    assert rel(loss_fn.center, ref_center) <= 1e-6
    assert rel(s32.grad, s64.grad) <= 1e-6


def official_loop_float32(s, t, center, teacher_temp, ncrops):
    """The official per-pair loop run in float32, as the official code runs."""
    q = torch.softmax((t - center) / teacher_temp, dim=-1).chunk(2)
    views = (s / 0.1).chunk(ncrops)
    total, n = 0, 0
    for iq in range(2):
        for v in range(ncrops):
            if v != iq:
                total = total + torch.sum(-q[iq] * torch.log_softmax(views[v], dim=-1), dim=-1).mean()
                n += 1
    return total / n


def test_large_logits_match_official_float32_loop():
    # With logits of +-100 float32 itself is only ~1e-6 accurate; we then match the official
    # float32 computation as closely as it matches float64.
    s, t = make(4, 10, scale=3.0)
    center = torch.randn(1, K) * 0.5
    ours = s.clone().requires_grad_(True)
    loss_fn = DINOLoss(K)
    loss_fn.center.copy_(center)
    loss_fn(ours, t, teacher_temp=0.07).backward()
    official = s.clone().requires_grad_(True)
    ref = official_loop_float32(official, t, center, 0.07, 10)
    ref.backward()
    s64 = s.double().requires_grad_(True)
    official_loss(s64, t, center, 0.07)[0].backward()
    assert rel(ours.grad, official.grad) <= 1e-6
    assert rel(ours.grad, s64.grad) <= rel(official.grad, s64.grad) * 1.05


def test_list_input_equals_concatenated():
    s, t = make(4, 5)
    a, b = DINOLoss(K), DINOLoss(K)
    la = a(s, t)
    lb = b(list(s.chunk(5)), list(t.chunk(2)))
    assert torch.allclose(la, lb, rtol=1e-6, atol=0)
    assert torch.allclose(a.center, b.center, rtol=1e-6, atol=1e-8)


def test_mixed_list_and_tensor_input():
    s, t = make(2, 4)
    ref = DINOLoss(K)(s, t)
    assert torch.allclose(DINOLoss(K)(list(s.chunk(4)), t), ref, rtol=1e-6)
    assert torch.allclose(DINOLoss(K)(s, list(t.chunk(2))), ref, rtol=1e-6)
    assert torch.allclose(DINOLoss(K, ncrops=4)(s, t), ref, rtol=1e-6)


def test_uses_center_from_before_update_and_updates_from_raw_logits():
    s, t = make(2, 4)
    loss_fn = DINOLoss(K)
    # First call: centre is zero, so the loss equals the official loss with a zero centre.
    ref0, c1 = official_loss(s, t, torch.zeros(1, K), 0.04)
    assert rel(loss_fn(s, t), ref0) <= 1e-6
    assert rel(loss_fn.center, c1) <= 1e-6
    ref1, c2 = official_loss(s, t, c1.float(), 0.04)
    assert rel(loss_fn(s, t), ref1) <= 1e-6
    assert rel(loss_fn.center, c2) <= 1e-6


@pytest.mark.parametrize("k", [65536, 10])
def test_zero_logits_give_log_k(k):
    loss = DINOLoss(k)(torch.zeros(10 * 2, k), torch.zeros(2 * 2, k))
    assert abs(loss.item() - math.log(k)) / math.log(k) <= 1e-6
    if k == 65536:
        assert abs(loss.item() - 11.0903549) <= 1.2e-5


def test_center_buffer_layout_and_official_state_dict():
    loss_fn = DINOLoss(65536)
    sd = loss_fn.state_dict()
    assert list(sd) == ["center"]
    assert sd["center"].shape == (1, 65536) and sd["center"].dtype == torch.float32
    assert torch.count_nonzero(sd["center"]) == 0
    official_entry = {"center": torch.randn(1, 65536)}  # an official checkpoint's `dino_loss`
    loss_fn.load_state_dict(official_entry)
    assert torch.equal(loss_fn.center, official_entry["center"])


def test_teacher_temperature_schedule_matches_official_linspace():
    loss_fn = DINOLoss(K, 10, 0.04, 0.07, 30, 100)
    assert loss_fn.teacher_temp_at(0) == pytest.approx(0.04, abs=0)
    assert loss_fn.teacher_temp_at(29) == pytest.approx(0.07, rel=1e-15)
    assert loss_fn.teacher_temp_at(30) == 0.07
    assert loss_fn.teacher_temp_at(1) - loss_fn.teacher_temp_at(0) == pytest.approx(0.03 / 29, rel=1e-12)
    # A no-warm-up default is constant 0.04 and needs no epoch.
    assert DINOLoss(K).teacher_temp_at(None) == 0.04


def test_teacher_temp_override_per_call():
    s, t = make(2, 4)
    ref, _ = official_loss(s, t, torch.zeros(1, K), 0.055)
    assert rel(DINOLoss(K)(s, t, teacher_temp=0.055), ref) <= 1e-6


def test_eval_mode_does_not_touch_center():
    s, t = make()
    loss_fn = DINOLoss(K).eval()
    loss_fn(s, t)
    assert torch.count_nonzero(loss_fn.center) == 0


def test_gradient_accumulation_center_equals_one_big_batch():
    micro = [make(batch=4, ncrops=4, seed=i) for i in range(4)]
    acc = DINOLoss(K, center_update="manual")
    for s, t in micro:
        acc(s, t)
    assert torch.count_nonzero(acc.center) == 0  # nothing applied yet
    acc.update_center()
    big_teacher = torch.cat([torch.cat([t.chunk(2)[i] for _, t in micro]) for i in range(2)])
    big_student = torch.cat([torch.cat([s.chunk(4)[v] for s, _ in micro]) for v in range(4)])
    one = DINOLoss(K)
    one(big_student, big_teacher)
    assert torch.allclose(acc.center, one.center, rtol=1e-6, atol=1e-7)
    acc.update_center()  # nothing pending: no change
    assert torch.allclose(acc.center, one.center, rtol=1e-6, atol=1e-7)


def test_sinkhorn_knopp_matches_dinov2_formula():
    s, t = make(batch=8, ncrops=4, scale=0.5)
    loss_fn = DINOLoss(K, centering="sinkhorn_knopp")
    probs = loss_fn.teacher_probs(list(t.chunk(2)), 0.07)
    ref = sinkhorn_knopp_naive(t, 0.07)
    assert rel(torch.cat(probs), ref) <= 1e-5
    assert torch.allclose(torch.cat(probs).sum(-1), torch.ones(16), atol=1e-5)
    # The loss and its gradient: naive float64 Sinkhorn-Knopp targets + the per-pair loop.
    ours = s.clone().requires_grad_(True)
    loss = loss_fn(ours, t, teacher_temp=0.07)
    loss.backward()
    s64 = s.double().requires_grad_(True)
    ref_loss = sinkhorn_loss_naive(s64, t, 0.07)
    ref_loss.backward()
    assert rel(loss, ref_loss) <= 1e-5
    assert rel(ours.grad, s64.grad) <= 1e-5
    # Not the centred softmax: that loss is measurably different on the same logits.
    assert rel(official_loss(s, t, torch.zeros(1, K), 0.07)[0], ref_loss) > 1e-3
    assert torch.count_nonzero(loss_fn.center) == 0  # SK needs no centre


@pytest.mark.parametrize("iterations", [1, 3, 5])
def test_sinkhorn_knopp_iterations_and_list_input(iterations):
    s, t = make(batch=5, ncrops=3, scale=0.8, seed=4)
    loss_fn = DINOLoss(K, centering="sinkhorn_knopp", sinkhorn_iterations=iterations)
    loss = loss_fn(list(s.chunk(3)), list(t.chunk(2)), teacher_temp=0.05)
    assert rel(loss, sinkhorn_loss_naive(s, t, 0.05, n_iterations=iterations)) <= 1e-5


def test_dino_with_sinkhorn_knopp_equals_reference_end_to_end():
    from dino_pytorch import DINO

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3), torch.nn.GELU(), torch.nn.AdaptiveAvgPool2d(1),
                                           torch.nn.Flatten())

        def forward(self, x):
            return self.net(x)

    torch.manual_seed(0)
    dino = DINO(Tiny(), out_dim=32, hidden_dim=16, bottleneck_dim=8, centering="sinkhorn_knopp", teacher_temp=0.06)
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(4, 1, 12, 12, generator=g) for _ in range(2)] + [torch.randn(4, 1, 8, 8, generator=g)]
    with torch.no_grad():
        teacher = dino.teacher.module(views[:2])
        student = dino.student(views)
    ref = sinkhorn_loss_naive(student, teacher, 0.06)
    loss = dino(views)
    assert rel(loss, ref) <= 1e-5
    assert rel(official_loss(student, teacher, torch.zeros(1, 32), 0.06)[0], ref) > 1e-4  # the centring differs
    dino.update_teacher()
    assert torch.count_nonzero(dino.criterion.center) == 0


def test_sinkhorn_knopp_does_not_overflow_on_large_logits():
    t = torch.randn(8, K) * 50  # exp(t/0.04) overflows float32, and a max shift underflows rows
    q = torch.cat(DINOLoss(K, centering="sinkhorn_knopp").teacher_probs(list(t.chunk(2)), 0.04))
    assert torch.isfinite(q).all()
    assert torch.allclose(q.sum(-1), torch.ones(8), atol=1e-5)
    # exp(3 t / 0.04) overflows float32 (DINOv2's float32 loop gives NaN) but not float64.
    t = torch.randn(8, K) * 3
    q = torch.cat(DINOLoss(K, centering="sinkhorn_knopp").teacher_probs(list(t.chunk(2)), 0.04))
    assert rel(q, sinkhorn_knopp_naive(t, 0.04)) <= 1e-5


def test_half_precision_inputs_keep_float32_center_and_loss():
    s, t = make(2, 4)
    loss_fn = DINOLoss(K)
    loss = loss_fn(s.half(), t.bfloat16())
    assert loss.dtype == torch.float32 and loss_fn.center.dtype == torch.float32
    ref, _ = official_loss(s.half().double(), t.bfloat16().double(), torch.zeros(1, K), 0.04)
    assert rel(loss, ref) <= 1e-5


@pytest.mark.parametrize(
    "student, teacher, kwargs, exc, words",
    [
        (lambda: [torch.randn(2, K), torch.randn(3, K)], lambda: [torch.randn(2, K)], {}, ValueError, "batch size"),
        (lambda: [torch.randn(2, K)], lambda: [torch.randn(2, K)], {}, ValueError, "at least 2"),
        (
            lambda: [torch.randn(2, K)] * 2, lambda: [torch.randn(2, K)] * 3, {}, ValueError,
            "teacher_output has 3 views",
        ),
        (lambda: torch.randn(8, K + 1), lambda: torch.randn(4, K + 1), {}, ValueError, "out_dim=257"),
        (lambda: torch.zeros(8, K, dtype=torch.long), lambda: torch.zeros(4, K), {}, TypeError, "floating"),
        (
            lambda: torch.randn(8, K), lambda: torch.randn(4, K), {"teacher_temp": float("nan")}, ValueError,
            "teacher_temp=nan",
        ),
        (lambda: torch.randn(8, K), lambda: torch.randn(4, K), {"teacher_temp": 0.0}, ValueError, "teacher_temp=0.0"),
        (lambda: torch.randn(7, K), lambda: torch.randn(4, K), {}, ValueError, "rows"),
        (lambda: "nope", lambda: torch.randn(4, K), {}, TypeError, "student_output is a str"),
        (lambda: torch.randn(0, K), lambda: torch.randn(0, K), {}, ValueError, "rows"),
    ],
)
def test_bad_input_errors(student, teacher, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        DINOLoss(K)(student(), teacher(), **kwargs)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"student_temp": 0.0}, "student_temp=0.0"),
        ({"student_temp": -1.0}, "student_temp=-1.0"),
        ({"teacher_temp": float("inf")}, "teacher_temp=inf"),
        ({"center_momentum": 1.5}, "center_momentum=1.5"),
        ({"ncrops": 1}, "ncrops=1"),
        ({"centering": "bogus"}, "centering='bogus'"),
        ({"warmup_teacher_temp_epochs": 5, "nepochs": 3}, "warmup_teacher_temp_epochs=5"),
    ],
)
def test_bad_constructor_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        DINOLoss(K, **kwargs)


def test_epoch_beyond_schedule_and_missing_epoch():
    s, t = make()
    loss_fn = DINOLoss(K, 6, 0.04, 0.07, 3, 5)
    with pytest.raises(ValueError, match="epoch=5 is beyond"):
        loss_fn(s, t, 5)
    with pytest.raises(ValueError, match="epoch=None"):
        loss_fn(s, t)
    assert torch.isfinite(loss_fn(s, t, 4))


def test_ncrops_mismatch_with_list_input():
    with pytest.raises(ValueError, match="ncrops=4"):
        DINOLoss(K, ncrops=4)([torch.randn(2, K)] * 3, [torch.randn(2, K)] * 2)


def test_pending_center_statistics_are_not_buffers():
    # DDP broadcasts buffers from rank 0 at every forward: pending sums must not be buffers.
    loss_fn = DINOLoss(K, center_update="manual")
    assert [name for name, _ in loss_fn.named_buffers()] == ["center"]
    s, t = make()
    loss_fn.half()  # statistics keep their float32/int64 accumulators
    loss_fn(s, t)
    assert loss_fn._center_sum.dtype == torch.float32 and loss_fn._center_count.item() == t.shape[0]
    loss_fn.to("meta")
    assert loss_fn._center_sum.device.type == "meta"
