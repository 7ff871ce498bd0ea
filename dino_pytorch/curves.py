"""Training curves: the JSON-lines logs of a run (metrics.jsonl, the official log.txt) and their plot."""
from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from .attention import _matplotlib

Records = Union[str, os.PathLike, Iterable[Mapping[str, Any]]]


def read_log(path: Union[str, os.PathLike]) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL ``log.txt``, one per non-blank line.

    A malformed last line (a log being written) is skipped with a warning; a malformed line
    elsewhere raises ValueError naming the file and line.
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    records = []
    for k, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if k == len(numbered) - 1:
                warnings.warn(f"{path}: skipping the incomplete last line {number}", stacklevel=2)
                break
            raise ValueError(f"{path}: line {number} is not JSON: {err}") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {number} is a JSON {type(record).__name__}, expected an object")
        records.append(record)
    return records


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float], str]:
    rows = [r for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    for x_key in ("step", "epoch"):
        if rows and all(isinstance(r.get(x_key), (int, float)) for r in rows):
            return [r[x_key] for r in rows], [r[key] for r in rows], x_key
    return list(range(len(rows))), [r[key] for r in rows], "record"


def plot_curves(log_path_or_records: Records, out_png: Union[str, os.PathLike]) -> Path:
    """Plot ``train_loss`` (and ``knn_top1`` / ``knn_top1_subset`` / ``knn_top5`` when present) to ``out_png``.

    Args:
        log_path_or_records: a JSONL file (``log.txt``) or an iterable of dicts such as
            ``{"step": 100, "epoch": 1, "train_loss": 7.3, "knn_top1": 41.2}``; any key may be
            missing. x is ``step`` when every point has one, else ``epoch``, else the record index.
    """
    if isinstance(log_path_or_records, (str, os.PathLike)):
        records = read_log(log_path_or_records)
    else:
        records = [dict(r) for r in log_path_or_records]
    loss = _series(records, "train_loss")
    # Full-set and subset k-NN are different measurements: separate lines, never joined.
    knn = [(k, _series(records, k)) for k in ("knn_top1", "knn_top1_subset", "knn_top5")]
    knn = [(k, s) for k, s in knn if s[0]]
    if not loss[0] and not knn:
        raise ValueError(f"{log_path_or_records!r}: no train_loss or knn_top1 values to plot")
    _, Figure, FigureCanvasAgg = _matplotlib()
    panels = [p for p in (bool(loss[0]), bool(knn)) if p]
    fig = Figure(figsize=(6 * len(panels), 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    i = 0
    if loss[0]:
        xs, ys, x_key = loss
        axes[i].plot(xs, ys, lw=1)
        axes[i].set(xlabel=x_key, ylabel="train loss", title="DINO loss")
        axes[i].grid(alpha=0.3)
        i += 1
    if knn:
        for key, (xs, ys, _) in knn:
            axes[i].plot(xs, ys, marker="o", ms=3, label=key)
        axes[i].set(xlabel=knn[-1][1][2], ylabel="accuracy (%)", title="k-NN")
        axes[i].grid(alpha=0.3)
        axes[i].legend()
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
