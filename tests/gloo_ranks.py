"""Run a test's training function on gloo processes of this machine and collect what each rank returns.

``results_of_ranks(train, cases)`` spawns ``world`` processes (one thread each), initialises a gloo
group, calls ``train(case, rank, world)`` for every case and returns the ranks' results, in rank order.
``train`` must be a module-level function (the spawned processes import it by name).
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, init_file: str, out_dir: str, world: int, train: Callable[..., Any],
            cases: Sequence[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save({case: train(case, rank, world) for case in cases}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def results_of_ranks(train: Callable[..., Any], cases: Sequence[str], world: int = 2) -> list[dict]:
    """``[{case: train(case, rank, world)} for rank in range(world)]``, each computed in its own process."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp, world, train, tuple(cases)), nprocs=world,
                 join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(world)]
