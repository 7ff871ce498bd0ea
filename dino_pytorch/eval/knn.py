"""Weighted k-NN evaluation of frozen features (the official ``eval_knn.py`` protocol).

For a test feature ``x`` the k training features with the largest similarity ``s_j = x . t_j`` vote
for their labels with weight ``exp(s_j / T)``; classes are ranked by their summed votes. With
L2-normalised features (what :func:`extract_features` returns) the similarity is the cosine.

Numerically this is the official classifier (same matmul, ``topk``, ``exp(s / T)`` and the votes
summed nearest neighbour first). What differs: any number of classes (inferred from the labels),
any number of test images (the official one divides the test set into 100 chunks and crashes below
100 images), bounded memory, CPU or CUDA, no process group, and clear errors.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..validate import (
    check_bool,
    check_device,
    check_optional_positive_int,
    check_positive_float,
    check_positive_int,
)
from ..wrapper import backbone_tensor

__all__ = [
    "extract_features", "knn_classifier", "knn_eval", "load_features", "nearest_neighbours", "save_features",
]

# Default cap on one chunk's (chunk, N_train) similarity matrix.
_CHUNK_BYTES = 256 * 2**20


def _check_labels(name: str, labels: Tensor, n: int, features_name: str) -> None:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} is a {type(labels).__name__}, expected an integer Tensor of shape ({n},)")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} has dtype {labels.dtype}, expected an integer dtype (e.g. torch.int64)")
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(
            f"{name} has shape {tuple(labels.shape)}, expected ({n},): one label per row of {features_name}"
        )
    if n and int(labels.min()) < 0:
        raise ValueError(f"{name} contains the negative label {int(labels.min())}, expected labels >= 0")


def _check_features(train_features: Tensor, query_features: Tensor, query_name: str) -> None:
    """Both (N, D) floating-point tensors of one dtype and width, neither empty."""
    for name, feats in (("train_features", train_features), (query_name, query_features)):
        if not isinstance(feats, Tensor):
            raise TypeError(f"{name} is a {type(feats).__name__}, expected a floating-point Tensor (N, D)")
        if not feats.dtype.is_floating_point:
            raise TypeError(f"{name} has dtype {feats.dtype}, expected a floating-point dtype")
        if feats.ndim != 2:
            raise ValueError(f"{name} has shape {tuple(feats.shape)}, expected (N, D)")
    if train_features.shape[1] != query_features.shape[1]:
        raise ValueError(
            f"train_features has D={train_features.shape[1]} but {query_name} has "
            f"D={query_features.shape[1]}, expected the same feature width"
        )
    if train_features.dtype != query_features.dtype:
        raise TypeError(
            f"train_features is {train_features.dtype} but {query_name} is {query_features.dtype}, "
            "expected the same dtype"
        )
    n_train, n_query = train_features.shape[0], query_features.shape[0]
    if n_train == 0 or n_query == 0:
        raise ValueError(f"got {n_train} train and {n_query} {query_name.split('_')[0]} features, "
                         "expected at least one of each")


def _check_k(k: int, n_train: int, name: str = "k") -> int:
    if check_positive_int(name, k) > n_train:
        raise ValueError(f"{name}={k} but there are only {n_train} training features, expected {name} <= {n_train}")
    return k


def _check_ks(ks: Iterable[int]) -> list[int]:
    """``ks`` as a non-empty list of positive ints (their bound, the training set's size, comes later)."""
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Iterable):
        raise TypeError(f"ks={ks!r}, expected an iterable of positive ints (numbers of neighbours), e.g. (10, 20)")
    given = list(ks)
    if not given:
        raise ValueError(f"ks is empty (ks={ks!r}), expected at least one number of neighbours")
    return [check_positive_int(f"ks[{i}]", k) for i, k in enumerate(given)]


def _check_inputs(
    train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
    ks: Sequence[int], T: float, num_classes: Optional[int], chunk_size: Optional[int],
) -> int:
    """Validates everything; returns the number of classes."""
    _check_features(train_features, test_features, "test_features")
    n_train, n_test = train_features.shape[0], test_features.shape[0]
    _check_labels("train_labels", train_labels, n_train, "train_features")
    _check_labels("test_labels", test_labels, n_test, "test_features")
    for i, k in enumerate(ks):
        _check_k(k, n_train, f"ks[{i}]")
    check_positive_float("T", T)
    check_optional_positive_int("chunk_size", chunk_size)
    max_label = max(int(train_labels.max()), int(test_labels.max()))
    if num_classes is None:
        return max_label + 1
    num_classes = check_positive_int("num_classes", num_classes)
    if max_label >= num_classes:
        raise ValueError(f"num_classes={num_classes} but a label is {max_label}, expected labels < num_classes")
    return num_classes


def _default_chunk(n_train: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, _CHUNK_BYTES // (itemsize * n_train))


def _similarity_chunks(
    train_features: Tensor, query_features: Tensor, chunk_size: Optional[int]
) -> Iterator[tuple[int, Tensor]]:
    """(first query row, (b, N_train) similarities ``query . train``) chunk by chunk, on the
    train features' device: one (chunk, N_train) matrix at a time bounds the memory."""
    chunk = chunk_size or _default_chunk(train_features.shape[0], train_features.dtype)
    train_t = train_features.t()  # (D, N_train)
    for start in range(0, query_features.shape[0], chunk):
        yield start, query_features[start: start + chunk].to(train_features.device) @ train_t


def _class_scores(sim: Tensor, train_labels: Tensor, k: int, T: float, num_classes: int) -> Tensor:
    """(b, N_train) similarities -> (b, C) summed votes of the k nearest neighbours."""
    top_sim, top_idx = sim.topk(k, dim=1, largest=True, sorted=True)  # (b, k)
    neighbour_labels = train_labels[top_idx]  # (b, k)
    weights = (top_sim / T).exp()
    scores = sim.new_zeros(sim.shape[0], num_classes)
    # One neighbour rank at a time: every row gets one index per call, so the sum is taken nearest
    # neighbour first on every device (deterministic, no atomics), the order of the official
    # one-hot sum, and memory stays O(b * C) instead of the official O(b * k * C).
    for j in range(k):
        scores.scatter_add_(1, neighbour_labels[:, j: j + 1], weights[:, j: j + 1])
    return scores


def _correct(scores: Tensor, targets: Tensor, k: int) -> tuple[int, int]:
    """Number of top-1 and top-min(5, k) hits among the rows of (b, C) ``scores``."""
    # A stable sort ranks tied classes by class index; the official unstable sort leaves ties
    # unspecified (they only occur between classes without votes, or with underflowed weights).
    predictions = scores.sort(dim=1, descending=True, stable=True).indices
    hits = predictions[:, : min(5, k)] == targets.view(-1, 1)
    return int(hits[:, 0].sum()), int(hits.sum())


@torch.no_grad()
def knn_eval(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    ks: Iterable[int] = (10, 20, 100, 200),
    T: float = 0.07,
    num_classes: Optional[int] = None,
    *,
    chunk_size: Optional[int] = None,
) -> dict[int, tuple[float, float]]:
    """Weighted k-NN top-1/top-5 accuracy (percent) for every k in ``ks``.

    The similarity matrix of each test chunk is computed once and shared by all k; each k then
    gives exactly what :func:`knn_classifier` gives.

    Args:
        train_features: (N_train, D); used as given (pass L2-normalised features for cosine).
        train_labels: (N_train,) integer labels in [0, num_classes).
        test_features: (N_test, D), same dtype; moved to ``train_features``' device chunk by chunk.
        test_labels: (N_test,) integer labels.
        ks: numbers of neighbours (an iterable of ints, not one int), each in [1, N_train].
        T: temperature of the vote weights ``exp(sim / T)``.
        num_classes: defaults to the largest label + 1.
        chunk_size: test rows per similarity matrix; by default as many as keep the (chunk,
            N_train) matrix under 256 MiB.

    Returns:
        ``{k: (top1, top5)}``; top-5 counts the label among the first ``min(5, k)`` classes.
    """
    ks = _check_ks(ks)
    num_classes = _check_inputs(
        train_features, train_labels, test_features, test_labels, ks, T, num_classes, chunk_size
    )
    device = train_features.device
    train_labels = train_labels.to(device=device, dtype=torch.int64)
    test_labels = test_labels.to(device=device, dtype=torch.int64)
    n_test = test_features.shape[0]
    hits = {k: [0, 0] for k in ks}
    for start, sim in _similarity_chunks(train_features, test_features, chunk_size):
        targets = test_labels[start: start + sim.shape[0]]
        for k in ks:
            top1, top5 = _correct(_class_scores(sim, train_labels, k, T, num_classes), targets, k)
            hits[k][0] += top1
            hits[k][1] += top5
    return {k: (top1 * 100.0 / n_test, top5 * 100.0 / n_test) for k, (top1, top5) in hits.items()}


def knn_classifier(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    k: int = 20,
    T: float = 0.07,
    num_classes: Optional[int] = None,
    *,
    chunk_size: Optional[int] = None,
) -> tuple[float, float]:
    """Weighted k-NN (top1, top5) accuracy in percent, the official ``knn_classifier``.

    Shapes: train_features (N_train, D), train_labels (N_train,), test_features (N_test, D),
    test_labels (N_test,). See :func:`knn_eval` for the arguments.
    """
    _check_features(train_features, test_features, "test_features")
    k = _check_k(check_positive_int("k", k), train_features.shape[0])  # named k here, not ks[0]
    return knn_eval(train_features, train_labels, test_features, test_labels, (k,), T, num_classes,
                    chunk_size=chunk_size)[k]


@torch.no_grad()
def nearest_neighbours(
    train_features: Tensor,
    query_features: Tensor,
    k: int,
    *,
    normalize: bool = True,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Indices of the ``k`` training rows most similar to each query row, nearest first.

    The similarity is the dot product the k-NN classifier uses, i.e. the cosine once both sides
    are L2-normalised (``normalize``; features from :func:`extract_features` already are).

    Args:
        train_features: (N, D) floating point; the bank searched.
        query_features: (M, D), same dtype; moved to ``train_features``' device chunk by chunk.
        k: neighbours per query, in [1, N].
        normalize: L2-normalise both sides along dim 1 first (cosine similarity).
        chunk_size: query rows per similarity matrix; by default as many as keep the (chunk, N)
            matrix under 256 MiB.

    Returns:
        (M, k) int64 indices into ``train_features``, on its device, most similar first.
    """
    _check_features(train_features, query_features, "query_features")
    k = _check_k(k, train_features.shape[0])
    check_optional_positive_int("chunk_size", chunk_size)
    check_bool("normalize", normalize)
    if normalize:
        train_features = F.normalize(train_features, dim=1, p=2)
        query_features = F.normalize(query_features, dim=1, p=2)
    indices = [sim.topk(k, dim=1, largest=True, sorted=True).indices
               for _, sim in _similarity_chunks(train_features, query_features, chunk_size)]
    return torch.cat(indices)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: Iterable,
    device: Union[str, torch.device] = "cpu",
    normalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """Features and labels of every batch of ``loader``, in loader order.

    The model runs in eval mode (its previous mode is restored afterwards), under no_grad, in fp32
    with autocast disabled, as the official extraction. ``loader`` yields ``(images, labels, ...)``
    and ``model(images)`` returns (B, D) features (a ViT's forward returns the CLS token).

    Returns:
        features (N, D) float32, L2-normalised along dim 1 when ``normalize`` (official, eps
        1e-12), and labels (N,) int64, both on ``device``. Use a loader without shuffling when
        the order matters (e.g. to dump features).

    Raises:
        TypeError, ValueError: ``model`` is not an ``nn.Module``, ``device`` is not a device,
            ``normalize`` is not a bool, or the loader yields no ``(images, labels)`` batches.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model is a {type(model).__name__}, expected an nn.Module (the backbone)")
    device = check_device("device", device)
    check_bool("normalize", normalize)
    was_training = model.training
    model.eval()
    features, labels = [], []
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            for batch in loader:
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise TypeError(
                        f"the loader yielded a {type(batch).__name__}, expected (images, labels) pairs"
                    )
                images, targets = batch[0], batch[1]
                images = images.to(device, non_blocking=True)
                if images.is_floating_point():
                    images = images.float()
                out = backbone_tensor(model(images), "model").float()
                features.append(out)
                labels.append(torch.as_tensor(targets).to(device=device, dtype=torch.int64).view(-1))
    finally:
        model.train(was_training)
    if not features:
        raise ValueError("the loader yielded no batches, expected at least one")
    feats = torch.cat(features)
    if normalize:
        feats = F.normalize(feats, dim=1, p=2)
    return feats, torch.cat(labels)


_FEATURE_FILES = ("trainfeat.pth", "trainlabels.pth", "testfeat.pth", "testlabels.pth")


def save_features(folder: str, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]) -> None:
    """Writes the official dump layout: trainfeat / trainlabels / testfeat / testlabels ``.pth``."""
    os.makedirs(folder, exist_ok=True)
    tensors = (train[0], train[1], test[0], test[1])
    for name, tensor in zip(_FEATURE_FILES, tensors):
        torch.save(tensor.cpu(), os.path.join(folder, name))


def load_features(folder: str) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Reads a folder written by :func:`save_features` (or the official ``--dump_features``)."""
    missing = [n for n in _FEATURE_FILES if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise FileNotFoundError(f"--load_features {folder!r}: missing {', '.join(missing)}")
    train_f, train_l, test_f, test_l = (
        torch.load(os.path.join(folder, n), map_location="cpu", weights_only=True) for n in _FEATURE_FILES
    )
    return (train_f, train_l), (test_f, test_l)
