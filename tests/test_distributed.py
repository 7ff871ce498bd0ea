"""Two gloo processes on one machine: the centre (and Sinkhorn-Knopp) see the union of all rows."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dino_pytorch import DINOLoss
from dino_pytorch.losses import sinkhorn_knopp

K = 33
BATCHES = (3, 5)  # unequal per-rank batch sizes


def rank_data(rank):
    g = torch.Generator().manual_seed(100 + rank)
    b = BATCHES[rank]
    return torch.randn(4 * b, K, generator=g), torch.randn(2 * b, K, generator=g)


def worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        student, teacher = rank_data(rank)
        loss_fn = DINOLoss(K, ncrops=4)
        loss_fn(student, teacher)
        q = sinkhorn_knopp(teacher, 0.1)
        torch.save({"center": loss_fn.center, "sk": q}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def on_two_ranks(target, name):
    """Run ``target(rank, 2, init_file, out_dir)`` on 2 gloo processes; what each saved as ``{name}{rank}.pt``."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(target, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        return [torch.load(os.path.join(tmp, f"{name}{r}.pt")) for r in range(2)]


@pytest.mark.slow
def test_center_is_mean_over_union_of_ranks_with_unequal_batches():
    results = on_two_ranks(worker, "rank")
    teachers = [rank_data(r)[1] for r in range(2)]
    union = torch.cat(teachers)
    expected = 0.1 * union.double().mean(dim=0, keepdim=True)  # 0.9 * 0 + 0.1 * mean
    for r in range(2):
        assert torch.allclose(results[r]["center"].double(), expected, rtol=1e-6, atol=1e-8)
    # Sinkhorn-Knopp over both ranks equals one process on the union of the rows.
    single = sinkhorn_knopp(union, 0.1)
    both = torch.cat([results[0]["sk"], results[1]["sk"]])
    assert torch.allclose(both, single, rtol=1e-5, atol=1e-7)


def test_no_process_group_needed():
    assert not dist.is_initialized()
    loss_fn = DINOLoss(K, ncrops=4)
    student, teacher = rank_data(0)
    assert torch.isfinite(loss_fn(student, teacher))


def nonfinite_worker(rank, world, init_file, out_dir):
    from torch import nn

    from dino_pytorch import DINO

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        backbone = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        dino = DINO(backbone, out_dim=K, hidden_dim=16, bottleneck_dim=8, input_size=(1, 12, 12)).distribute()
        optimizer = torch.optim.AdamW(dino.param_groups(), lr=0.1)
        states, reports = [], []
        for step in range(2):
            g = torch.Generator().manual_seed(10 * step + rank)
            views = [torch.randn(4, 1, 12, 12, generator=g) for _ in range(2)] + [torch.randn(4, 1, 6, 6, generator=g)]
            if step == 1 and rank == 1:
                views[2][0, 0, 0, 0] = float("nan")  # only rank 1's student sees it
            optimizer.zero_grad()
            dino(views).backward()
            dino.optimizer_step(optimizer)
            dino.update_teacher()
            states.append({k: v.clone() for k, v in dino.state_dict().items() if isinstance(v, torch.Tensor)})
            reports.append(dino.nonfinite_report())
        torch.save({"states": states, "reports": reports}, os.path.join(out_dir, f"nonfinite{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_is_skipped_and_reported_on_every_rank():
    # Rank 0's loss is finite but its gradients are all-reduced with rank 1's NaN ones: both ranks
    # must skip the step (no weight, teacher or centre moves) and name the same step, or the ranks
    # part ways (and one stopping alone leaves the other waiting in a collective).
    results = on_two_ranks(nonfinite_worker, "nonfinite")
    for r in range(2):
        first, second = results[r]["states"]
        assert results[r]["reports"][0] is None
        assert "non-finite loss at step 1" in results[r]["reports"][1]
        changed = [k for k in first if k != "teacher._extra_state" and not torch.equal(first[k], second[k])]
        assert changed == [], f"rank {r} moved {changed}"
        assert all(torch.isfinite(v).all() for v in second.values() if v.is_floating_point())
    assert all(torch.equal(results[0]["states"][1][k], results[1]["states"][1][k]) for k in results[0]["states"][1])
