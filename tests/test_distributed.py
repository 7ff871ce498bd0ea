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


@pytest.mark.slow
def test_center_is_mean_over_union_of_ranks_with_unequal_batches():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
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
