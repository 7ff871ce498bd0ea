"""DINO(head_warmup_steps=N, backbone_lr_scale=F): the backbone frozen bit for bit for N steps while the
heads learn, trained after; the last-layer freeze counted from the warm-up's end; the backbone's lr
scaled in its own optimizer groups; a resume inside and after the warm-up is bit-identical."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dino_pytorch import DINO
from dino_pytorch.models import vit_tiny
from dino_pytorch.optim import build_optimizer, get_params_groups
from dino_pytorch.schedules import DINOSchedules

HEAD = dict(out_dim=16, hidden_dim=12, bottleneck_dim=6)


def make_dino(seed=0, **kwargs):
    torch.manual_seed(seed)
    backbone = vit_tiny(img_size=16, patch_size=4, depth=2, embed_dim=24, num_heads=2)
    return DINO(backbone, **HEAD, input_size=(3, 16, 16), **kwargs)


def views(step, rank=0):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return [torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g),
            torch.randn(2, 3, 8, 8, generator=g)]


def adamw(dino, lr=1e-2, weight_decay=0.04):
    optimizer = build_optimizer("adamw", dino.param_groups())
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        group["weight_decay"] = weight_decay if group.get("regularized", group is optimizer.param_groups[0]) else 0.0
    return optimizer


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(module, state):
    return all(torch.equal(v, state[k]) for k, v in module.state_dict().items())


def train_step(dino, optimizer, step, freeze_steps=0):
    """dino-train's order: backward, last-layer freeze, the step (which drops frozen backbone grads), EMA."""
    loss = dino(views(step))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if dino.last_layer_frozen(freeze_steps):
        dino.cancel_last_layer_gradients_()
    dino.optimizer_step(optimizer)
    dino.update_teacher()


def test_backbone_frozen_bit_for_bit_for_n_steps_then_trained():
    dino = make_dino(head_warmup_steps=3)
    optimizer = adamw(dino)
    start = snapshot(dino.backbone)
    assert same(dino.teacher_backbone, start)
    for step in range(4):
        heads = snapshot(dino.student.head)
        teacher_heads = snapshot(dino.teacher.module.head)
        assert dino.backbone_frozen == (step < 3)
        loss = dino(views(step))
        assert all(p.requires_grad for p in dino.backbone.parameters())  # restored after the forward
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # No graph through the frozen backbone: no gradient was even computed for it.
        assert all((p.grad is None) == (step < 3) for p in dino.backbone.parameters())
        dino.optimizer_step(optimizer)
        dino.update_teacher()
        assert same(dino.backbone, start) == (step < 3)  # trained from the step after the warm-up
        assert same(dino.teacher_backbone, start) == (step < 3)  # the EMA of equal weights
        assert not any(torch.equal(v, heads[k]) for k, v in dino.student.head.state_dict().items()
                       if v.is_floating_point() and k.endswith(("weight", "bias", "original1")))
        assert not same(dino.teacher.module.head, teacher_heads)  # teacher heads by EMA


@pytest.mark.parametrize("loop", ["optimizer.step, set_to_none", "dino.optimizer_step, zeros"])
def test_any_loop_keeps_the_backbone_frozen(loop):
    """A plain optimizer.step() after zero_grad(set_to_none=True) (the backbone has no gradient); stale
    zero gradients (set_to_none=False), which AdamW would decay with, are dropped by dino.optimizer_step."""
    dino = make_dino(head_warmup_steps=2)
    optimizer = adamw(dino)
    start = snapshot(dino.backbone)
    for step in range(2):
        loss = dino(views(step))
        optimizer.zero_grad(set_to_none=loop.endswith("set_to_none"))
        if step == 0 and loop.endswith("zeros"):
            for p in dino.parameters():
                p.grad = torch.zeros_like(p) if p.requires_grad else None
        loss.backward()
        optimizer.step() if loop.startswith("optimizer.step") else dino.optimizer_step(optimizer)
        dino.update_teacher()
        assert same(dino.backbone, start) and same(dino.teacher_backbone, start)


def test_last_layer_freeze_counts_from_the_end_of_the_warm_up():
    warmup, freeze = 3, 2
    dino = make_dino(head_warmup_steps=warmup)
    optimizer = adamw(dino)
    for step in range(7):
        prototypes = [p.detach().clone() for p in dino.last_layer_parameters() if p.requires_grad]
        expected = warmup <= step < warmup + freeze  # the rule, written out
        assert dino.last_layer_frozen(freeze) == expected
        train_step(dino, optimizer, step, freeze)
        moved = [not torch.equal(a, p) for a, p in zip(prototypes, [p for p in dino.last_layer_parameters()
                                                                     if p.requires_grad])]
        assert moved and all(m != expected for m in moved), step  # learn in the warm-up, held after it
    plain = make_dino()  # no warm-up: the official rule, step < freeze_steps
    assert [plain.last_layer_frozen(freeze)] == [True] and plain.head_warmup_steps == 0
    plain.teacher.step = freeze
    assert not plain.last_layer_frozen(freeze)


def test_backbone_lr_scale_in_the_optimizer_groups():
    schedules = DINOSchedules.official(10, lr=0.5, min_lr=0.0, warmup_steps=2, weight_decay=0.04,
                                       weight_decay_end=0.4)
    dino = make_dino(backbone_lr_scale=0.1, schedules=schedules, head_warmup_steps=2)
    optimizer = build_optimizer("adamw", dino.param_groups())
    dino.teacher.step = 5
    values = dino.apply_schedules(optimizer)
    groups = optimizer.param_groups
    names = {id(p): n for n, p in dino.student.named_parameters()}
    backbone = {id(p) for p in dino.backbone.parameters()}
    trainable = [p for p in dino.student.parameters() if p.requires_grad]
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(map(id, trainable))
    for i, group in enumerate(groups):
        in_backbone, plain = i >= 2, i % 2 == 1
        assert all((id(p) in backbone) == in_backbone for p in group["params"])
        assert all((names[id(p)].endswith(".bias") or p.ndim == 1) == plain for p in group["params"])
        assert group["lr"] == pytest.approx(values["lr"] * (0.1 if in_backbone else 1.0), rel=1e-15)
        assert group["weight_decay"] == (0.0 if plain else values["weight_decay"])
    official = make_dino()  # scale 1: the official two groups, untouched
    assert [[id(p) for p in g["params"]] for g in official.param_groups()] == \
        [[id(p) for p in g["params"]] for g in get_params_groups(official.student)]
    assert [set(g) for g in official.param_groups()] == [{"params"}, {"params", "weight_decay"}]


def test_options_are_checked():
    with pytest.raises(ValueError, match=r"head_warmup_steps=-1, expected an int >= 0"):
        make_dino(head_warmup_steps=-1)
    with pytest.raises(ValueError, match="backbone_lr_scale=-0.5"):
        make_dino(backbone_lr_scale=-0.5)
    with pytest.raises(ValueError, match="lr_scale=nan"):
        get_params_groups(torch.nn.Linear(2, 2), lr_scale=float("nan"))


@pytest.mark.parametrize("stop", [2, 4])
def test_resume_inside_and_after_the_warm_up_is_bit_identical(tmp_path, stop):
    total, warmup = 6, 3
    straight = make_dino(head_warmup_steps=warmup, backbone_lr_scale=0.5)
    optimizer = adamw(straight)
    for step in range(total):
        train_step(straight, optimizer, step, freeze_steps=2)
    first = make_dino(head_warmup_steps=warmup, backbone_lr_scale=0.5)
    first_opt = adamw(first)
    for step in range(stop):
        train_step(first, first_opt, step, freeze_steps=2)
    torch.save({"dino": first.state_dict(), "optimizer": first_opt.state_dict()}, tmp_path / "ckpt.pth")
    saved = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    resumed = make_dino(seed=7, head_warmup_steps=warmup, backbone_lr_scale=0.5)  # other init: all from the file
    resumed_opt = adamw(resumed)
    resumed.load_state_dict(saved["dino"])
    resumed_opt.load_state_dict(saved["optimizer"])
    assert resumed.step == stop and resumed.backbone_frozen == (stop < warmup)
    for step in range(stop, total):
        train_step(resumed, resumed_opt, step, freeze_steps=2)
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(v, b[k]) for k, v in a.items() if isinstance(v, torch.Tensor))
    sa, sb = optimizer.state_dict()["state"], resumed_opt.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][e], sb[i][e]) for i in sa for e in sa[i])


# ------------------------------------------------------------------------------------------------- DDP

def ddp_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        dino = make_dino(head_warmup_steps=2).distribute()
        optimizer = adamw(dino)
        start = snapshot(dino.backbone)
        frozen = []
        for step in range(3):
            loss = dino(views(step, rank))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()  # a plain loop: DDP found the frozen backbone unused, its grads stay None
            dino.update_teacher()
            frozen.append(same(dino.backbone, start))
        torch.save({"frozen": frozen, "state": snapshot(dino.student)}, os.path.join(out_dir, f"{rank}.pth"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_warm_up_on_two_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(ddp_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        results = [torch.load(os.path.join(tmp, f"{rank}.pth"), weights_only=True) for rank in range(2)]
    assert [r["frozen"] for r in results] == [[True, True, False]] * 2
    assert all(torch.equal(v, results[1]["state"][k]) for k, v in results[0]["state"].items())  # ranks agree
