"""Views of the augmenters before the augment/ refactor, to prove the refactor keeps them (the file
was rewritten in this script's format, from the same code and seeds, so it still pins those views).

``python tests/golden/make_multicrop_views.py`` writes multicrop_views.pt; what each entry holds, and
why, is in recording.py."""
import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recording import batched, per_image, record_boxes  # noqa: E402

from dino_pytorch import BatchedMultiCrop, MultiCropTransform  # noqa: E402


def make():
    g = torch.Generator().manual_seed(1234)
    rgb = torch.randint(0, 256, (3, 3, 40, 36), generator=g, dtype=torch.uint8)
    grey = torch.randint(0, 256, (2, 1, 28, 28), generator=g, dtype=torch.uint8)
    out = {}
    cfg = dict(global_crop_size=24, local_crop_size=12, local_crops_number=2)
    t = MultiCropTransform(**cfg)
    boxes = record_boxes(t)
    torch.manual_seed(7)
    out["per_image_rgb"] = per_image(t, boxes, [t(im) for im in rgb])
    # The stream continued: the file before the refactor kept only the local views of this pass.
    out["per_image_rgb_continued"] = per_image(t, boxes, [t(im) for im in rgb])
    tg = MultiCropTransform(mean=(0.5,), std=(0.25,), **cfg)
    grey_boxes = record_boxes(tg)
    torch.manual_seed(8)
    out["per_image_grey"] = per_image(tg, grey_boxes, [tg(im) for im in grey])
    pil = Image.fromarray(rgb[0].permute(1, 2, 0).numpy())
    torch.manual_seed(9)
    out["per_image_pil"] = per_image(t, boxes, [t(pil)])
    b = BatchedMultiCrop(**cfg)
    out["batched_rgb"] = batched(b, rgb, generator=torch.Generator().manual_seed(11))
    bg = BatchedMultiCrop(mean=(0.5,), std=(0.25,), **cfg)
    out["batched_grey"] = batched(bg, grey, generator=torch.Generator().manual_seed(12))
    torch.manual_seed(13)
    out["batched_global_rng"] = batched(b, rgb.float() / 255)
    return out


if __name__ == "__main__":
    torch.save(make(), Path(__file__).with_name("multicrop_views.pt"))
