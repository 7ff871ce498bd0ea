import pytest
import torch

from dino_pytorch.datasets import SeededTransform
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
