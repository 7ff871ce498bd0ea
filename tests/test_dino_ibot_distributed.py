"""DINO with iBOT under DDP: two gloo processes of B images each train what one process of 2B trains.

The v1 check of tests/test_distributed_equality.py for ``DINO(..., ibot=IBOTConfig(...))`` on a tiny
DINOv2 ViT (registers, layer-scale), through the library alone: the ranks get the images as
:class:`~dino_pytorch.sampler.ResumableSampler` deals them (rank r holds every W-th image of the
global batch), which is how :func:`~dino_pytorch.ibot.step_masks` deals the masks, so every image
meets the same mask in both layouts (dealt in contiguous halves instead, the patch head differs by
tens). With the EMA centre and with Sinkhorn-Knopp (all-reduced), the student, the teacher and both
centres agree to 1e-5 (absolute, or relative for the head's bottleneck biases, which SGD drives to
~100) after a few SGD steps; only the order of float sums differs. Layer-scale starts at 0.1, so
the blocks move too (at DINOv2's 1e-5 the CLS token barely depends on the image at first). KoLeo is
off: its nearest neighbours are per rank by definition (as in DINOv2).
"""
from __future__ import annotations

import pytest
import torch

from dino_pytorch import DINO
from dino_pytorch.ibot import IBOTConfig
from dino_pytorch.models import dinov2_vit_small
from gloo_ranks import results_of_ranks

B, WORLD, STEPS = 4, 2, 3
TOLERANCE = 1e-5
CENTERINGS = ("centering", "sinkhorn_knopp")


def tiny_dino(centering: str) -> DINO:
    torch.manual_seed(0)  # the same initial weights in every process
    backbone = dinov2_vit_small(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                                num_register_tokens=2, init_values=0.1)
    return DINO(backbone, out_dim=64, hidden_dim=32, bottleneck_dim=16, input_size=(1, 16, 16), centering=centering,
                momentum_teacher=0.9, ibot=IBOTConfig(out_dim=48))


def global_views(step: int) -> list[torch.Tensor]:
    """The step's views of all WORLD * B images: two global crops of 16 px, two local ones of 8 px."""
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(WORLD * B, 1, 16, 16, generator=g) for _ in range(2)] + [
        torch.randn(WORLD * B, 1, 8, 8, generator=g) for _ in range(2)]


def train(centering: str, rank: int = 0, world: int = 1) -> dict:
    """STEPS SGD steps on this rank's images (all of them for one process); the final states and the
    loss parts of every step."""
    dino = tiny_dino(centering)
    if world > 1:
        dino.distribute()
    optimizer = torch.optim.SGD([p for p in dino.parameters() if p.requires_grad], lr=0.1)
    parts = []
    for step in range(STEPS):
        views = [v[rank::world] for v in global_views(step)]  # rank r: images r, r + W, ... (the sampler's dealing)
        loss = dino(views)  # the masks: drawn for the global batch, this rank's share
        optimizer.zero_grad()
        loss.backward()
        dino.optimizer_step(optimizer)
        dino.update_teacher()
        parts.append({k: v.item() for k, v in dino.loss_parts.items()})
    return {"student": dino.student.state_dict(), "teacher": dino.teacher.state_dict(),
            "center": dino.criterion.center.clone(), "ibot_center": dino.ibot_loss.center.clone(), "parts": parts}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return results_of_ranks(train, CENTERINGS, WORLD)


@pytest.mark.slow
@pytest.mark.parametrize("centering", CENTERINGS)
def test_two_ranks_of_b_train_what_one_process_of_2b_trains(two_ranks, centering):
    one = train(centering)
    ranks = [results[centering] for results in two_ranks]
    initial = tiny_dino(centering).student.state_dict()
    for part in ("backbone.blocks.", "backbone.register_tokens", "head.", "patch_head."):
        movement = max((one["student"][n] - initial[n]).abs().max().item() for n in initial if n.startswith(part))
        assert movement > 100 * TOLERANCE, f"{part}* barely moved ({movement:.2e}): the comparison would be empty"
    for key in ("student", "teacher"):
        for name, value in one[key].items():
            for rank in ranks:  # DDP keeps the ranks' replicas equal, and equal to the one process
                torch.testing.assert_close(rank[key][name], value, rtol=TOLERANCE, atol=TOLERANCE,
                                           msg=f"{key}.{name}")
    for key in ("center", "ibot_center"):
        assert torch.count_nonzero(one[key]) or centering == "sinkhorn_knopp"  # SK keeps no centre
        for rank in ranks:
            torch.testing.assert_close(rank[key], one[key], rtol=0, atol=TOLERANCE)
    # Each rank's loss is the mean over its images (DINO) and over its 2B crops (iBOT): their mean is the loss of 2B.
    for step in range(STEPS):
        for part in ("dino_loss", "ibot_loss"):
            mean = sum(rank["parts"][step][part] for rank in ranks) / WORLD
            assert mean == pytest.approx(one["parts"][step][part], rel=1e-5, abs=TOLERANCE), (step, part)
