"""How one kind of run hangs its own extras on dino-train's report: :class:`ReportHook`.

The trainer calls a hook on rank 0 with the final k-NN only (never under ``--no_final_knn``): at
random init, after the last step, and when it draws its pictures. The base class adds nothing; the
Fashion-MNIST demo's hook is :class:`~dino_pytorch.cli.demo_report.FashionMNISTDemo`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn


@dataclass
class ReportExtras:
    """What a :class:`ReportHook` adds to the final report."""

    rows: list[tuple[str, float]] = field(default_factory=list)  # k-NN table rows above "random init"
    summary: dict[str, Any] = field(default_factory=dict)  # summary.json entries
    lines: list[str] = field(default_factory=list)  # printed after the table


class ReportHook:
    """The extras of one kind of run, called by dino-train on rank 0 with the final k-NN (so never
    under ``--no_final_knn``); this base class adds none."""

    def at_random_init(self, backbone: nn.Module) -> None:
        """Step 0, after the k-NN at random init: measure (say and log) the hook's own baselines."""

    def at_end(self, backbone: nn.Module, step: int) -> ReportExtras:
        """After the final k-NN: the hook's rows, summary.json entries and lines of the report."""
        return ReportExtras()

    def draw_pictures(self, out: Path, backbone: nn.Module) -> list[Path]:
        """Draw the hook's pictures into ``out`` (matplotlib imports); returns their paths."""
        return []
