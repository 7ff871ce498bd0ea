"""DINO with the iBOT option (DINOv2's recipe) on a tiny DINOv2 ViT: it trains, its masks are a pure
function of (seed, step, micro-batch), accumulation equals one batch, resume is bit-identical."""
from __future__ import annotations

import pytest
import torch

from dino_pytorch import DINO
from dino_pytorch.ibot import IBOTConfig, step_masks
from dino_pytorch.models import ConvNet, dinov2_vit_small

B, K, KP = 4, 64, 48


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return dinov2_vit_small(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                            num_register_tokens=2, init_values=1e-5)


def tiny_dino(seed=0, **ibot):
    config = IBOTConfig(out_dim=KP, **ibot)
    dino = DINO(tiny_vit(seed), out_dim=K, hidden_dim=32, bottleneck_dim=16, input_size=(1, 16, 16), ibot=config,
                koleo_weight=0.1)
    return dino, torch.optim.SGD([p for p in dino.parameters() if p.requires_grad], lr=0.1)


def make_views(batch=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 1, 16, 16, generator=g) for _ in range(2)] + [
        torch.randn(batch, 1, 8, 8, generator=g) for _ in range(2)]


def train(dino, opt, steps, views=None, masks=None):
    for _ in range(steps):
        loss = dino(views or make_views(seed=dino.step + 10), masks=masks)
        opt.zero_grad()
        loss.backward()
        dino.optimizer_step(opt)
        dino.update_teacher()
    return loss


def test_trains_with_every_part_and_moves_both_centres():
    dino, opt = tiny_dino(mask_probability=1.0)
    patch_head = [p.clone() for p in dino.teacher.module.patch_head.parameters()]
    train(dino, opt, 3)
    assert set(dino.loss_parts) == {"dino_loss", "ibot_loss", "koleo_loss"}
    assert all(torch.isfinite(v) for v in dino.loss_parts.values())
    assert dino.loss_parts["ibot_loss"] > 0
    assert torch.count_nonzero(dino.criterion.center) and torch.count_nonzero(dino.ibot_loss.center)
    moved = [not torch.equal(a, b) for a, b in zip(patch_head, dino.teacher.module.patch_head.parameters())]
    assert any(moved)  # the teacher's patch head follows the student's by EMA
    assert len(dino.last_layer_parameters()) == 4  # both heads' prototypes (v and g each)


def test_the_loss_is_dino_plus_weighted_ibot():
    dino, _ = tiny_dino(weight=0.5)
    dino.koleo_weight = 0.0
    loss = dino(make_views())
    parts = dino.loss_parts
    assert torch.allclose(loss.detach(), parts["dino_loss"] + 0.5 * parts["ibot_loss"], rtol=1e-6)


def test_masks_are_a_function_of_seed_step_and_micro_batch():
    config = IBOTConfig()
    one = step_masks(config, (4, 4), 6, 2, step=3, micro=1)
    assert one.shape == (12, 16) and one.dtype == torch.bool
    assert torch.equal(one, step_masks(config, (4, 4), 6, 2, step=3, micro=1))
    assert not torch.equal(one, step_masks(config, (4, 4), 6, 2, step=4, micro=1))
    assert not torch.equal(one, step_masks(config, (4, 4), 6, 2, step=3, micro=0))
    # int(N p) crops get a mask target; a target under min_num_patches can draw no block at all.
    assert 0 < int(one.any(-1).sum()) <= int(12 * config.mask_probability)
    # Two ranks of 3 hold the masks of one process of 6, dealt as the sampler deals images.
    ranks = [step_masks(config, (4, 4), 3, 2, step=3, micro=1, rank=r, world_size=2).view(2, 3, 16) for r in (0, 1)]
    interleaved = torch.stack(ranks, dim=2).reshape(2, 6, 16)
    assert torch.equal(interleaved.reshape(12, 16), one)


def test_gradient_accumulation_equals_one_batch():
    views = make_views(2 * B)
    masks = step_masks(IBOTConfig(mask_probability=1.0), (4, 4), 2 * B, 2, step=0, micro=0).view(2, 2 * B, 16)
    big, _ = tiny_dino()
    small, _ = tiny_dino()
    big.koleo_weight = small.koleo_weight = 0.0  # KoLeo's nearest neighbours are per batch by definition
    (big(views, masks=masks.reshape(-1, 16))).backward()
    for half in (slice(0, B), slice(B, 2 * B)):
        (small([v[half] for v in views], masks=masks[:, half].reshape(-1, 16)) / 2).backward()
    for a, b in zip(big.parameters(), small.parameters()):
        if a.grad is not None:  # float32 sums in another order: relative to the gradient's norm
            assert ((a.grad - b.grad).norm() / b.grad.norm().clamp_min(1e-12)).item() <= 1e-5
    big.update_teacher()
    small.update_teacher()
    for a, b in ((big.ibot_loss.center, small.ibot_loss.center), (big.criterion.center, small.criterion.center)):
        assert ((a - b).norm() / b.norm()).item() <= 1e-6


def test_resume_is_bit_identical_masks_included():
    dino, opt = tiny_dino()
    train(dino, opt, 2)
    saved = dino.official_checkpoint(opt, epoch=0)
    saved = {k: (v if not isinstance(v, dict) else {n: t.clone() if torch.is_tensor(t) else t for n, t in v.items()})
             for k, v in saved.items()}
    train(dino, opt, 2)
    resumed, resumed_opt = tiny_dino(seed=5)
    resumed.load_official_checkpoint(saved)
    resumed_opt.load_state_dict(saved["optimizer"])
    train(resumed, resumed_opt, 2)
    for a, b in zip(dino.state_dict().values(), resumed.state_dict().values()):
        if torch.is_tensor(a):
            assert torch.equal(a, b)
    assert torch.equal(dino.ibot_loss.center, resumed.ibot_loss.center)


@pytest.mark.parametrize("call, error, words", [
    (lambda: DINO(ConvNet(in_chans=1, width=4), out_dim=K, input_size=(1, 28, 28), ibot=IBOTConfig()), TypeError,
     ["ibot= needs a ViT", "forward_features(x, masks=None)", "ConvNet"]),
    (lambda: DINO(tiny_vit(), out_dim=K, ibot={"weight": 1.0}), TypeError, ["ibot is a dict"]),
    (lambda: DINO(tiny_vit(), out_dim=K, ibot=IBOTConfig(), fused_head_loss=True), ValueError,
     ["fused_head_loss=True with ibot="]),
    (lambda: IBOTConfig(mask_ratio=(0.5, 0.1)), ValueError, ["mask_ratio=(0.5, 0.1)"]),
    (lambda: IBOTConfig(head="both"), ValueError, ["head='both'"]),
    (lambda: IBOTConfig(mask_probability=1.5), ValueError, ["mask_probability=1.5"]),
])
def test_bad_configuration(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert all(w in str(info.value) for w in words), str(info.value)
