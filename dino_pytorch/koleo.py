"""KoLeoLoss: the Kozachenko-Leonenko entropy regulariser of DINOv2, which spreads features apart.

For features ``x`` (B, D), each row is L2-normalised (eps 1e-8), its nearest *other* row ``j(i)`` is
the one of largest inner product, and

    loss = -mean_i log(||x_i - x_j(i) + 1e-8||_2 + 1e-8)

(``nn.PairwiseDistance(p=2, eps=1e-8)`` adds the eps to the difference, as here). A batch whose
features collapse onto one point has distances near 0 and a large loss; DINOv2 adds it with weight
0.1 on the student backbone's features of each global view separately (both views in one set would
make each row's neighbour its own other view).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS = 1e-8


class KoLeoLoss(nn.Module):
    """``KoLeoLoss()(features)``: floating features (B, D) with B >= 2 and D >= 1 -> 0-dim float32 loss
    (float64 kept). Shapes and dtype are checked (metadata: no device sync), values are not."""

    def forward(self, features: Tensor) -> Tensor:
        if not isinstance(features, Tensor):
            raise TypeError(f"features is a {type(features).__name__}, expected a (B, D) floating-point tensor")
        if not features.is_floating_point():
            raise TypeError(f"features has dtype {features.dtype}, expected a (B, D) floating-point tensor")
        if features.ndim != 2:
            raise ValueError(f"features has shape {tuple(features.shape)}, expected (B, D) with B >= 2")
        if features.shape[0] < 2:
            raise ValueError(f"features has B={features.shape[0]} rows, expected B >= 2 (each row needs a neighbour)")
        if features.shape[1] < 1:
            raise ValueError(f"features has D={features.shape[1]} columns, expected D >= 1")
        dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=features.device.type, enabled=False):
            x = F.normalize(features.to(dtype), p=2, dim=-1, eps=EPS)
            with torch.no_grad():  # the neighbour choice is an argmax: no gradient through it
                similarity = x @ x.t()
                similarity.fill_diagonal_(float("-inf"))  # never one's own row
                neighbour = similarity.argmax(dim=1)
            distance = torch.linalg.vector_norm(x - x[neighbour] + EPS, dim=-1)
            return -torch.log(distance + EPS).mean()
