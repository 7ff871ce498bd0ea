"""One rule for non-finite values: nothing is updated from a non-finite step, and it is reported."""
from __future__ import annotations

import pytest
import torch

from dino_pytorch import DINOLoss
from dino_pytorch.nonfinite import NonFiniteError, NonFiniteFlags

K = 16


def clean(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, K, generator=g), torch.randn(8, K, generator=g)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_bad_teacher_logit_never_poisons_the_centre(value):
    loss_fn = DINOLoss(K)
    student, teacher = clean()
    teacher[0, 3] = value
    before = loss_fn.center.clone()
    if value == float("-inf"):
        # exp(-inf) = 0: a legitimate, finite target for the loss; but the official centre would
        # hold -inf for ever, so that centre update is skipped (checked on the column sums).
        assert torch.isfinite(loss_fn(student, teacher))
        assert torch.equal(loss_fn.center, before)
        return
    with pytest.warns(RuntimeWarning, match=r"teacher output \(1 of 8 teacher rows non-finite\)"):
        assert not torch.isfinite(loss_fn(student, teacher))
    assert torch.equal(loss_fn.center, before)
    # ... and every later clean call is finite and moves the centre again.
    student, teacher = clean(1)
    assert torch.isfinite(loss_fn(student, teacher))
    assert torch.isfinite(loss_fn.center).all() and not torch.equal(loss_fn.center, before)


def test_a_bad_student_logit_is_named_and_updates_nothing():
    loss_fn = DINOLoss(K)
    student, teacher = clean()
    student[5, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match="student output"):
        loss = loss_fn(student, teacher)
    assert torch.isnan(loss)
    assert torch.equal(loss_fn.center, torch.zeros(1, K))


def test_manual_centre_skips_a_step_with_one_bad_micro_batch():
    loss_fn = DINOLoss(K, center_update="manual")
    good_student, good_teacher = clean()
    bad_student, bad_teacher = clean(1)
    bad_teacher[2, 2] = float("nan")
    loss_fn(good_student, good_teacher)
    with pytest.warns(RuntimeWarning):
        loss_fn(bad_student, bad_teacher)
    loss_fn.update_center()
    assert torch.equal(loss_fn.center, torch.zeros(1, K))
    assert not bool(loss_fn.nonfinite.found)  # reset for the next optimizer step
    loss_fn(good_student, good_teacher)
    loss_fn.update_center()
    expected = 0.1 * good_teacher.double().mean(0, keepdim=True)
    torch.testing.assert_close(loss_fn.center.double(), expected, rtol=1e-6, atol=1e-7)


def test_raise_at_once_when_asked():
    loss_fn = DINOLoss(K, on_nonfinite="raise")
    student, teacher = clean()
    student[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="student output"):
        loss_fn(student, teacher)
    with pytest.raises(ValueError, match="on_nonfinite='ignore'"):
        DINOLoss(K, on_nonfinite="ignore")


def test_flags_count_rows_and_report_in_one_line():
    flags = NonFiniteFlags()
    probs = torch.softmax(torch.randn(3, 4, K), dim=-1)
    assert not bool(flags.record(torch.tensor(1.0), probs)) and flags.report() is None
    probs[1, 2] = float("nan")
    probs[0, 0] = float("nan")
    assert bool(flags.record(torch.tensor(float("nan")), probs))
    line = flags.report("step 7", kept="the centre, the teacher and the optimizer were")
    assert line == ("non-finite loss at step 7: the teacher output (2 of 24 teacher rows non-finite); "
                    "the centre, the teacher and the optimizer were not updated from it")
    assert int(flags.steps) == 2
    flags.reset()
    assert flags.report() is None


# -- DINO: a non-finite step updates nothing -----------------------------------------------------

def tiny_dino(**kwargs):
    from torch import nn

    from dino_pytorch import DINO

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return DINO(backbone, out_dim=K, hidden_dim=16, bottleneck_dim=8, input_size=(1, 12, 12), **kwargs)


def views(bad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(4, 1, 12, 12, generator=g) for _ in range(2)] + [torch.randn(4, 1, 6, 6, generator=g)]
    if bad:
        v[2][1, 0, 0, 0] = float("nan")  # one local view of one image: only the student sees it
    return v


def snapshot(dino):
    return {k: v.clone() for k, v in dino.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("fused", [False, True])
def test_a_non_finite_step_moves_no_weight_no_centre_no_teacher(fused):
    dino = tiny_dino()
    optimizer = torch.optim.AdamW(dino.param_groups(), lr=0.1, fused=fused)
    before = snapshot(dino)
    with pytest.warns(RuntimeWarning, match="student output"):
        loss = dino(views(bad=True))
    loss.backward()
    dino.optimizer_step(optimizer)
    assert dino.nonfinite_report() is None  # a step is reported once it is closed by update_teacher
    dino.update_teacher()
    assert dino.nonfinite_report() == ("non-finite loss at step 0: the student output (the teacher targets were "
                                       "finite); the centre, the teacher and the optimizer were not updated from it")
    after = snapshot(dino)
    changed = [k for k in before if k != "teacher._extra_state" and not torch.equal(before[k], after[k])]
    assert changed == [] and dino.step == 1  # the schedules still advance
    assert not bool(dino.criterion.nonfinite.found)  # the per-step flags are reset
    optimizer.zero_grad()
    dino(views(seed=1)).backward()
    dino.optimizer_step(optimizer)
    dino.update_teacher()
    moved = snapshot(dino)
    assert "at step 0" in dino.nonfinite_report()  # the first non-finite step stays named
    assert not torch.equal(moved["criterion.center"], after["criterion.center"])
    assert any(not torch.equal(moved[k], after[k]) for k in moved if k.startswith("student."))
    assert any(not torch.equal(moved[k], after[k]) for k in moved if k.startswith("teacher.module."))


def test_koleo_weight_adds_the_mean_of_per_view_koleo():
    from dino_pytorch import KoLeoLoss

    dino = tiny_dino(koleo_weight=0.1)
    v = views()
    loss = dino(v)
    with torch.no_grad():
        student, features = dino.student(v, return_backbone_feats=True)
        teacher = dino.teacher(v[:2])
    plain = tiny_dino()
    plain.load_state_dict(dino.state_dict())
    base = plain.criterion(student, teacher, num_teacher_views=2)
    koleo = (KoLeoLoss()(features[:4]) + KoLeoLoss()(features[4:8])) / 2
    torch.testing.assert_close(loss, base + 0.1 * koleo, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="koleo_weight=-1"):
        tiny_dino(koleo_weight=-1.0)
