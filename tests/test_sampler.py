import pytest
import torch
from torch.utils.data import DataLoader

from dino_pytorch.augment import BatchedMultiCrop
from dino_pytorch.datasets import SeededTransform, sample_seed, sample_seeds
from dino_pytorch.sampler import ResumableSampler


def test_epoch_permutation_is_deterministic_and_drops_last():
    s = ResumableSampler(103, 10, seed=3)
    s.set_epoch(2)
    a = list(s)
    s.set_epoch(2)
    assert list(s) == a and len(a) == 100 == len(s)
    decoded = [k % 103 for k in a]
    assert len(set(decoded)) == 100 and all(k // 103 == 2 for k in a)
    s.set_epoch(3)
    assert [k % 103 for k in s] != decoded


def test_resume_from_a_batch_yields_the_rest():
    s = ResumableSampler(50, 4, seed=1)
    s.set_epoch(1)
    full = list(s)
    s.set_epoch(1, start_batch=5)
    assert list(s) == full[20:] and len(s) == len(full) - 20


def test_ranks_partition_the_single_process_batches():
    single = ResumableSampler(64, 8, seed=0)
    single.set_epoch(0)
    one = list(single)
    ranks = []
    for r in range(2):
        s = ResumableSampler(64, 4, seed=0, rank=r, world_size=2)
        s.set_epoch(0)
        ranks.append(list(s))
    for step in range(len(ranks[0]) // 4):
        union = set(ranks[0][step * 4:(step + 1) * 4]) | set(ranks[1][step * 4:(step + 1) * 4])
        assert union == set(one[step * 8:(step + 1) * 8])


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank=2"):
        ResumableSampler(10, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="dataset_size=3"):
        ResumableSampler(3, 2, world_size=2)
    with pytest.raises(ValueError, match="start_batch=9"):
        ResumableSampler(10, 2).set_epoch(0, start_batch=9)


def test_seeded_transform_depends_only_on_seed_epoch_index():
    data = [(torch.zeros(1), i) for i in range(10)]
    ds = SeededTransform(data, lambda x: x + torch.rand(1), seed=5)
    a = ds[2 * 10 + 7]
    torch.manual_seed(123)  # global RNG state must not matter, and must not be consumed
    state = torch.get_rng_state()
    b = ds[2 * 10 + 7]
    assert torch.equal(a[0], b[0]) and a[1] == b[1] == 7
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(ds[3 * 10 + 7][0], a[0])
    assert not torch.equal(SeededTransform(data, lambda x: x + torch.rand(1), seed=6)[27][0], a[0])


def test_sample_seed_is_the_seeded_transforms_and_keys_come_back():
    data = [(torch.zeros(1), i) for i in range(10)]
    ds = SeededTransform(data, lambda x: x + torch.rand(1), seed=5, return_key=True)
    view, label, key = ds[2 * 10 + 7]
    assert (label, key) == (7, 27)
    # The seed of (seed, epoch, index) as SeededTransform always computed it.
    assert sample_seed(5, 27) == (5 * 1_000_003 + 2 * 10 + 7) % (2**63 - 1)
    torch.manual_seed(sample_seed(5, 27))
    assert torch.equal(view, torch.zeros(1) + torch.rand(1))
    assert torch.equal(sample_seeds(5, torch.tensor([27, 3])), torch.tensor([sample_seed(5, 27), sample_seed(5, 3)]))
    # No transform: images pass through, nothing drawn.
    raw = SeededTransform(data, None, seed=5, return_key=True)
    state = torch.get_rng_state()
    assert raw[13] == (data[3][0], 3, 13) and torch.equal(torch.get_rng_state(), state)


def rank_batches(world_size: int, batch: int, num_workers: int, transform) -> list[dict[int, torch.Tensor]]:
    """Per step, {key: item} over every rank's batch of a DataLoader over SeededTransform(return_key)."""
    data = [(torch.full((1, 6, 6), i / 40), i) for i in range(40)]  # floats in [0, 1], as BatchedMultiCrop takes
    steps: list[dict[int, torch.Tensor]] = []
    for rank in range(world_size):
        sampler = ResumableSampler(len(data), batch, seed=1, rank=rank, world_size=world_size)
        sampler.set_epoch(2)
        loader = DataLoader(SeededTransform(data, transform, seed=4, return_key=True), sampler=sampler,
                            batch_size=batch, num_workers=num_workers)
        for step, (items, _, keys) in enumerate(loader):
            if transform is None:  # the batched augmenter, on the "device", seeded per sample
                items = BatchedMultiCrop(global_crop_size=4, local_crop_size=2, local_crops_number=1,
                                         mean=(0.5,), std=(0.5,))(items, seeds=sample_seeds(4, keys))[2]
            if rank == 0:
                steps.append({})
            steps[step].update({int(k): item for k, item in zip(keys, items)})
    return steps


@pytest.mark.parametrize("augmenter", ["per_image", "batched"])
def test_two_ranks_draw_the_views_of_one_process_with_the_doubled_batch(augmenter):
    # Each sample's views are keyed by its global index: the same whatever the rank layout, the batch
    # size or the worker that loads it.
    transform = (lambda x: x + torch.rand(x.shape)) if augmenter == "per_image" else None
    one = rank_batches(1, 8, 0, transform)
    two = rank_batches(2, 4, 1, transform)
    assert len(one) == len(two) == 5
    for a, b in zip(one, two):
        assert a.keys() == b.keys() and all(k // 40 == 2 for k in a)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
