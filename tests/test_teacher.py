import copy

import pytest
import torch
from torch import nn

from dino_pytorch import EMATeacher
from dino_pytorch.schedules import cosine_scheduler


def student_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))


def test_frozen_copy_with_own_parameters():
    student = student_net()
    teacher = EMATeacher(student)
    params = list(teacher.parameters())
    assert len(params) == len(list(student.parameters()))
    assert all(not p.requires_grad for p in params)
    assert all(p is not q for p, q in zip(params, student.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(params, student.parameters()))
    assert all(p.requires_grad for p in student.parameters())  # the student is untouched


def test_update_is_k_m_plus_one_minus_m_q():
    student = student_net()
    teacher = EMATeacher(student)
    perturb(student)
    before = [p.clone().double() for p in teacher.parameters()]
    used = teacher.update(momentum=0.9)
    assert used == 0.9
    for k, k0, q in zip(teacher.parameters(), before, student.parameters()):
        expected = k0 * 0.9 + (1 - 0.9) * q.double()
        assert (k.double() - expected).abs().max() <= 1e-6


def test_default_momentum_follows_official_cosine_per_step():
    student = student_net()
    teacher = EMATeacher(student, momentum=0.996, total_steps=12)
    schedule = cosine_scheduler(0.996, 1.0, 3, 4)
    used = [teacher.update() for _ in range(12)]
    assert used == pytest.approx(list(schedule), abs=1e-15)
    # Past the schedule the last value holds (a resumed or extended run does not fail).
    assert teacher.update() == teacher.update() == pytest.approx(schedule[-1], abs=1e-15)
    assert teacher.step == 14


def test_a_skipped_step_leaves_the_teacher_unchanged_without_reading_the_flag():
    student = student_net()
    teacher = EMATeacher(student, momentum=0.5, buffers="copy")
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [t.clone() for t in teacher.module.state_dict().values()]
    teacher.update(skip=torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.module.state_dict().values()))
    params_before = [t.clone() for t in teacher.module.parameters()]
    teacher.update(skip=torch.tensor(False))
    for t, s, b in zip(teacher.module.parameters(), student.parameters(), params_before):
        torch.testing.assert_close(t, 0.5 * b + 0.5 * s)
    assert teacher.step == 2


def test_constant_momentum_without_schedule():
    teacher = EMATeacher(student_net(), momentum=0.99)
    assert [teacher.update() for _ in range(3)] == [0.99, 0.99, 0.99]


def test_forward_runs_without_grad():
    student = student_net()
    teacher = EMATeacher(student)
    out = teacher(torch.randn(4, 8))
    assert not out.requires_grad


def test_buffer_modes():
    student = student_net()
    student.train()
    keep, copy_, ema = (EMATeacher(student, buffers=m) for m in ("keep", "copy", "ema"))
    student(torch.randn(32, 8) * 3 + 1)  # moves the student's BN running stats
    for t in (keep, copy_, ema):
        t.update(momentum=0.5)
    s_mean = student[1].running_mean
    assert torch.count_nonzero(keep.module[1].running_mean) == 0
    assert torch.equal(copy_.module[1].running_mean, s_mean)
    assert torch.allclose(ema.module[1].running_mean, 0.5 * s_mean)
    assert ema.module[1].num_batches_tracked == student[1].num_batches_tracked  # ints are copied


def test_step_survives_state_dict_round_trip():
    teacher = EMATeacher(student_net(), total_steps=10)
    for _ in range(3):
        teacher.update()
    other = EMATeacher(student_net(), total_steps=10)
    other.load_state_dict(teacher.state_dict())
    assert other.step == 3


def test_groups_mixed_dtypes():
    student = student_net()
    student[3].to(torch.float64)
    teacher = EMATeacher(student)
    perturb(student)
    teacher.update(momentum=0.0)
    assert all(torch.equal(k, q) for k, q in zip(teacher.parameters(), student.parameters()))


@pytest.mark.parametrize("kwargs, words", [
    ({"momentum": 1.5}, "momentum=1.5"),
    ({"momentum": -0.1}, "momentum=-0.1"),
    ({"final_momentum": float("nan")}, "final_momentum=nan"),
    ({"total_steps": 0}, "total_steps=0"),
    ({"buffers": "avg"}, "buffers='avg'"),
])
def test_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        EMATeacher(student_net(), **kwargs)


def test_bad_update_arguments():
    teacher = EMATeacher(student_net())
    with pytest.raises(ValueError, match="momentum=2"):
        teacher.update(momentum=2)
    with pytest.raises(ValueError, match="architecture"):
        teacher.update(nn.Linear(3, 3))
    with pytest.raises(TypeError, match="nn.Module"):
        EMATeacher("student")


def test_teacher_copy_has_no_drop_path():
    class DropPath(nn.Module):
        def __init__(self, p):
            super().__init__()
            self.drop_prob = p

        def forward(self, x):
            return x

    student = nn.Sequential(nn.Linear(2, 2), DropPath(0.1))
    assert EMATeacher(student).module[1].drop_prob == 0.0
    assert student[1].drop_prob == 0.1
    assert EMATeacher(student, disable_drop_path=False).module[1].drop_prob == 0.1


def test_student_cast_to_bfloat16_still_updates_float32_teacher():
    student = student_net()
    teacher = EMATeacher(student)
    student.to(torch.bfloat16)
    teacher.update(momentum=0.0)
    for k, q in zip(teacher.parameters(), student.parameters()):
        assert k.dtype == torch.float32 and torch.equal(k, q.float())


def _expected_after_update(teacher, student, m):
    pairs = zip(teacher.parameters(), student.parameters())
    return [t.detach().clone().double() * m + (1 - m) * s.detach().double() for t, s in pairs]


def _assert_updated(teacher, expected):
    for t, e in zip(teacher.parameters(), expected):
        assert (t.double() - e).abs().max() <= 1e-6


def test_cached_pairing_sees_replaced_parameters_and_modules():
    student = student_net()
    teacher = EMATeacher(student)
    teacher.update(momentum=0.9)  # builds the cached plan
    # 1. A parameter replaced by a new object: the update must average the new one.
    student[0].weight = nn.Parameter(torch.randn(16, 8))
    expected = _expected_after_update(teacher, student, 0.9)
    teacher.update(momentum=0.9)
    _assert_updated(teacher, expected)
    # 2. A submodule replaced.
    student[3] = nn.Linear(16, 4)
    expected = _expected_after_update(teacher, student, 0.8)
    teacher.update(momentum=0.8)
    _assert_updated(teacher, expected)
    # 3. load_state_dict copies into the same tensors: still right without a rebuild.
    other = student_net()
    perturb(other)
    student.load_state_dict(other.state_dict())
    expected = _expected_after_update(teacher, student, 0.7)
    teacher.update(momentum=0.7)
    _assert_updated(teacher, expected)
    # 4. .data reassigned (new storage, other dtype) on the same Parameter object.
    student[0].bias.data = torch.randn(16, dtype=torch.float64)
    expected = _expected_after_update(teacher, student, 0.6)
    teacher.update(momentum=0.6)
    _assert_updated(teacher, expected)
    # 5. The teacher's own parameter replaced (e.g. by user code): the new one is updated.
    teacher.module[0].bias = nn.Parameter(torch.zeros(16), requires_grad=False)
    expected = _expected_after_update(teacher, student, 0.5)
    teacher.update(momentum=0.5)
    _assert_updated(teacher, expected)


def test_cached_pairing_is_reused_and_a_new_student_rebuilds_it():
    student = student_net()
    teacher = EMATeacher(student)
    teacher.update(momentum=0.9)
    plan = teacher._plan
    teacher.update(momentum=0.9)
    assert teacher._plan is plan  # nothing changed: no re-pairing
    other = copy.deepcopy(student)
    perturb(other)
    expected = _expected_after_update(teacher, other, 0.9)
    teacher.update(other, momentum=0.9)
    assert teacher._plan is not plan
    _assert_updated(teacher, expected)
