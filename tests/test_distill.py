"""Distillation from a frozen teacher (DINO(teacher=), DINOv3): the teacher stays bit-identical, its
own heads give the targets, the student sees unmasked crops, the EMA is of the student, a ConvNet
student learns from a ViT teacher, the checkpoint path rebuilds the teacher, and the errors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dino_pytorch import DINO
from dino_pytorch.distill import FrozenTeacher, teacher_from_checkpoint
from dino_pytorch.ibot import IBOTConfig
from dino_pytorch.model_config import make_model_config
from dino_pytorch.models import ConvNet, dinov2_vit_small

B, K, KP = 4, 64, 48
VIT = dict(img_size=16, patch_size=4, in_chans=1, num_heads=2, depth=1)


def vit(width, seed):
    torch.manual_seed(seed)
    return dinov2_vit_small(embed_dim=width, **VIT)


def trained_teacher(ibot=True, steps=2):
    """A DINO of width 32 trained a few steps: BatchNorm in its heads, centres moved."""
    dino = DINO(vit(32, 0), out_dim=K, hidden_dim=32, bottleneck_dim=16, use_bn=True, input_size=(1, 16, 16),
                ibot=IBOTConfig(out_dim=KP) if ibot else None)
    train(dino, steps)
    return dino


def student(teacher, width=16, seed=1, ibot=True, **options):
    return DINO(vit(width, seed), hidden_dim=24, bottleneck_dim=8, input_size=(1, 16, 16), teacher=teacher,
                ibot=IBOTConfig() if ibot else None, **options)


def views(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 1, 16, 16, generator=g) for _ in range(2)] + [
        torch.randn(B, 1, 8, 8, generator=g) for _ in range(2)]


def train(dino, steps, fixed=None, masks=None):
    opt = getattr(dino, "_test_opt", None) or torch.optim.SGD([p for p in dino.parameters() if p.requires_grad],
                                                              lr=0.05)
    dino._test_opt = opt
    losses = []
    for _ in range(steps):
        loss = dino(fixed or views(100 + dino.step), masks=masks)
        opt.zero_grad()
        loss.backward()
        dino.optimizer_step(opt)
        dino.update_teacher()
        losses.append(loss.item())
    return losses


def test_the_teacher_stays_bit_identical_and_the_ema_follows_the_student():
    teacher = trained_teacher()
    distilled = student(teacher, momentum_teacher=0.5)
    frozen = {k: v.clone() for k, v in distilled.distill_teacher.module.state_dict().items()}
    assert all(torch.equal(frozen[k], v) for k, v in teacher.teacher.module.state_dict().items())
    assert distilled.distill_teacher.module is not teacher.teacher.module  # a copy: the caller's stays theirs
    assert not any(p.requires_grad for p in distilled.distill_teacher.parameters())
    before = [p.clone() for p in distilled.teacher.module.parameters()]
    train(distilled, 3)
    # BatchNorm running statistics included: the teacher ran in eval mode though the DINO is in train mode.
    assert all(torch.equal(frozen[k], v) for k, v in distilled.distill_teacher.module.state_dict().items())
    assert distilled.distill_teacher.module.training is False and distilled.training is True
    ema = copy.deepcopy(distilled.teacher.module)
    distilled.update_teacher(momentum=0.5)
    for e, t, s in zip(ema.parameters(), distilled.teacher.module.parameters(), distilled.student.parameters()):
        torch.testing.assert_close(t, 0.5 * e + 0.5 * s, rtol=0, atol=1e-6)  # EMA of the student
    assert any(not torch.equal(a, b) for a, b in zip(before, distilled.teacher.module.parameters()))
    assert distilled.teacher_backbone is distilled.teacher.module.backbone  # what evaluation reads


def _ce(student_logits, teacher_probs):
    return -(teacher_probs * F.log_softmax(student_logits / 0.1, dim=-1)).sum(-1)


def test_the_loss_is_dino_and_ibot_against_the_frozen_teachers_heads():
    """Float64 from the formula: teacher probabilities softmax(t / 0.04) (centres 0 at the start), the
    student's logits of the UNMASKED crops; DINO over the view pairs, iBOT over masked patches / 2B."""
    teacher = trained_teacher()
    distilled = student(teacher).double()
    v = [x.double() for x in views(7)]
    masks = torch.zeros(2 * B, 16, dtype=torch.bool)
    masks[0, :5] = masks[3, 4:12] = masks[6, 1] = True
    loss = distilled(v, masks=masks)
    index = masks.flatten().nonzero().squeeze(1)
    with torch.no_grad():
        t_out, t_patch = distilled.distill_teacher.module(v[:2], 2, index)
        s_out, s_patch = distilled.student(v, 2, index, masks=None)
    t_probs = F.softmax(t_out / 0.04, dim=-1).chunk(2)
    s_views = s_out.chunk(4)
    pairs = [_ce(s_views[j], t_probs[i]).mean() for i in range(2) for j in range(4) if i != j]
    dino = torch.stack(pairs).mean()
    per_patch = _ce(s_patch, F.softmax(t_patch / 0.04, dim=-1))
    weight = (1.0 / masks.sum(1).clamp(min=1)).repeat_interleave(masks.sum(1))
    ibot = (per_patch * weight).sum() / (2 * B)
    # The losses return float32 (DINOLoss's contract), hence float32 tolerances.
    torch.testing.assert_close(distilled.loss_parts["dino_loss"].double(), dino, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(distilled.loss_parts["ibot_loss"].double(), ibot, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss.double(), dino + ibot, rtol=1e-6, atol=1e-6)
    masked_student = distilled.student(v, 2, index, masks=masks)[1]
    assert not torch.allclose(masked_student, s_patch)  # the masks would have changed the student's patches


def test_a_convnet_student_learns_from_a_vit_teacher():
    teacher = trained_teacher()  # iBOT-trained: a student without the patch loss takes its DINO head only
    torch.manual_seed(3)
    distilled = DINO(ConvNet(in_chans=1, width=8, stages=2), hidden_dim=24, bottleneck_dim=8,
                     input_size=(1, 16, 16), teacher=teacher, koleo_weight=0.1)
    assert distilled.student.head.out_dim == K and set(distilled.loss_parts) == set()
    frozen = {k: v.clone() for k, v in distilled.distill_teacher.module.state_dict().items()}
    fixed = views(5)
    losses = train(distilled, 12, fixed=fixed)
    assert set(distilled.loss_parts) == {"dino_loss", "koleo_loss"}
    assert losses[-1] < losses[0] - 0.1, losses  # it fits the teacher's targets of a fixed batch
    assert all(torch.equal(frozen[k], v) for k, v in distilled.distill_teacher.module.state_dict().items())


def test_state_dict_resume_is_bit_identical():
    teacher = trained_teacher()
    whole = student(teacher)
    train(whole, 4)
    first = student(teacher)
    train(first, 2)
    state = copy.deepcopy(first.state_dict())
    opt_state = copy.deepcopy(first._test_opt.state_dict())
    resumed = student(trained_teacher(steps=1))  # another teacher: the state brings the right one back
    resumed.load_state_dict(state)
    train(resumed, 0)
    resumed._test_opt.load_state_dict(opt_state)
    train(resumed, 2)
    expected, got = whole.state_dict(), resumed.state_dict()
    assert list(expected) == list(got)
    for key, value in expected.items():
        assert torch.equal(value, got[key]) if torch.is_tensor(value) else value == got[key], key


@pytest.mark.parametrize("ibot", [True, False])
def test_teacher_from_a_dino_train_checkpoint(tmp_path, ibot):
    teacher = trained_teacher(ibot=ibot)
    head = dict(in_dim=32, out_dim=K, use_bn=True, norm_last_layer=True, nlayers=3, hidden_dim=32,
                bottleneck_dim=16)
    checkpoint = teacher.official_checkpoint(teacher._test_opt, epoch=1)
    checkpoint["model_config"] = make_model_config("dinov2_vit_small", dict(embed_dim=32, **VIT), head=head,
                                                   data={"in_chans": 1})
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    frozen = teacher_from_checkpoint(tmp_path / "checkpoint.pth")
    assert isinstance(frozen, FrozenTeacher) and frozen.out_dim == K
    assert frozen.patch_out_dim == (KP if ibot else None)
    v = views(9)[:2]
    expected = teacher.teacher.module.eval()
    got = frozen(v)
    want = expected(v, 2, torch.zeros(0, dtype=torch.long))[0] if ibot else expected(v)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    distilled = student(frozen, ibot=ibot)
    assert distilled.student.head.out_dim == K
    if ibot:
        assert distilled.student.patch_head.out_dim == KP


def test_mismatches_are_one_line_errors():
    teacher = trained_teacher()
    with pytest.raises(ValueError, match=r"out_dim=10 with a teacher of 64 prototypes"):
        student(teacher, out_dim=10)
    with pytest.raises(ValueError, match=r"ibot.out_dim=7 with a teacher patch head of 48"):
        DINO(vit(16, 1), input_size=(1, 16, 16), teacher=teacher, ibot=IBOTConfig(out_dim=7))
    with pytest.raises(ValueError, match=r"patch_size 2 differs from the teacher's 4"):
        DINO(dinov2_vit_small(embed_dim=16, **{**VIT, "patch_size": 2}), input_size=(1, 16, 16), teacher=teacher,
             ibot=IBOTConfig())
    with pytest.raises(ValueError, match=r"ibot= with a teacher that has no patch head"):
        student(trained_teacher(ibot=False))
    with pytest.raises(TypeError, match=r"teacher is a Linear, expected a trained DINO"):
        student(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"strategy='fsdp' with a distillation teacher"):
        student(teacher).distribute(strategy="fsdp")


def test_the_fingerprint_names_the_weights_in_any_dtype():
    """Equal for copies, different when one value, one name or the dtype differs; stable while training."""
    teacher = trained_teacher(ibot=False, steps=0)
    first = FrozenTeacher(copy.deepcopy(teacher.teacher.module))
    assert first.fingerprint() == FrozenTeacher(copy.deepcopy(teacher.teacher.module)).fingerprint()
    changed = copy.deepcopy(teacher.teacher.module)
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-6
    assert FrozenTeacher(changed).fingerprint() != first.fingerprint()
    as_bf16 = FrozenTeacher(copy.deepcopy(teacher.teacher.module).to(torch.bfloat16))
    assert as_bf16.fingerprint() not in (first.fingerprint(), None)
    dino = student(teacher, ibot=False)
    before = dino.distill_teacher.fingerprint()
    train(dino, 2)
    del dino.distill_teacher._fingerprint  # recomputed from the weights after training: the same
    assert dino.distill_teacher.fingerprint() == before == first.fingerprint()
