"""Views keyed per sample (seeds=, SeededTransform, the training program's sample seeds), pinned when
the keyed draws were introduced: a sample's views depend on its seed only, not on its batch (the
file was rewritten in this script's format, from the same code and seeds).

``python tests/golden/make_keyed_views.py`` writes keyed_views.pt; what each entry holds, and why,
is in recording.py."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recording import batched, per_image, record_boxes  # noqa: E402

from dino_pytorch import BatchedMultiCrop, MultiCropTransform  # noqa: E402
from dino_pytorch.datasets import SeededTransform, sample_seeds  # noqa: E402


def make():
    g = torch.Generator().manual_seed(4321)
    rgb = torch.randint(0, 256, (3, 3, 40, 36), generator=g, dtype=torch.uint8)
    grey = torch.randint(0, 256, (2, 1, 28, 28), generator=g, dtype=torch.uint8)
    out = {}
    cfg = dict(global_crop_size=24, local_crop_size=12, local_crops_number=2)
    b = BatchedMultiCrop(**cfg)
    out["batched_keyed_rgb"] = batched(b, rgb, seeds=[11, 12, 2**63 - 2])
    bg = BatchedMultiCrop(mean=(0.5,), std=(0.25,), **cfg)
    out["batched_keyed_grey"] = batched(bg, grey.float() / 255, seeds=torch.tensor([0, 7]))
    # The training program: a sample's seed from (run seed, epoch * N + index), for either augmenter.
    keys = torch.tensor([0, 1, 2, 60_000 * 3 + 17])
    out["train_sample_seeds"] = sample_seeds(5, keys)
    transform = MultiCropTransform(mean=(0.5,), std=(0.25,), **cfg)
    boxes = record_boxes(transform)
    dataset = SeededTransform(list(zip(grey, [0, 1])), transform, seed=5, return_key=True)
    out["seeded_per_image"] = per_image(transform, boxes, [dataset[k][0] for k in (0, 1, 2 * 2 + 1)])
    return out


if __name__ == "__main__":
    torch.save(make(), Path(__file__).with_name("keyed_views.pt"))
