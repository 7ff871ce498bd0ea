"""The three-line DINO wrapper on real data: Fashion-MNIST, a small ConvNet, your own loop.

    python examples/three_lines_fashion_mnist.py --steps 300      (after `make venv data`)

`make demo` runs the full reference script instead (k-NN, curves, attention maps).
"""
import argparse
import time

import torch
from torch.utils.data import DataLoader

from dino_pytorch import DINO, MultiCropTransform
from dino_pytorch.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD, FashionMNIST
from dino_pytorch.models import ConvNet

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--batch_size", type=int, default=64)
parser.add_argument("--out_dim", type=int, default=4096)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.manual_seed(args.seed)

transform = MultiCropTransform(
    global_crop_size=28, local_crop_size=16, local_crops_number=6, local_crops_scale=(0.1, 0.4),
    mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD,
)
loader = DataLoader(FashionMNIST(train=True, transform=transform), batch_size=args.batch_size,
                    shuffle=True, drop_last=True, num_workers=1, persistent_workers=True)

backbone = ConvNet(in_chans=1, width=16, pool=2)
# Settings that make DINO learn quickly on small grey images (docs/results.md): BN in the head,
# a small head, a fast teacher.
dino = DINO(backbone, out_dim=args.out_dim, use_bn=True, hidden_dim=512, bottleneck_dim=128,
            momentum_teacher=0.99, total_steps=args.steps)
optimizer = torch.optim.AdamW([p for p in dino.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.04)

step, start = 0, time.time()
while step < args.steps:
    for views, _ in loader:
        loss = dino(views)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        dino.update_teacher()
        step += 1
        if step % 25 == 0 or step == 1:
            print(f"step {step:4d}/{args.steps}  loss {loss.item():.4f}  {time.time() - start:6.1f}s", flush=True)
        if step == args.steps:
            break
