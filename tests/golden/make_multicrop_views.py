"""Views of the augmenters before the augment/ refactor, to prove the refactor keeps them."""
import torch
from PIL import Image

from dino_pytorch import BatchedMultiCrop, MultiCropTransform

g = torch.Generator().manual_seed(1234)
rgb = torch.randint(0, 256, (3, 3, 40, 36), generator=g, dtype=torch.uint8)
grey = torch.randint(0, 256, (2, 1, 28, 28), generator=g, dtype=torch.uint8)
out = {}
cfg = dict(global_crop_size=24, local_crop_size=12, local_crops_number=2)
t = MultiCropTransform(**cfg)
torch.manual_seed(7)
out["per_image_rgb"] = [torch.stack(t(im)[:2]) for im in rgb]
out["per_image_rgb_local"] = [torch.stack(t(im)[2:]) for im in rgb]
tg = MultiCropTransform(mean=(0.5,), std=(0.25,), **cfg)
torch.manual_seed(8)
out["per_image_grey"] = [torch.cat([v.flatten() for v in tg(im)]) for im in grey]
pil = Image.fromarray(rgb[0].permute(1, 2, 0).numpy())
torch.manual_seed(9)
out["per_image_pil"] = torch.cat([v.flatten() for v in t(pil)])
b = BatchedMultiCrop(**cfg)
out["batched_rgb"] = b(rgb, generator=torch.Generator().manual_seed(11))
bg = BatchedMultiCrop(mean=(0.5,), std=(0.25,), **cfg)
out["batched_grey"] = bg(grey, generator=torch.Generator().manual_seed(12))
torch.manual_seed(13)
out["batched_global_rng"] = b(rgb.float() / 255)
torch.save(out, __file__.replace("make_multicrop_views.py", "multicrop_views.pt"))
