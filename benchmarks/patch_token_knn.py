"""Weighted 20-NN top-1 of a dino-train checkpoint's teacher backbone: the CLS token and the mean patch token.

Issue 18 compares DINO v1 with DINOv2's recipe on both: the CLS token is what DINO trains, the patch
tokens are what iBOT trains. Same protocol as ``dino-eval-knn`` (the checkpoint's own network and
data, L2-normalised features, T = 0.07), on the whole train set as the bank and the whole test set.

    python benchmarks/patch_token_knn.py runs/fashion_mnist_dinov2/dinov2/checkpoint.pth
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout, not installed
from dino_pytorch.cli import eval_knn  # noqa: E402
from dino_pytorch.cli._setup import eval_setup, make_loader  # noqa: E402
from dino_pytorch.eval.knn import knn_eval  # noqa: E402


@torch.no_grad()
def features(model: torch.nn.Module, loader: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, D) CLS features, (N, D) mean patch tokens, (N,) labels; both L2-normalised."""
    cls, patch, labels = [], [], []
    for images, target in loader:  # type: ignore[attr-defined]
        out = model.forward_features(images)  # type: ignore[operator]
        cls.append(F.normalize(out["x_norm_clstoken"], dim=-1))
        patch.append(F.normalize(out["x_norm_patchtokens"].mean(dim=1), dim=-1))
        labels.append(target)
    return torch.cat(cls), torch.cat(patch), torch.cat(labels)


def main(path: str) -> dict[str, float]:
    args = eval_knn.build_parser().parse_args(["--pretrained_weights", path, "--device", "cpu", "--num_workers", "1"])
    model, train_set, test_set, device = eval_setup(args, train_augment=False)
    model = getattr(model, "model", model).eval()  # the ViT itself, should a feature wrapper hold it
    start = time.perf_counter()
    train = features(model, make_loader(train_set, 256, 1, device))
    test = features(model, make_loader(test_set, 256, 1, device))
    result = {}
    for i, name in enumerate(("cls_20nn_top1", "mean_patch_20nn_top1")):
        result[name] = knn_eval(train[i], train[2], test[i], test[2], (20,), 0.07)[20][0]
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps({"checkpoint": path, **result}))
    return result


if __name__ == "__main__":
    main(sys.argv[1])
