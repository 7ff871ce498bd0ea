"""Nearest-neighbour retrieval and its picture: which training images does a test image land next to?

A k-NN accuracy is one number; the retrieval grid shows why. Each row is one test image followed
by its nearest training images under one or more similarities (e.g. raw pixels, then DINO
features), neighbours of the query's class framed green and the others red with their class name.

:func:`nearest_neighbours` is the k-NN evaluation's own search (``dino_pytorch.eval.knn``): cosine
similarity, chunked over the queries so that memory stays bounded.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .attention import _matplotlib
from .eval.knn import nearest_neighbours

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["first_of_each_class", "nearest_neighbours", "retrieval_figure", "save_retrieval_grid"]

# Layout in inches at DPI dots per inch: a fixed grid, so the PNG's size follows from its shape
# (rows x neighbours) alone; titles need the extra height above each image.
DPI = 100
CELL_W, CELL_H, GAP_W, HEADER_H = 1.0, 1.2, 0.3, 0.6
RIGHT, WRONG = "#1a9850", "#d73027"


def first_of_each_class(labels: Tensor, classes: Union[int, Sequence[int]]) -> Tensor:
    """Index of the first item of each class: a deterministic, one-per-class set of queries.

    Args:
        labels: (N,) integer labels.
        classes: the classes wanted, or ``n`` for classes ``0 .. n-1``.

    Returns:
        (len(classes),) int64 indices into ``labels``, in the order of ``classes``.
    """
    wanted = list(range(classes)) if isinstance(classes, int) else [int(c) for c in classes]
    labels = torch.as_tensor(labels).view(-1)
    indices = []
    for c in wanted:
        hits = (labels == c).nonzero()
        if hits.numel() == 0:
            raise ValueError(f"class {c} has no item in labels, expected at least one per wanted class")
        indices.append(int(hits[0, 0]))
    return torch.tensor(indices, dtype=torch.int64)


def _display(image: Tensor) -> np.ndarray:
    """(C, H, W) -> (H, W) or (H, W, 3) in [0, 1], min-max scaled per image: inputs may be
    normalised (mean/std), and a fixed range would show them washed out or clipped."""
    x = image.detach().float().cpu()
    if x.ndim == 2:
        x = x.unsqueeze(0)
    if x.ndim != 3:
        raise ValueError(f"an image has shape {tuple(image.shape)}, expected (C, H, W)")
    # Three channels are a colour image; any other count is shown as its grey mean.
    x = x.permute(1, 2, 0) if x.shape[0] == 3 else x.mean(0)
    lo, hi = x.min(), x.max()
    x = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
    return x.numpy()


def _check_grid_inputs(
    query_images: Tensor, train_images: Tensor, neighbours_by_row: Mapping[str, Tensor],
    query_labels: Tensor, train_labels: Tensor,
) -> None:
    m, n = len(query_images), len(train_images)
    if m == 0 or not neighbours_by_row:
        raise ValueError("expected at least one query image and one group of neighbours")
    if len(query_labels) != m or len(train_labels) != n:
        raise ValueError(
            f"{m} query images with {len(query_labels)} labels and {n} train images with "
            f"{len(train_labels)} labels, expected one label per image"
        )
    for name, idx in neighbours_by_row.items():
        if idx.ndim != 2 or idx.shape[0] != m or idx.shape[1] == 0:
            raise ValueError(f"neighbours {name!r} have shape {tuple(idx.shape)}, expected ({m}, k) with k >= 1")
        if idx.dtype.is_floating_point or int(idx.min()) < 0 or int(idx.max()) >= n:
            raise ValueError(f"neighbours {name!r} must be integer indices in [0, {n}), the train images")


def retrieval_figure(
    query_images: Tensor,
    train_images: Tensor,
    neighbours_by_row: Mapping[str, Tensor],
    query_labels: Tensor,
    train_labels: Tensor,
    class_names: Optional[Sequence[str]] = None,
) -> Figure:
    """The retrieval grid as a matplotlib Figure (Agg canvas); see :func:`save_retrieval_grid`."""
    _check_grid_inputs(query_images, train_images, neighbours_by_row, query_labels, train_labels)
    query_y = torch.as_tensor(query_labels).view(-1).cpu()
    train_y = torch.as_tensor(train_labels).view(-1).cpu()

    def name(label: int) -> str:
        return class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)

    groups = [(g, idx.detach().cpu().long()) for g, idx in neighbours_by_row.items()]
    widths = [CELL_W]
    for _, idx in groups:
        widths += [GAP_W] + [CELL_W] * idx.shape[1]
    m = len(query_images)
    fig_w, fig_h = sum(widths), HEADER_H + CELL_H * m
    _, Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(fig_w, fig_h), dpi=DPI)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(m, len(widths), width_ratios=widths, left=0, right=1, bottom=0.02,
                            top=1 - HEADER_H / fig_h, wspace=0.08, hspace=0.3)

    def cell(row: int, col: int, image: Tensor, colour: str, title: str, title_colour: str) -> None:
        ax = fig.add_subplot(grid[row, col])
        ax.imshow(_display(image), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(3 if colour != "black" else 1)
        ax.set_title(title, fontsize=8, color=title_colour, pad=2)

    def header(first_col: int, last_col: int, text: str) -> None:
        x0 = sum(widths[:first_col]) / fig_w
        x1 = sum(widths[: last_col + 1]) / fig_w
        fig.text((x0 + x1) / 2, 1 - 0.35 * HEADER_H / fig_h, text, ha="center", va="center", fontsize=9)

    for row in range(m):
        cell(row, 0, query_images[row], "black", name(int(query_y[row])), "black")
    header(0, 0, "test image")
    col = 1
    for group, idx in groups:
        k = idx.shape[1]
        correct = int((train_y[idx] == query_y.view(-1, 1)).sum())
        for row in range(m):
            for j in range(k):
                t = int(idx[row, j])
                ok = int(train_y[t]) == int(query_y[row])
                # Only the wrong ones are named: the red name is what the eye should find.
                cell(row, col + 1 + j, train_images[t], RIGHT if ok else WRONG,
                     "" if ok else name(int(train_y[t])), WRONG)
        header(col + 1, col + k, f"{k} nearest by {group}: {correct}/{m * k} of the query's class")
        col += 1 + k
    return fig


def save_retrieval_grid(
    path: Union[str, os.PathLike],
    query_images: Tensor,
    train_images: Tensor,
    neighbours_by_row: Mapping[str, Tensor],
    query_labels: Tensor,
    train_labels: Tensor,
    class_names: Optional[Sequence[str]] = None,
) -> Path:
    """Write the retrieval grid PNG: per row a test image, then its neighbours of each group.

    Each group of ``neighbours_by_row`` (e.g. ``{"raw pixels": ..., "DINO features": ...}``) is a
    block of columns under a title line counting the neighbours of the query's class; each
    neighbour is framed green when its label is the query's, else red with its class name.
    Images are shown min-max scaled per image (grey for one channel, RGB for three). The PNG is
    ``DPI * (HEADER_H + CELL_H * M)`` pixels high and ``DPI * (CELL_W * (1 + sum k) + GAP_W *
    groups)`` wide.

    Args:
        path: the PNG to write (its folder is created).
        query_images: (M, C, H, W) test images.
        train_images: (N, C, H, W) training images (anything indexable by int giving (C, H, W)).
        neighbours_by_row: group name -> (M, k) int64 indices into ``train_images``, nearest first
            (:func:`nearest_neighbours`).
        query_labels: (M,) integer labels.
        train_labels: (N,) integer labels.
        class_names: names indexed by label; by default the label numbers.

    Returns:
        ``path`` as a Path.
    """
    fig = retrieval_figure(query_images, train_images, neighbours_by_row, query_labels, train_labels, class_names)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
