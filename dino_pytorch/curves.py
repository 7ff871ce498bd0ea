"""Training curves: the JSON-lines logs of a run (metrics.jsonl, the official log.txt) and their plot."""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from .attention import _matplotlib
from .diagnostics import CollapseThresholds

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Records = Union[str, os.PathLike, Iterable[Mapping[str, Any]]]


# Legend names: the full-set value is the one a run reports; the subset one is the periodic cheap check.
KNN_LABELS = {"knn_top1": "top-1, full test set", "knn_top1_subset": "top-1, train/test subset (periodic)",
              "knn_top5": "top-5, full test set"}


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


# The collapse monitor's numbers (dino_pytorch.diagnostics.collapse_metrics) in step records.
ENTROPY_KEYS = {"teacher_entropy": "teacher row entropy", "teacher_mean_entropy": "batch-mean teacher entropy",
                "student_teacher_kl": "student-teacher KL"}


def _ln_k(records: Sequence[Mapping[str, Any]]) -> Optional[float]:
    """ln K of the head, read back from the records: ln K = teacher_kl_uniform + teacher_mean_entropy
    (or train_loss / loss_over_ln_k); the median shrugs off float32 rounding and odd records."""
    values = []
    for r in records:
        kl, mean_h, loss, ratio = (r.get(k) for k in ("teacher_kl_uniform", "teacher_mean_entropy",
                                                       "train_loss", "loss_over_ln_k"))
        if isinstance(kl, (int, float)) and isinstance(mean_h, (int, float)):
            values.append(kl + mean_h)
        elif isinstance(loss, (int, float)) and isinstance(ratio, (int, float)) and ratio > 0:
            values.append(loss / ratio)
    values = sorted(v for v in values if math.isfinite(v) and v > 0)
    return values[len(values) // 2] if values else None


def _collapse_marks(records: Sequence[Mapping[str, Any]], x_key: str) -> list[tuple[float, str]]:
    """(x, "one-hot collapse" / "uniform collapse") of the records the monitor put a warning in."""
    marks = []
    for r in records:
        if isinstance(r.get("collapse"), str) and isinstance(r.get(x_key), (int, float)):
            kinds = re.findall(r"(one-hot|uniform) collapse", r["collapse"]) or ["collapse"]
            marks.append((r[x_key], " + ".join(k if k == "collapse" else f"{k} collapse" for k in kinds)))
    return marks


def _mark_collapses(ax: Any, marks: list[tuple[float, str]]) -> None:
    for x, text in marks:
        ax.axvline(x, color="red", lw=1.5, alpha=0.8)
        ax.annotate(text, (x, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", color="red", fontsize=8)


# The parts of the loss (dino.loss_parts, unweighted) that step records carry with iBOT or KoLeo on.
LOSS_PART_LABELS = {"dino_loss": "DINO", "ibot_loss": "iBOT (masked patches)", "koleo_loss": "KoLeo",
                    "gram_loss": "Gram anchoring"}


def _loss_panel(ax: Any, records: Sequence[Mapping[str, Any]], loss: tuple[list[float], list[float], str]) -> None:
    """The loss; with iBOT or KoLeo in the records, the total and each (unweighted) part as lines."""
    xs, ys, x_key = loss
    parts = [(label, _series(records, key)) for key, label in LOSS_PART_LABELS.items()]
    parts = [(label, s) for label, s in parts if s[0]]
    if not any(label != "DINO" for label, _ in parts):  # DINO alone: its part is the loss itself
        ax.plot(xs, ys, lw=1)
        ax.set(xlabel=x_key, ylabel="train loss", title="DINO loss")
    else:
        ax.plot(xs, ys, lw=1.5, color="black", label="total (train_loss)")
        for label, (part_xs, part_ys, _) in parts:
            ax.plot(part_xs, part_ys, lw=1, label=label)
        ax.set(xlabel=x_key, ylabel="loss", title="loss and its parts (unweighted)")
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _knn_panel(ax: Any, knn: list[tuple[str, tuple[list[float], list[float], str]]]) -> None:
    for key, (xs, ys, _) in knn:
        ax.plot(xs, ys, marker="o", ms=3, label=KNN_LABELS[key])
    ax.set(xlabel=knn[-1][1][2], ylabel="accuracy (%)", title="k-NN")
    ax.grid(alpha=0.3)
    ax.legend()


def _entropy_panel(ax: Any, records: Sequence[Mapping[str, Any]],
                   entropies: list[tuple[str, tuple[list[float], list[float], str]]]) -> None:
    thresholds = CollapseThresholds()
    for label, (xs, ys, _) in entropies:
        ax.plot(xs, ys, lw=1, label=label)
    ln_k = _ln_k(records)
    lines = [(thresholds.one_hot_entropy, "one-hot collapse below (ln 4)", "red")]
    if ln_k is not None:
        lines = [(ln_k, f"ln K = {ln_k:.2f}", "black"),
                 (thresholds.uniform_fraction * ln_k,
                  f"uniform collapse above ({thresholds.uniform_fraction:g} ln K)", "darkorange"), *lines]
    for y, label, colour in lines:
        ax.axhline(y, ls="--", lw=1, color=colour, label=label)
    x_key = entropies[0][1][2]
    _mark_collapses(ax, _collapse_marks(records, x_key))
    ax.set(xlabel=x_key, ylabel="nats", title="collapse monitor: teacher entropy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _prototypes_panel(ax: Any, records: Sequence[Mapping[str, Any]],
                      prototypes: tuple[list[float], list[float], str]) -> None:
    thresholds = CollapseThresholds()
    xs, ys, x_key = prototypes
    ax.plot(xs, ys, lw=1, label="prototypes winning the argmax")
    ax.axhline(thresholds.one_hot_prototypes, ls="--", lw=1, color="red",
               label=f"one-hot collapse at or below {thresholds.one_hot_prototypes}")
    _mark_collapses(ax, _collapse_marks(records, x_key))
    # From 1 to K (65536 in the official head): only a log axis shows both ends.
    ax.set_yscale("log")
    ax.set(xlabel=x_key, ylabel="prototypes used", title="collapse monitor: prototypes used")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def curves_figure(log_path_or_records: Records) -> Figure:
    """The figure :func:`plot_curves` saves (Agg canvas), e.g. to read its panels' titles.

    Panels, each when its keys are present: "DINO loss" (with iBOT or KoLeo in the records, "loss
    and its parts (unweighted)": the total and the ``dino_loss`` / ``ibot_loss`` / ``koleo_loss``
    lines); "k-NN"; "collapse monitor: teacher entropy"
    (row and batch-mean entropy, student-teacher KL, against ln K, the uniform-collapse
    line ``uniform_fraction * ln K`` and the one-hot line ``one_hot_entropy`` of
    :class:`~dino_pytorch.diagnostics.CollapseThresholds`); "collapse monitor: prototypes used".
    Records with a ``collapse`` warning are marked by a red line on the monitor panels.
    """
    if isinstance(log_path_or_records, (str, os.PathLike)):
        records = read_log(log_path_or_records)
    else:
        records = [dict(r) for r in log_path_or_records]
    loss = _series(records, "train_loss")
    # Full-set and subset k-NN are different measurements: separate lines, never joined.
    knn = [(k, _series(records, k)) for k in ("knn_top1", "knn_top1_subset", "knn_top5")]
    knn = [(k, s) for k, s in knn if s[0]]
    entropies = [(label, _series(records, k)) for k, label in ENTROPY_KEYS.items()]
    entropies = [(label, s) for label, s in entropies if s[0]]
    prototypes = _series(records, "prototypes_used")
    if not loss[0] and not knn:
        raise ValueError(f"{log_path_or_records!r}: no train_loss or knn_top1 values to plot")
    panels: list[Callable[[Any], None]] = [draw for present, draw in (
        (loss[0], lambda ax: _loss_panel(ax, records, loss)), (knn, lambda ax: _knn_panel(ax, knn)),
        (entropies, lambda ax: _entropy_panel(ax, records, entropies)),
        (prototypes[0], lambda ax: _prototypes_panel(ax, records, prototypes))) if present]
    n = len(panels)
    # Up to two panels side by side; the monitor's two make a 2 x 2 grid.
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    _, Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(6 * cols, 4 * rows), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in grid[n:]:
        ax.remove()
    for ax, draw in zip(grid, panels):
        draw(ax)
    fig.tight_layout()
    return fig


def plot_curves(log_path_or_records: Records, out_png: Union[str, os.PathLike]) -> Path:
    """Plot the curves of a log to ``out_png`` (the panels of :func:`curves_figure`).

    ``train_loss`` (with ``ibot_loss`` or ``koleo_loss`` in the records, the loss's parts as lines
    of its panel) and ``knn_top1`` / ``knn_top1_subset`` / ``knn_top5``; with the collapse
    monitor's numbers (``teacher_entropy``, ``teacher_mean_entropy``, ``student_teacher_kl``,
    ``prototypes_used``) two more panels, and a red line at each record with a ``collapse``
    warning.

    Args:
        log_path_or_records: a JSONL file (``log.txt``) or an iterable of dicts such as
            ``{"step": 100, "epoch": 1, "train_loss": 7.3, "knn_top1": 41.2}``; any key may be
            missing. x is ``step`` when every point has one, else ``epoch``, else the record index.
    """
    fig = curves_figure(log_path_or_records)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
