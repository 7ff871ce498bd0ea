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
    with pytest.raises(ValueError, match="step=12"):
        teacher.update()


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
