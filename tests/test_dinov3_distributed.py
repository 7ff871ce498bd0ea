"""DINOv3's parts under DDP: with Gram anchoring, and distilling from a frozen teacher, two gloo
processes of B images each train what one process of 2B trains.

tests/test_dino_ibot_distributed.py's check (the images dealt as the sampler deals them, rank r
every W-th image, so each image meets the same iBOT mask in both layouts) for the two DINOv3 options
that add state: the Gram teacher (a snapshot of the EMA teacher taken and refreshed inside the run;
its Gram loss is per image, so a rank's mean over its images averages to the one process's) and the
frozen distillation teacher (never stepped, so it must stay equal to its start on every rank). A
distilled student sees its crops unmasked, so its ViT's ``mask_token`` gets no gradient, as in plain
DINO v1 on a DINOv2 ViT (the third case): DDP must be told to look for unused parameters there, or
its second step fails. The student, the EMA teacher, the centres and the snapshot agree to 1e-5
after a few SGD steps; only the order of float sums differs.
"""
from __future__ import annotations

import pytest
import torch

from dino_pytorch import DINO, GramAnchor
from dino_pytorch.ibot import IBOTConfig
from dino_pytorch.models import dinov2_vit_small
from gloo_ranks import results_of_ranks

B, WORLD, STEPS = 4, 2, 3
TOLERANCE = 1e-5
CASES = ("gram", "distill", "v1")


def tiny_vit(width: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # the same initial weights in every process
    return dinov2_vit_small(img_size=16, patch_size=4, in_chans=1, embed_dim=width, depth=2, num_heads=2,
                            num_register_tokens=2, init_values=0.1)


def tiny_dino(case: str) -> DINO:
    """Gram anchoring from step 1, refreshed every step; a width-32 student of a width-48 teacher; or
    DINO v1 alone."""
    options = dict(hidden_dim=32, bottleneck_dim=16, input_size=(1, 16, 16), momentum_teacher=0.9,
                   ibot=None if case == "v1" else IBOTConfig(out_dim=48))
    if case == "v1":
        return DINO(tiny_vit(32, 0), out_dim=64, **options)
    if case == "gram":
        return DINO(tiny_vit(32, 0), out_dim=64, gram=GramAnchor(start_step=1, refresh_every=1), **options)
    teacher = DINO(tiny_vit(48, 1), out_dim=64, **options)
    return DINO(tiny_vit(32, 0), teacher=teacher, **options)


def global_views(step: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The step's views of all WORLD * B images (two global crops of 16 px, two local of 8) and the
    Gram teacher's two crops of 32 px."""
    g = torch.Generator().manual_seed(100 + step)
    views = [torch.randn(WORLD * B, 1, 16, 16, generator=g) for _ in range(2)] + [
        torch.randn(WORLD * B, 1, 8, 8, generator=g) for _ in range(2)]
    return views, [torch.randn(WORLD * B, 1, 32, 32, generator=g) for _ in range(2)]


def train(case: str, rank: int = 0, world: int = 1) -> dict:
    """STEPS SGD steps on this rank's images (all of them for one process): the final states."""
    dino = tiny_dino(case)
    if world > 1:
        dino.distribute()
    optimizer = torch.optim.SGD([p for p in dino.parameters() if p.requires_grad], lr=0.1)
    for step in range(STEPS):
        views, gram_views = global_views(step)
        views = [v[rank::world] for v in views]  # rank r: images r, r + W, ... (the sampler's dealing)
        gram_views = [v[rank::world] for v in gram_views] if case == "gram" else None
        loss = dino(views, gram_views=gram_views)
        optimizer.zero_grad()
        loss.backward()
        dino.optimizer_step(optimizer)
        dino.update_teacher()
    states = {"student": dino.student.state_dict(), "teacher": dino.teacher.state_dict(),
              "center": {"dino": dino.criterion.center.clone()}}
    if case != "v1":
        states["center"]["ibot"] = dino.ibot_loss.center.clone()
    if case == "gram":
        states["gram_teacher"] = dino.gram_teacher.state_dict()
    if case == "distill":
        states["distill_teacher"] = dino.distill_teacher.state_dict()
    return states


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return results_of_ranks(train, CASES, WORLD)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_two_ranks_of_b_train_what_one_process_of_2b_trains(two_ranks, case):
    one = train(case)
    initial = tiny_dino(case)
    movement = max((one["student"][n] - v).abs().max().item() for n, v in initial.student.state_dict().items())
    assert movement > 100 * TOLERANCE, f"the student barely moved ({movement:.2e}): the comparison would be empty"
    if case == "gram":  # refreshed after the first steps: the snapshot is a moved EMA teacher, not the start
        start = initial.teacher_backbone.state_dict()
        assert any(not torch.equal(v, start[n.removeprefix("backbone.")])
                   for n, v in one["gram_teacher"].items() if n.removeprefix("backbone.") in start)
    if case == "distill":  # the frozen teacher is where it started, in every layout
        for name, value in initial.distill_teacher.state_dict().items():
            assert torch.equal(one["distill_teacher"][name], value), name
    for key in one:
        for name, value in one[key].items():
            for rank in two_ranks:
                torch.testing.assert_close(rank[case][key][name], value, rtol=TOLERANCE, atol=TOLERANCE,
                                           msg=f"{case}: {key}.{name}")
