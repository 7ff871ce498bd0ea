"""What dino-train writes besides checkpoints and the k-NN report (:mod:`.train_evals`):
metrics.jsonl, the official log.txt, a progress bar, curves, attention maps and a hook's pictures,
and (``--tensorboard``) the same scalars and pictures as TensorBoard events. Only rank 0 writes.

tqdm, matplotlib and tensorboard are optional extras: without them each missing picture, bar or
event file costs one line of output, never the run.
"""
from __future__ import annotations

import json
import numbers
import sys
from pathlib import Path
from typing import Any, Optional

from torch import nn

from ..diagnostics import CollapseMonitor
from ..model_config import is_vit
from ._setup import eval_datasets, optional_extra
from .report_hook import ReportHook

TENSORBOARD_DIR = "tensorboard"


class RunLog:
    """metrics.jsonl (every record), log.txt (one official line per epoch), the progress display,
    and with ``tensorboard`` the records' numbers as TensorBoard scalars in ``out/tensorboard``."""

    def __init__(self, out: Path, is_main: bool, tensorboard: bool = False,
                 monitor: Optional[CollapseMonitor] = None) -> None:
        self.out, self.is_main, self.monitor = out, is_main, monitor
        self.bar: Any = None
        self.writer: Any = None
        self.last_step = 0
        if tensorboard and is_main and optional_extra("tensorboard", "TensorBoard logging", extra="tensorboard"):
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / TENSORBOARD_DIR))

    def start_progress(self, total_steps: int, start_step: int) -> None:
        """A tqdm bar from here on (rank 0, when tqdm is installed); else records go to stdout."""
        if self.is_main and optional_extra("tqdm", "progress bar") is not None:
            from tqdm import tqdm

            # Redirected to a file, a bar redrawn 10 times a second floods the log: redraw every 30 s.
            interval = 0.1 if sys.stderr.isatty() else 30.0
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="DINO",
                            mininterval=interval, maxinterval=max(interval, 10.0))

    def metrics(self, record: dict[str, Any]) -> None:
        """One record to metrics.jsonl and, with TensorBoard, each of its numbers at x = its step."""
        if self.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            self.last_step = step = int(record.get("step", self.last_step))
            for key, value in record.items():
                # Flags (random_init, final) are bools, which are Integral too: they are not curves.
                if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)

    def step(self, record: dict[str, Any]) -> None:
        """A training-step record: to metrics.jsonl, and to the bar (or stdout without one). The
        collapse monitor reads it: a collapse is said once on stderr and recorded under "collapse"."""
        warning = self.monitor.check(record["step"], record) if self.monitor is not None else None
        if warning is not None:
            record = {**record, "collapse": warning}
            if self.is_main:
                print(f"warning: {warning}", file=sys.stderr, flush=True)
        self.metrics(record)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['train_loss']:.3f}", lr=f"{record['lr']:.2e}",
                                 m=f"{record['momentum']:.4f}", t_temp=f"{record['teacher_temp']:.3f}",
                                 H=f"{record['teacher_entropy']:.2f}")
        elif self.is_main:
            print(json.dumps(record), flush=True)

    def epoch(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.out / "log.txt", "a") as f:
                f.write(json.dumps(record) + "\n")

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        """End of the training loop: the bar goes; TensorBoard is flushed but stays open for the
        final k-NN record and the pictures (:meth:`finish`)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.flush()

    def finish(self, pictures: list[Path]) -> None:
        """Add ``pictures`` (PNG files; those missing are skipped) to TensorBoard at the last step, and close it."""
        if self.writer is None:
            return
        import numpy as np
        from PIL import Image  # a torchvision dependency

        for path in pictures:
            if path.exists():
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                tag = path.relative_to(self.out).with_suffix("").as_posix()
                self.writer.add_image(tag, pixels, self.last_step, dataformats="HWC")
        self.writer.close()
        self.writer = None

    def fail(self, message: str) -> int:
        """End the run on a failure (a non-finite step, a failed save): one line on stderr; returns
        exit status 1."""
        self.close()
        self.finish([])
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 1


def write_pictures(out: Path, backbone: nn.Module, config: dict[str, Any], attention_maps: int,
                   data_path: Optional[str] = None, run_log: Optional[RunLog] = None,
                   hook: Optional[ReportHook] = None) -> None:
    """curves.png from metrics.jsonl, ``hook``'s pictures (the demo's retrieval.png) and (ViT only)
    the attention maps of the first test images; then :meth:`RunLog.finish` puts them in
    TensorBoard (when it is on) and closes it. dino-train passes its hook with the final k-NN only
    (not under ``--no_final_knn``): retrieval.png costs a feature pass over the training set."""
    drawn_by_hook: list[Path] = []
    try:
        _draw_pictures(out, backbone, config, attention_maps, data_path, hook, drawn_by_hook)
    finally:
        if run_log is not None:
            run_log.finish([out / "curves.png", *drawn_by_hook, *sorted((out / "attention").rglob("*.png"))])


def _draw_pictures(out: Path, backbone: nn.Module, config: dict[str, Any], attention_maps: int,
                   data_path: Optional[str], hook: Optional[ReportHook], drawn_by_hook: list[Path]) -> None:
    if optional_extra("matplotlib", "curves.png, attention maps and retrieval.png") is None:
        return
    from ..curves import plot_curves

    if (out / "metrics.jsonl").exists():
        plot_curves(out / "metrics.jsonl", out / "curves.png")
    if hook is not None:
        drawn_by_hook.extend(hook.draw_pictures(out, backbone))
    if is_vit(config) and attention_maps > 0:
        from ..attention import save_dataset_attention_maps

        data = config["data"]
        test_images = eval_datasets(data["dataset"], data_path, data["in_chans"], data["image_size"],
                                    subset=attention_maps)[1]
        save_dataset_attention_maps(backbone, test_images, out / "attention", attention_maps)
