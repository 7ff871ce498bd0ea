"""A small ConvNet for 28x28 greyscale images (Fashion-MNIST), fast enough for 2 CPU cores."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..validate import check_positive_ints


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ConvNet(nn.Module):
    """Stages of two 3x3 conv-BN-ReLU, 2x2 max-pool between stages, adaptive average pool.

    Widths double per stage (``width``, ``2 width``, ...). The last feature map is average-pooled
    to ``pool x pool`` cells and flattened: ``pool=1`` is global average pooling; ``pool=2`` keeps
    a coarse layout (top/bottom, left/right), which matters for small grey images where the shape
    is the class. Any input size works, so global and local crops share the network.

    Shapes: (B, in_chans, H, W) -> (B, embed_dim) with ``embed_dim = width * 2**(stages-1) * pool**2``.
    """

    def __init__(self, in_chans: int = 1, width: int = 32, stages: int = 3, pool: int = 1) -> None:
        super().__init__()
        in_chans, width, stages, pool = check_positive_ints(in_chans=in_chans, width=width, stages=stages, pool=pool)
        layers: list[nn.Module] = []
        c_in = in_chans
        for i in range(stages):
            c_out = width * 2**i
            if i > 0:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            layers.append(_stage(c_in, c_out))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.in_chans = in_chans
        self.pool = pool
        self.embed_dim = c_in * pool * pool

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        if self.pool == 1:
            return x.mean(dim=(2, 3))
        return F.adaptive_avg_pool2d(x, self.pool).flatten(1)
