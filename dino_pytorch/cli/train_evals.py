"""dino-train's k-NN evaluations and its final report.

:class:`KnnEvals` measures the teacher backbone's weighted 20-NN top-1: every ``--knn_every``
steps, and, unless ``--no_final_knn``, at random init and after the last step, where
:func:`final_report` writes summary.json and prints the table. A
:class:`~dino_pytorch.cli.report_hook.ReportHook` adds one kind of run's own baselines and numbers;
the Fashion-MNIST demo's is :class:`~dino_pytorch.cli.demo_report.FashionMNISTDemo`. Only rank 0
evaluates.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

import torch

from ..dino import DINO
from ._setup import eval_datasets, first, knn_top1
from .report_hook import ReportExtras, ReportHook
from .train_report import RunLog


def final_report(out: Path, arch: str, steps: int, top1: float, random_init: Optional[float],
                 extras: ReportExtras) -> None:
    """summary.json and the k-NN table: the hook's baseline rows, random init (None: not measured,
    a resumed run), after DINO; then the hook's lines."""
    summary: dict[str, Any] = {"knn_top1": top1, "knn_top1_random_init": random_init, "steps": steps,
                               **extras.summary}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    rows = [*extras.rows, (f"{arch} at random init", random_init), (f"{arch} after DINO ({steps} steps)", top1)]
    shown = [(name, value) for name, value in rows if value is not None]
    width = max(len(name) for name, _ in shown)
    print("k-NN top-1 (k=20, T=0.07), train set -> test set:")
    for name, value in shown:
        print(f"  {name:<{width}}  {value:6.2f}%", flush=True)
    for line in extras.lines:
        print(line, flush=True)


class KnnEvals:
    """The teacher backbone's k-NN top-1 during a run, logged to metrics.jsonl (rank 0 only).

    Args:
        args: dino-train's flags (``dataset``, ``in_chans``, ``global_crop_size``, ``knn_every``,
            ``knn_train_subset``, ``knn_test_subset``, ``no_final_knn``, ``arch``).
        dino: the run's DINO; its teacher backbone is read at each evaluation.
        data_path: the evaluation sets' folder (None: Fashion-MNIST's own files).
        device: where the features are computed.
        run_log: where the records go.
        hook: the kind of run's extras (:class:`ReportHook`).
        is_main: rank 0, the only one that evaluates.
    """

    def __init__(self, args: argparse.Namespace, dino: DINO, data_path: Optional[str], device: torch.device,
                 run_log: RunLog, hook: ReportHook, is_main: bool) -> None:
        self.args, self.dino, self.data_path, self.device = args, dino, data_path, device
        self.run_log, self.hook, self.is_main = run_log, hook, is_main
        self.subsets = [args.knn_train_subset, args.knn_test_subset]
        self.periodic_key = "knn_top1_subset" if any(self.subsets) else "knn_top1"
        self.random_init: Optional[float] = None

    def top1(self, train_n: Optional[int] = None, test_n: Optional[int] = None) -> float:
        """Weighted 20-NN top-1 (%) on the first ``train_n`` / ``test_n`` images (None: all)."""
        train_set, test_set = eval_datasets(self.args.dataset, self.data_path, self.args.in_chans,
                                            self.args.global_crop_size)
        return knn_top1(self.dino.teacher_backbone, first(train_set, train_n), first(test_set, test_n), self.device)

    def periodic(self, step: int) -> None:
        """The record of every ``--knn_every`` steps, on the subsets (nothing without the flag)."""
        if self.is_main and self.args.knn_every and step % self.args.knn_every == 0:
            self.run_log.metrics({"step": step, self.periodic_key: self.top1(*self.subsets),
                                  "knn_subset": self.subsets})

    def at_random_init(self) -> None:
        """Step 0 of a fresh run: the first periodic record and, unless ``--no_final_knn``, the
        baselines the final table compares with, said and logged (the hook's too)."""
        self.periodic(0)
        if not self.is_main or self.args.no_final_knn:
            return
        self.random_init = top1 = self.top1()
        print(f"k-NN top-1 at random init: {top1:.2f}%", flush=True)
        self.run_log.metrics({"step": 0, "knn_top1": top1, "random_init": True})
        self.hook.at_random_init(self.dino.teacher_backbone)

    def final(self, out: Path) -> None:
        """After the last step: the k-NN on the whole sets, the hook's extras, summary.json and the table."""
        step = self.dino.step
        top1 = self.top1()
        self.run_log.metrics({"step": step, "knn_top1": top1, "final": True})
        extras = self.hook.at_end(self.dino.teacher_backbone, step)
        final_report(out, self.args.arch, step, top1, self.random_init, extras)
