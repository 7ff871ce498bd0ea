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
