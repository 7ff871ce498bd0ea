"""The official recipe as DINO helpers (what dino-train is built from): schedules, optimizer groups,
clipping, the last-layer freeze, resume state, mixed precision, and self-describing checkpoints."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from dino_pytorch import DINO
from dino_pytorch.checkpoint import CheckpointError
from dino_pytorch.model_config import make_model_config, read_model_config
from dino_pytorch.optim import build_optimizer
from dino_pytorch.precision import autocast, grad_scaler
from dino_pytorch.schedules import DINOSchedules
from reference import official_cosine_scheduler

K = 64


def make(schedules=None, seed=0):
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return DINO(backbone, out_dim=K, hidden_dim=16, bottleneck_dim=8, input_size=(1, 12, 12), schedules=schedules)


def views(step, batch=4):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(batch, 1, 12, 12, generator=g) for _ in range(2)] + [torch.randn(batch, 1, 6, 6, generator=g)]


def train_steps(dino, optimizer, first, last, clip=3.0, freeze_until=1):
    for step in range(first, last):
        dino.apply_schedules(optimizer)
        optimizer.zero_grad(set_to_none=True)
        dino(views(step)).backward()
        dino.clip_gradients_(clip)
        if step < freeze_until:
            dino.cancel_last_layer_gradients_()
        optimizer.step()
        dino.update_teacher()


EPS = float(np.finfo(np.float64).eps)


@pytest.mark.parametrize("epochs,niter,warmup_epochs", [(10, 7, 2), (3, 5, 0), (4, 1, 4)])
def test_schedules_equal_the_official_arrays(epochs, niter, warmup_epochs):
    s = DINOSchedules.official(epochs * niter, lr=5e-4, min_lr=1e-6, warmup_steps=warmup_epochs * niter,
                               weight_decay=0.04, weight_decay_end=0.4, momentum_teacher=0.996)
    for got, (base, final, warmup) in ((s.lr, (5e-4, 1e-6, warmup_epochs)), (s.weight_decay, (0.04, 0.4, 0)),
                                       (s.momentum, (0.996, 1.0, 0))):
        expected = np.array(official_cosine_scheduler(base, final, epochs, niter, warmup))
        assert got.shape == expected.shape
        w = warmup * niter
        # The warm-up is start + i * step on both sides: IEEE rounds a multiply and an add alike on any CPU.
        np.testing.assert_array_equal(got[:w], expected[:w])
        # The cosine is np.cos (numpy's SIMD kernels, which differ per CPU and build) against math.cos
        # (libm), each within a few ULP of cos, an error the schedule scales by (base - final) / 2:
        # 8 ULP of that plus 4 of the value. A step off by one would move the middle of the curve by
        # (base - final) * pi / (2 * steps), 10^13 times that here.
        np.testing.assert_allclose(got[w:], expected[w:], rtol=4 * EPS, atol=8 * EPS * abs(base - final))
    assert s.total_steps == epochs * niter
    # Past the end, the final values hold.
    assert s.at(10**6) == s.at(epochs * niter - 1)
    assert all(type(v) is float for v in s.at(0).values())


def test_schedules_reject_bad_values():
    with pytest.raises(ValueError, match="total_steps=0"):
        DINOSchedules.official(0, lr=1e-3)
    with pytest.raises(ValueError, match="momentum_teacher=1.5"):
        DINOSchedules.official(5, lr=1e-3, momentum_teacher=1.5)
    with pytest.raises(ValueError, match="lengths"):
        DINOSchedules(np.ones(3), np.ones(3), np.ones(2))


def test_apply_schedules_and_update_teacher_follow_the_arrays():
    schedules = DINOSchedules.official(6, lr=0.1, warmup_steps=2, momentum_teacher=0.9)
    dino = make(schedules)
    optimizer = build_optimizer("sgd", dino.param_groups())
    for step in range(6):
        values = dino.apply_schedules(optimizer)
        assert values == schedules.at(step) and dino.step == step
        assert [g["lr"] for g in optimizer.param_groups] == [schedules.lr[step]] * 2
        assert optimizer.param_groups[0]["weight_decay"] == schedules.weight_decay[step]
        assert optimizer.param_groups[1]["weight_decay"] == 0.0  # biases and 1-D: never decayed
        teacher = [p.clone() for p in dino.teacher.parameters()]
        student = [p.detach().clone() for p in dino.student.parameters()]
        assert dino.update_teacher() == schedules.momentum[step]
        m = schedules.momentum[step]
        for t0, s0, t1 in zip(teacher, student, dino.teacher.parameters()):
            torch.testing.assert_close(t1, m * t0 + (1 - m) * s0, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="schedules=None"):
        make().apply_schedules(optimizer)


def test_clip_and_freeze_act_on_the_student():
    dino = make()
    dino(views(0)).backward()
    norms = [p.grad.norm() for p in dino.student.parameters() if p.grad is not None]
    dino.clip_gradients_(1e-3)
    for p, n in zip([p for p in dino.student.parameters() if p.grad is not None], norms):
        expected = min(1.0, 1e-3 / (n.item() + 1e-6)) * n.item()  # official: each parameter on its own
        assert p.grad.norm().item() == pytest.approx(expected, rel=1e-5)
    last = dino.last_layer_parameters()
    assert any(p.grad is not None for p in last)
    dino.cancel_last_layer_gradients_()
    assert all(p.grad is None for p in last)
    assert any(p.grad is not None for p in dino.student.parameters())


def test_resume_from_state_dict_or_official_checkpoint_is_exact():
    schedules = DINOSchedules.official(8, lr=0.05, warmup_steps=2, momentum_teacher=0.9)
    straight = make(schedules)
    optimizer = build_optimizer("adamw", straight.param_groups())
    train_steps(straight, optimizer, 0, 8)

    for how in ("state_dict", "official"):
        first = make(schedules)
        opt = build_optimizer("adamw", first.param_groups())
        train_steps(first, opt, 0, 4)
        saved = copy.deepcopy(first.state_dict() if how == "state_dict" else first.official_checkpoint(opt, 0))
        saved_opt = copy.deepcopy(opt.state_dict())
        resumed = make(schedules, seed=123)  # other initial weights: all must come from the file
        if how == "state_dict":
            resumed.load_state_dict(saved)
        else:
            resumed.load_official_checkpoint(saved)
        assert resumed.step == 4
        opt2 = build_optimizer("adamw", resumed.param_groups())
        opt2.load_state_dict(saved_opt)
        train_steps(resumed, opt2, 4, 8)
        for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b), how


def test_state_dict_layout_is_unchanged():
    # The layout DINO state_dicts had before the training helpers: they still load.
    keys = make().state_dict().keys()
    assert {k.split(".")[0] for k in keys} == {"student", "teacher", "criterion"}
    assert "teacher._extra_state" in keys and "criterion.center" in keys
    assert not [k for k in keys if k.startswith("criterion.") and k != "criterion.center"]


def test_collapse_metrics_of_the_last_forward():
    dino = make()
    with pytest.raises(RuntimeError, match="forward first"):
        dino.collapse_metrics()
    dino(views(0))
    metrics = dino.collapse_metrics()
    with torch.no_grad():
        teacher = dino.teacher(views(0)[:2]).double()
    probs = torch.softmax((teacher - dino.criterion.center.double()) / dino.criterion.teacher_temp, dim=-1)
    entropy = -(probs * probs.log()).sum(-1).mean()
    torch.testing.assert_close(metrics["teacher_entropy"].double(), entropy, rtol=1e-4, atol=1e-5)


def test_precision_helpers():
    assert grad_scaler("fp32", "cpu") is None and grad_scaler("bf16", "cpu") is None
    assert isinstance(grad_scaler("fp16", "cpu"), torch.amp.GradScaler)
    x = torch.randn(4, 4)
    with autocast("bf16", "cpu"):
        assert (x @ x).dtype == torch.bfloat16
    with autocast("fp32", "cpu"):
        assert (x @ x).dtype == torch.float32
    with pytest.raises(ValueError, match="precision='fp8'"):
        autocast("fp8", "cpu")


def test_model_config_round_trip_and_refusals():
    config = make_model_config("vit_tiny", {"patch_size": 4, "img_size": (28, 28)}, head={"out_dim": 8},
                               data={"dataset": "fashion_mnist", "mean": (0.3,)})
    assert read_model_config({"model_config": config}) == config
    assert config["backbone_kwargs"]["img_size"] == [28, 28]
    assert read_model_config({"student": {}}) is None  # official files and ours before 0.2
    with pytest.raises(CheckpointError, match="schema_version=2.*newer"):
        read_model_config({"model_config": {**config, "schema_version": 2}}, "x.pth")
    with pytest.raises(CheckpointError, match="malformed"):
        read_model_config({"model_config": {"schema_version": 1}}, "x.pth")
    with pytest.raises(TypeError, match="plain value"):
        make_model_config("convnet", {"act": nn.ReLU})
