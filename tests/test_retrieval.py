"""Retrieval: the neighbour search against a float64 brute force, the grid picture's size and
its red / green marks against a plain count, and retrieval.png from the Fashion-MNIST demo's hook on
the training program."""
from __future__ import annotations

import gzip
import math

import matplotlib.colors
import matplotlib.image  # (matplotlib: the [dev]/[train] extras)
import numpy as np
import pytest
import torch

from dino_pytorch.cli.demo_report import FashionMNISTDemo
from dino_pytorch.cli.train_report import RunLog, write_pictures
from dino_pytorch.models.convnet import ConvNet
from dino_pytorch.retrieval import (
    CELL_H,
    CELL_W,
    DPI,
    GAP_W,
    HEADER_H,
    RIGHT,
    WRONG,
    first_of_each_class,
    nearest_neighbours,
    retrieval_figure,
    save_retrieval_grid,
)


def naive_neighbours(train, queries, k, normalize=True):
    """Double loop in float64, then a full argsort; also the smallest gap around the k-th place."""
    train, queries = train.double().tolist(), queries.double().tolist()

    def unit(v):
        norm = math.sqrt(sum(x * x for x in v)) if normalize else 1.0
        return [x / norm for x in v]

    train = [unit(t) for t in train]
    rows, gaps = [], []
    for q in map(unit, queries):
        sims = [sum(a * b for a, b in zip(q, t)) for t in train]
        order = sorted(range(len(train)), key=lambda j: -sims[j])
        rows.append(order[:k])
        ranked = [sims[j] for j in order[: k + 1]]
        gaps.append(min((a - b for a, b in zip(ranked, ranked[1:])), default=1.0))
    return torch.tensor(rows), min(gaps)


@pytest.mark.parametrize("k, chunk_size", [(1, None), (5, None), (10, 2), (7, 1), (40, 3)])
def test_nearest_neighbours_match_brute_force(k, chunk_size):
    g = torch.Generator().manual_seed(k)
    train = torch.randn(40, 6, generator=g) * torch.rand(40, 1, generator=g).add(0.1) * 10
    queries = torch.randn(11, 6, generator=g)
    expected, gap = naive_neighbours(train, queries, k)
    # Tie-free data: float32 rounding cannot reorder neighbours that far apart.
    assert gap > 1e-5
    got = nearest_neighbours(train, queries, k, chunk_size=chunk_size)
    assert got.dtype == torch.int64 and got.shape == (11, k)
    assert torch.equal(got, expected)


def test_nearest_neighbours_without_normalising_rank_by_dot_product():
    g = torch.Generator().manual_seed(3)
    train = torch.randn(30, 4, generator=g) * torch.linspace(0.1, 20, 30).view(-1, 1)
    queries = torch.randn(6, 4, generator=g)
    dot, gap = naive_neighbours(train, queries, 5, normalize=False)
    assert gap > 1e-5
    assert torch.equal(nearest_neighbours(train, queries, 5, normalize=False, chunk_size=4), dot)
    # Row norms spread 200x: the dot product and the cosine disagree, so the flag matters.
    assert not torch.equal(nearest_neighbours(train, queries, 5), dot)


def test_nearest_neighbours_reject_bad_inputs():
    train, queries = torch.randn(4, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match="k=5 but there are only 4"):
        nearest_neighbours(train, queries, 5)
    with pytest.raises(ValueError, match="query_features has D=2"):
        nearest_neighbours(train, torch.randn(2, 2), 1)
    with pytest.raises(TypeError, match="query_features has dtype torch.int64"):
        nearest_neighbours(train, torch.ones(2, 3, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="chunk_size"):
        nearest_neighbours(train, queries, 1, chunk_size=0)


def test_first_of_each_class():
    labels = torch.tensor([3, 1, 1, 0, 3, 2, 0, 1])
    naive = [next(i for i, y in enumerate(labels.tolist()) if y == c) for c in range(4)]
    assert first_of_each_class(labels, 4).tolist() == naive == [3, 1, 5, 0]
    assert first_of_each_class(labels, [2, 3]).tolist() == [5, 0]
    with pytest.raises(ValueError, match="class 4 has no item"):
        first_of_each_class(labels, 5)


def grid_case(m, seed=0, channels=1):
    g = torch.Generator().manual_seed(seed)
    train_images = torch.randn(20, channels, 6, 5, generator=g)
    query_images = torch.randn(m, channels, 6, 5, generator=g)
    train_labels = torch.randint(0, 3, (20,), generator=g)
    query_labels = torch.randint(0, 3, (m,), generator=g)
    neighbours = {"raw pixels": torch.randint(0, 20, (m, 4), generator=g),
                  "DINO features": torch.randint(0, 20, (m, 2), generator=g)}
    return query_images, train_images, neighbours, query_labels, train_labels


def expected_size(m, ks):
    return round(DPI * (HEADER_H + CELL_H * m)), round(DPI * (CELL_W * (1 + sum(ks)) + GAP_W * len(ks)))


@pytest.mark.parametrize("m, channels", [(3, 1), (5, 3)])
def test_grid_png_has_one_row_per_query(tmp_path, m, channels):
    out = save_retrieval_grid(tmp_path / "sub" / "grid.png", *grid_case(m, channels=channels))
    pixels = matplotlib.image.imread(out)
    assert pixels.shape[:2] == expected_size(m, [4, 2])
    assert expected_size(5, [4, 2])[0] - expected_size(3, [4, 2])[0] == 2 * CELL_H * DPI


def test_grid_marks_every_wrong_neighbour_red(tmp_path):
    names = ["zero", "one", "two"]
    query_images, train_images, neighbours, query_labels, train_labels = grid_case(4, seed=1)
    fig = retrieval_figure(query_images, train_images, neighbours, query_labels, train_labels, names)
    wrong_names, right, wrong_by_group = [], 0, {}
    for group, idx in neighbours.items():
        wrong_by_group[group] = 0
        for row in range(4):
            for t in idx[row].tolist():
                if train_labels[t] == query_labels[row]:
                    right += 1
                else:
                    wrong_by_group[group] += 1
                    wrong_names.append(names[int(train_labels[t])])
    assert 0 < len(wrong_names) < 4 * 6  # both kinds of mark occur

    def frame(ax):
        return matplotlib.colors.to_hex(ax.spines["top"].get_edgecolor())

    axes = fig.axes
    assert len(axes) == 4 * (1 + 4 + 2)
    red = [ax for ax in axes if frame(ax) == WRONG]
    assert len(red) == len(wrong_names)
    assert sum(frame(ax) == RIGHT for ax in axes) == right
    assert sorted(ax.get_title() for ax in red) == sorted(wrong_names)
    assert all(ax.get_title() == "" for ax in axes if frame(ax) == RIGHT)
    headers = [t.get_text() for t in fig.texts]
    assert f"4 nearest by raw pixels: {16 - wrong_by_group['raw pixels']}/16 of the query's class" in headers
    assert f"2 nearest by DINO features: {8 - wrong_by_group['DINO features']}/8 of the query's class" in headers
    # The query column is titled with the query's class name.
    assert [ax.get_title() for ax in axes[:4]] == [names[int(y)] for y in query_labels]


def test_grid_rejects_mismatched_neighbours():
    query_images, train_images, neighbours, query_labels, train_labels = grid_case(3)
    with pytest.raises(ValueError, match="expected \\(3, k\\)"):
        retrieval_figure(query_images, train_images, {"x": torch.zeros(2, 5, dtype=torch.int64)},
                         query_labels, train_labels)
    with pytest.raises(ValueError, match="in \\[0, 20\\)"):
        retrieval_figure(query_images, train_images, {"x": torch.full((3, 2), 20)}, query_labels, train_labels)


def write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def fashion_mnist_folder(root, train, test, classes, seed):
    """A Fashion-MNIST idx folder of random images, ``train`` and ``test`` of them, the labels cycling
    through ``classes``."""
    rng = np.random.default_rng(seed)
    root.mkdir()
    for split, n in (("train", train), ("t10k", test)):
        write_idx(root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", np.asarray(classes)[np.arange(n) % len(classes)])
    return root


@pytest.fixture
def tiny_fashion_mnist(tmp_path):
    """A Fashion-MNIST folder of 30 train and 20 test images: every class present in both."""
    return fashion_mnist_folder(tmp_path / "fm", 30, 20, range(10), seed=0)


CONFIG = {"arch": "convnet", "data": {"dataset": "fashion_mnist", "in_chans": 1, "image_size": 28}}


def test_training_pictures_include_retrieval_png(tmp_path, tiny_fashion_mnist):
    backbone = ConvNet(width=2, stages=1).train()
    out = tmp_path / "run"
    demo = FashionMNISTDemo(CONFIG, RunLog(out, is_main=True), data_path=str(tiny_fashion_mnist))
    write_pictures(out, backbone, CONFIG, 0, hook=demo)
    png = out / "retrieval.png"
    # 8 queries (one per class of the first 8), 5 neighbours by pixels and 5 by features.
    assert matplotlib.image.imread(png).shape[:2] == expected_size(8, [5, 5])
    assert backbone.training  # extraction put the mode back


def test_retrieval_png_only_with_the_demo_hook(tmp_path, tiny_fashion_mnist):
    # The training program passes the hook with the final k-NN only (not under --no_final_knn).
    write_pictures(tmp_path / "off", ConvNet(width=2, stages=1), CONFIG, 0, str(tiny_fashion_mnist))
    assert not list(tmp_path.glob("*/retrieval.png"))


def test_retrieval_png_of_a_folder_holding_some_classes(tmp_path):
    # FASHION_MNIST_DIR may hold a subset of the classes (issue 20's halves hold 5-9): the queries
    # are the first test image of each class present, not of classes 0-7.
    root = fashion_mnist_folder(tmp_path / "half", 20, 10, range(5, 10), seed=1)
    out = tmp_path / "run"
    demo = FashionMNISTDemo(CONFIG, RunLog(out, is_main=True), data_path=str(root))
    write_pictures(out, ConvNet(width=2, stages=1), CONFIG, 0, hook=demo)
    assert matplotlib.image.imread(out / "retrieval.png").shape[:2] == expected_size(5, [5, 5])
