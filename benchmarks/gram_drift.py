"""Patch-similarity drift between two dino-train checkpoints: mean |G_end - G_start| over test images.

Issue 19's Gram anchoring measure: G is each image's (N, N) Gram matrix of the teacher backbone's
L2-normalised final-norm patch tokens (DINOv2's ``x_norm_patchtokens``), the quantity Gram anchoring
holds close to an earlier snapshot's; the drift is the mean absolute entry difference over the
first ``count`` test images (diagonal included, as the loss's mean). Same protocol as
``patch_token_knn.py`` (the checkpoints' own network and data).

    python benchmarks/gram_drift.py START.pth END.pth [count]
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout, not installed
from dino_pytorch.cli import eval_knn  # noqa: E402
from dino_pytorch.cli._setup import eval_setup, first, make_loader  # noqa: E402


@torch.no_grad()
def patch_grams(path: str, count: int) -> torch.Tensor:
    """(count, N, N) Gram matrices of the normalised patch tokens of the checkpoint's teacher backbone."""
    args = eval_knn.build_parser().parse_args(["--pretrained_weights", path, "--device", "cpu", "--num_workers", "0"])
    model, _, test_set, device = eval_setup(args, train_augment=False)
    model = getattr(model, "model", model).eval()
    grams = []
    for images, _ in make_loader(first(test_set, count), 250, 0, device):
        patches = F.normalize(model.forward_features(images)["x_norm_patchtokens"], dim=-1)
        grams.append(patches @ patches.transpose(1, 2))
    return torch.cat(grams)


def main(start: str, end: str, count: int = 1000) -> float:
    drift = (patch_grams(end, count) - patch_grams(start, count)).abs().mean().item()
    print(json.dumps({"start": start, "end": end, "images": count, "gram_drift": round(drift, 5)}))
    return drift


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:4]))
