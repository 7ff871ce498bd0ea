"""The Fashion-MNIST demo's extras on dino-train (``make demo``, docs/results.md): the raw-pixel
k-NN baseline, the share of a ViT's CLS attention on the garment, and retrieval.png.

dino-train hangs :class:`FashionMNISTDemo` on a Fashion-MNIST run as its
:class:`~dino_pytorch.cli.report_hook.ReportHook`; the trainer itself knows none of these pictures
and numbers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..attention import ForegroundShare, cls_attention_foreground_share, patch_foreground
from ..model_config import is_vit
from ._setup import eval_datasets, make_loader
from .report_hook import ReportExtras, ReportHook
from .train_report import RunLog

# The first test images whose CLS attention share on the garment the demo reports.
GARMENT_IMAGES = 1000


class FashionMNISTDemo(ReportHook):
    """The demo's extras: at random init the garment share (a ViT); at the end the raw-pixel k-NN
    row, the garment share against its random-init value, and retrieval.png.

    Args:
        config: the run's model configuration (``config["data"]`` names the data set and image size).
        run_log: where the garment shares are recorded (metrics.jsonl).
        data_path: Fashion-MNIST's folder (None: the default location).
    """

    def __init__(self, config: dict[str, Any], run_log: RunLog, data_path: Optional[str] = None) -> None:
        self.config, self.run_log, self.data_path = config, run_log, data_path
        self.garment_at_init: Optional[ForegroundShare] = None

    def at_random_init(self, backbone: nn.Module) -> None:
        self.garment_at_init = garment_attention(self.run_log, backbone, self.config, 0, random_init=True)
        if self.garment_at_init is not None:
            print(f"CLS attention on the garment at random init: {self.garment_at_init.share:.1f}% "
                  f"(uniform {self.garment_at_init.uniform:.1f}%)", flush=True)

    def at_end(self, backbone: nn.Module, step: int) -> ReportExtras:
        raw = raw_pixel_knn(self.data_path)
        return demo_extras(raw, garment_attention(self.run_log, backbone, self.config, step), self.garment_at_init)

    def draw_pictures(self, out: Path, backbone: nn.Module) -> list[Path]:
        retrieval_picture(out / "retrieval.png", backbone, self.config, self.data_path)
        return [out / "retrieval.png"]


def demo_extras(raw_pixels: float, garment: Optional[ForegroundShare],
                garment_at_init: Optional[ForegroundShare]) -> ReportExtras:
    """The final report's "raw pixels" row and, with ``garment`` (a ViT), the share on the garment:
    summary.json entries and one line after the table."""
    extras = ReportExtras(rows=[("raw pixels", raw_pixels)], summary={"knn_top1_raw_pixels": raw_pixels})
    if garment is None:
        return extras
    extras.summary.update(cls_foreground_share=garment.share, cls_foreground_share_uniform=garment.uniform,
                          cls_foreground_share_random_init=None if garment_at_init is None else garment_at_init.share)
    before = f"random init {garment_at_init.share:.1f}% -> " if garment_at_init is not None else ""
    extras.lines.append(f"CLS attention on the garment (last block, first {GARMENT_IMAGES:,} test images): {before}"
                        f"after DINO {garment.share:.1f}% (uniform {garment.uniform:.1f}%)")
    return extras


@torch.no_grad()
def raw_pixel_knn(data_path: Optional[str] = None) -> float:
    """The baseline row: the same weighted 20-NN on raw pixels in [0, 1] (cosine), train -> test."""
    from ..datasets import load_fashion_mnist
    from ..eval.knn import knn_classifier

    (train_x, train_y), (test_x, test_y) = load_fashion_mnist(True, data_path), load_fashion_mnist(False, data_path)

    def flat(x: Tensor) -> Tensor:
        return torch.nn.functional.normalize(x.flatten(1).float().div_(255), dim=1)

    return knn_classifier(flat(train_x), train_y, flat(test_x), test_y, k=20, T=0.07)[0]


def garment_attention(run_log: RunLog, backbone: nn.Module, config: dict[str, Any], step: int,
                      random_init: bool = False) -> Optional[ForegroundShare]:
    """A ViT on Fashion-MNIST: the share of the last block's CLS attention on the garment (patches
    holding any non-zero raw pixel) over the first ``GARMENT_IMAGES`` test images, logged to
    metrics.jsonl (flagged ``random_init`` or ``final``); None for other runs."""
    data = config["data"]
    if not is_vit(config) or data["dataset"] != "fashion_mnist":
        return None
    from ..datasets import load_fashion_mnist

    test_set = eval_datasets("fashion_mnist", None, data["in_chans"], data["image_size"], subset=GARMENT_IMAGES)[1]
    images = next(iter(make_loader(test_set, GARMENT_IMAGES, 0, torch.device("cpu"))))[0]  # as the k-NN sees them
    ink = load_fashion_mnist(False)[0][: len(images)] != 0  # (N, 1, 28, 28): the raw garment
    if ink.shape[-1] != images.shape[-1]:  # --global_crop_size other than 28: the images were resized
        ink = torch.nn.functional.interpolate(ink.float(), size=images.shape[-2:], mode="nearest") > 0
    patch_size = int(backbone.patch_size)  # type: ignore[arg-type]
    result = cls_attention_foreground_share(backbone, images, patch_foreground(ink, patch_size), patch_size)
    run_log.metrics({"step": step, "cls_foreground_share": result.share, "cls_foreground_uniform": result.uniform,
                     "random_init" if random_init else "final": True})
    return result


@torch.no_grad()
def retrieval_picture(png: Path, backbone: nn.Module, config: dict[str, Any], data_path: Optional[str]) -> None:
    """retrieval.png: the first test image of each of the first 8 classes present, its 5 nearest training
    images (all 60k) by raw pixels, then by the backbone's features. One feature pass over the
    training set (minutes for a ViT on one CPU thread); the pixels are the [0, 255] images the
    raw-pixel k-NN baseline compares."""
    from torch.utils.data import Subset

    from ..datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
    from ..eval.knn import extract_features
    from ..retrieval import first_of_each_class, nearest_neighbours, save_retrieval_grid

    data = config["data"]
    train_set, test_set = eval_datasets("fashion_mnist", data_path, data["in_chans"], data["image_size"])
    (train_x, train_y), (test_x, test_y) = load_fashion_mnist(True, data_path), load_fashion_mnist(False, data_path)
    # The first 8 classes present: FASHION_MNIST_DIR may hold a subset of the classes (a half, say).
    queries = first_of_each_class(test_y, torch.unique(torch.as_tensor(test_y))[:8].tolist())
    device = next(backbone.parameters()).device
    train_f = extract_features(backbone, make_loader(train_set, 512, 0, device), device)[0]
    query_f = extract_features(backbone, make_loader(Subset(test_set, queries.tolist()), 512, 0, device), device)[0]
    neighbours = {
        "raw pixels": nearest_neighbours(train_x.flatten(1).float(), test_x[queries].flatten(1).float(), 5),
        "DINO features": nearest_neighbours(train_f, query_f, 5).cpu(),
    }
    save_retrieval_grid(png, test_x[queries], train_x, neighbours, test_y[queries], train_y, FASHION_MNIST_CLASSES)
