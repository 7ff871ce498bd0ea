"""Views keyed per sample (seeds=, SeededTransform, the training program's sample seeds), pinned when
the keyed draws were introduced: a sample's views depend on its seed only, not on its batch."""
import torch

from dino_pytorch import BatchedMultiCrop, MultiCropTransform
from dino_pytorch.datasets import SeededTransform, sample_seeds

g = torch.Generator().manual_seed(4321)
rgb = torch.randint(0, 256, (3, 3, 40, 36), generator=g, dtype=torch.uint8)
grey = torch.randint(0, 256, (2, 1, 28, 28), generator=g, dtype=torch.uint8)
out = {}
cfg = dict(global_crop_size=24, local_crop_size=12, local_crops_number=2)
b = BatchedMultiCrop(**cfg)
out["batched_keyed_rgb"] = b(rgb, seeds=[11, 12, 2**63 - 2])
bg = BatchedMultiCrop(mean=(0.5,), std=(0.25,), **cfg)
out["batched_keyed_grey"] = bg(grey.float() / 255, seeds=torch.tensor([0, 7]))
# The training program: a sample's seed from (run seed, epoch * N + index), for either augmenter.
keys = torch.tensor([0, 1, 2, 60_000 * 3 + 17])
out["train_sample_seeds"] = sample_seeds(5, keys)
dataset = SeededTransform(list(zip(grey, [0, 1])), MultiCropTransform(mean=(0.5,), std=(0.25,), **cfg), seed=5,
                          return_key=True)
out["seeded_per_image"] = [torch.cat([v.flatten() for v in dataset[k][0]]) for k in (0, 1, 2 * 2 + 1)]
torch.save(out, __file__.replace("make_keyed_views.py", "keyed_views.pt"))
