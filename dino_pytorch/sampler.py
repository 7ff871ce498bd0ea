"""A sampler whose order is a pure function of (seed, epoch): resumable mid-epoch, rank-sharded."""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from .validate import check_bool, check_int, check_positive_ints


class ResumableSampler(Sampler[int]):
    """Shuffled, rank-sharded indices that can start at any batch of any epoch.

    The epoch's permutation comes from ``torch.Generator().manual_seed(seed + epoch)``; it is cut
    to a multiple of ``batch_size * world_size`` (drop_last) and rank r takes every world-th
    index. So one process with batch ``W * b`` sees at step i exactly the union of what W ranks
    with batch ``b`` see at step i, and a resumed run sees what the uninterrupted run saw.

    Yields ``epoch * len(dataset) + index`` so that a dataset wrapped in
    :class:`~dino_pytorch.datasets.SeededTransform` can seed each sample's augmentation from
    (epoch, index) even inside persistent DataLoader workers, and hand the key on
    (``return_key=True``) to seed a batched augmenter per sample.
    """

    def __init__(self, dataset_size: int, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True) -> None:
        dataset_size, batch_size, world_size = check_positive_ints(
            dataset_size=dataset_size, batch_size=batch_size, world_size=world_size
        )
        rank = check_int("rank", rank, 0)
        seed = check_int("seed", seed)
        shuffle = check_bool("shuffle", shuffle)
        if rank >= world_size:
            raise ValueError(f"rank={rank!r}, expected an int < world_size={world_size}")
        if dataset_size < batch_size * world_size:
            raise ValueError(
                f"dataset_size={dataset_size} is smaller than one global batch "
                f"(batch_size {batch_size} x world_size {world_size})"
            )
        self.dataset_size, self.batch_size = dataset_size, batch_size
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset_size // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Next iteration yields ``epoch``'s indices from batch ``start_batch`` on.

        ``epoch``: an int >= 0 (the yielded keys ``epoch * dataset_size + index`` are then >= 0);
        ``start_batch``: an int in ``[0, batches_per_epoch]``.
        """
        epoch = check_int("epoch", epoch, 0)
        start_batch = check_int("start_batch", start_batch, 0)
        if start_batch > self.batches_per_epoch:
            raise ValueError(
                f"start_batch={start_batch}, expected an int in [0, {self.batches_per_epoch}] "
                "(batches per epoch)"
            )
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.dataset_size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.dataset_size)
        order = order[: self.batches_per_epoch * self.batch_size * self.world_size]
        mine = order[self.rank:: self.world_size][self.start_batch * self.batch_size:]
        offset = self.epoch * self.dataset_size
        return iter((mine + offset).tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size
