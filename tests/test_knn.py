"""Weighted k-NN: exact agreement with a naive per-sample loop, hand examples, errors, feature dumps."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dino_pytorch.eval import extract_features, knn_classifier, knn_eval
from dino_pytorch.eval import knn as knn_module


def naive_knn(train, train_labels, test, test_labels, k, T, num_classes):
    """Per test sample: sort the neighbours, take k, add exp(sim / T) per class in float32, rank.

    The similarities come from the same float32 matmul as the library; everything after it is a
    plain Python loop (ties: Python's stable sort, lower index first).
    """
    sims = test @ train.t()
    top1 = top5 = 0
    for i in range(test.shape[0]):
        row = sims[i]
        order = sorted(range(train.shape[0]), key=lambda j: -float(row[j]))[:k]
        scores = [np.float32(0.0)] * num_classes
        for j in order:
            weight = np.float32(torch.exp(row[j: j + 1] / T)[0])
            label = int(train_labels[j])
            scores[label] = np.float32(scores[label] + weight)
        ranking = sorted(range(num_classes), key=lambda c: -scores[c])
        top1 += ranking[0] == int(test_labels[i])
        top5 += int(test_labels[i]) in ranking[: min(5, k)]
    n = test.shape[0]
    return top1 * 100.0 / n, top5 * 100.0 / n


def clustered(n_train, n_test, num_classes, dim=16, noise=1.0, seed=0):
    """L2-normalised noisy class clusters, so accuracies are neither 0 nor 100."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g)
    train_labels = torch.randint(0, num_classes, (n_train,), generator=g)
    test_labels = torch.randint(0, num_classes, (n_test,), generator=g)
    train = F.normalize(centers[train_labels] + noise * torch.randn(n_train, dim, generator=g), dim=1)
    test = F.normalize(centers[test_labels] + noise * torch.randn(n_test, dim, generator=g), dim=1)
    return train, train_labels, test, test_labels


@pytest.mark.parametrize("num_classes,n_test,k,T,chunk_size", [
    (3, 7, 1, 0.07, None),
    (3, 7, 3, 0.07, 3),
    (17, 7, 4, 0.5, 2),
    (17, 150, 20, 0.07, 7),
    (17, 150, 50, 0.02, None),
    (10, 33, 10, 1.0, 5),
    (3, 1, 2, 0.07, None),
])
def test_matches_naive_loop_exactly(num_classes, n_test, k, T, chunk_size):
    train, train_labels, test, test_labels = clustered(200, n_test, num_classes, seed=num_classes + k)
    got = knn_classifier(train, train_labels, test, test_labels, k, T, chunk_size=chunk_size)
    assert got == naive_knn(train, train_labels, test, test_labels, k, T, num_classes)


def test_accuracies_are_informative():
    # Guards the exactness test against trivial 0 / 100 cases.
    train, train_labels, test, test_labels = clustered(200, 150, 17, seed=37)
    top1, top5 = knn_classifier(train, train_labels, test, test_labels, k=20)
    assert 10 < top1 < 95 and top1 < top5 < 100


def test_knn_eval_equals_knn_classifier_per_k():
    train, train_labels, test, test_labels = clustered(120, 40, 5, seed=3)
    results = knn_eval(train, train_labels, test, test_labels, ks=(1, 4, 10, 120), T=0.1, chunk_size=9)
    assert list(results) == [1, 4, 10, 120]
    for k, value in results.items():
        assert value == knn_classifier(train, train_labels, test, test_labels, k, 0.1)


def test_default_chunking_splits_and_agrees(monkeypatch):
    train, train_labels, test, test_labels = clustered(100, 53, 6, seed=5)
    whole = knn_classifier(train, train_labels, test, test_labels, k=7)
    monkeypatch.setattr(knn_module, "_CHUNK_BYTES", 4 * 100 * 4)  # 4 rows per chunk
    assert knn_module._default_chunk(100, torch.float32) == 4
    assert knn_classifier(train, train_labels, test, test_labels, k=7) == whole


def test_top5_uses_min_5_k_and_num_classes_may_exceed_labels():
    train, train_labels, test, test_labels = clustered(60, 20, 3, seed=9)
    # With 3 classes top-5 with k >= 3 neighbours covers every voted class, unvoted ones follow.
    assert knn_classifier(train, train_labels, test, test_labels, k=10)[1] == 100.0
    # With k=1 only the first prediction counts, so top-5 == top-1.
    top1, top5 = knn_classifier(train, train_labels, test, test_labels, k=1)
    assert top1 == top5
    # Extra, never-seen classes change nothing (they have no votes).
    assert knn_classifier(train, train_labels, test, test_labels, k=5, num_classes=50) == \
        knn_classifier(train, train_labels, test, test_labels, k=5)


def test_hand_example_temperature_flips_the_vote():
    # Test point x = e1 (label 0). Neighbours: one of class 0 at cosine 0.99, two of class 1 at 0.5,
    # and a far class-0 point at -1.
    s = math.sqrt(1 - 0.99**2)
    r = math.sqrt(0.75)
    train = torch.tensor([[0.99, s, 0.0], [0.5, 0.0, r], [0.5, 0.0, -r], [-1.0, 0.0, 0.0]])
    train_labels = torch.tensor([0, 1, 1, 0])
    test, test_labels = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([0])
    # T=1: class 0 gets e^0.99 = 2.69, class 1 gets 2 e^0.5 = 3.30 -> predicts 1; 2nd guess is 0.
    assert knn_classifier(train, train_labels, test, test_labels, k=3, T=1.0) == (0.0, 100.0)
    # T=0.1: class 0 gets e^9.9 = 19930, class 1 gets 2 e^5 = 297 -> predicts 0.
    assert knn_classifier(train, train_labels, test, test_labels, k=3, T=0.1) == (100.0, 100.0)
    # k=1: only the 0.99 neighbour votes, whatever T.
    assert knn_classifier(train, train_labels, test, test_labels, k=1, T=1.0) == (100.0, 100.0)
    # k=4 adds the far class-0 point, e^-1 = 0.37: still 3.06 < 3.30 at T=1.
    assert knn_classifier(train, train_labels, test, test_labels, k=4, T=1.0) == (0.0, 100.0)


def test_second_hand_example_two_test_points():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    train_labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    test_labels = torch.tensor([0, 1])
    # x: sims (0.8, 0.6, 0.96) -> nearest is class 1; y: sims (0, 1, 0.8) -> class 1, correct.
    assert knn_classifier(train, train_labels, test, test_labels, k=1, T=1.0) == (50.0, 50.0)
    assert knn_classifier(train, train_labels, test, test_labels, k=2, T=1.0) == (50.0, 100.0)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"k": 201}, ValueError, "k=201"),
    ({"k": 0}, ValueError, "k=0"),
    ({"T": 0.0}, ValueError, "T=0.0"),
    ({"num_classes": 2}, ValueError, "num_classes=2"),
    ({"chunk_size": 0}, ValueError, "chunk_size=0"),
])
def test_argument_errors(kwargs, error, match):
    train, train_labels, test, test_labels = clustered(200, 10, 3)
    with pytest.raises(error, match=match):
        knn_classifier(train, train_labels, test, test_labels, **kwargs)


def test_shape_and_dtype_errors():
    train, train_labels, test, test_labels = clustered(50, 10, 3)
    with pytest.raises(ValueError, match="train_labels has shape"):
        knn_classifier(train, train_labels[:-1], test, test_labels, k=5)
    with pytest.raises(ValueError, match="test_labels has shape"):
        knn_classifier(train, train_labels, test, test_labels[:3], k=5)
    with pytest.raises(ValueError, match="D=16"):
        knn_classifier(train, train_labels, test[:, :8], test_labels, k=5)
    with pytest.raises(TypeError, match="integer dtype"):
        knn_classifier(train, train_labels.float(), test, test_labels, k=5)
    with pytest.raises(TypeError, match="same dtype"):
        knn_classifier(train, train_labels, test.double(), test_labels, k=5)
    with pytest.raises(ValueError, match="negative label"):
        knn_classifier(train, train_labels - 1, test, test_labels, k=5)
    with pytest.raises(ValueError, match=r"expected \(N, D\)"):
        knn_classifier(train[0], train_labels, test, test_labels, k=5)
    with pytest.raises(ValueError, match="ks is empty"):
        knn_eval(train, train_labels, test, test_labels, ks=())


class IndexDataset(Dataset):
    """Item i is (a fixed random vector, i): labels reveal the order features come out in."""

    def __init__(self, n=10, dim=6):
        self.x = torch.randn(n, dim, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, i):
        return self.x[i], i


class ModeRecorder(nn.Module):
    def __init__(self, dim=6):
        super().__init__()
        self.linear = nn.Linear(dim, 4)
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        assert not torch.is_grad_enabled()
        return self.linear(x)


def test_extract_features_normalises_and_keeps_order():
    data = IndexDataset()
    model = ModeRecorder()
    model.train()
    feats, labels = extract_features(model, DataLoader(data, batch_size=4))
    assert feats.shape == (10, 4) and feats.dtype == torch.float32
    assert torch.equal(labels, torch.arange(10))
    with torch.no_grad():
        expected = F.normalize(model.linear(data.x), dim=1)
    torch.testing.assert_close(feats, expected)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(10))
    assert model.modes == [False] * 3 and model.training  # eval inside, mode restored after
    raw, _ = extract_features(model, DataLoader(data, batch_size=3), normalize=False)
    with torch.no_grad():
        torch.testing.assert_close(raw, model.linear(data.x))


def test_extract_features_rejects_non_2d_output():
    with pytest.raises(ValueError, match=r"expected \(N, D\)"):
        extract_features(nn.Unflatten(1, (2, 3)), DataLoader(IndexDataset(), batch_size=5))
