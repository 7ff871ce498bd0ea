"""KoLeoLoss against a naive float64 loop of DINOv2's definition."""
from __future__ import annotations

import math

import pytest
import torch

from dino_pytorch import KoLeoLoss


def naive_koleo(features):
    x = [[v / max(math.sqrt(sum(u * u for u in row)), 1e-8) for v in row] for row in features.double().tolist()]
    total = 0.0
    for i, xi in enumerate(x):
        dots = [sum(a * b for a, b in zip(xi, xj)) if j != i else -math.inf for j, xj in enumerate(x)]
        j = max(range(len(x)), key=lambda k: dots[k])
        distance = math.sqrt(sum((a - b + 1e-8) ** 2 for a, b in zip(xi, x[j])))
        total += -math.log(distance + 1e-8)
    return total / len(x)


@pytest.mark.parametrize("batch,dim", [(2, 3), (7, 5), (16, 32)])
def test_matches_the_naive_reference(batch, dim):
    features = torch.randn(batch, dim, generator=torch.Generator().manual_seed(batch))
    loss = KoLeoLoss()(features)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(naive_koleo(features), rel=1e-5, abs=1e-5)
    assert KoLeoLoss()(features.double()).item() == pytest.approx(naive_koleo(features), rel=1e-12, abs=1e-12)


def test_gradient_matches_float64_autograd_and_spreads_points():
    features = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda f: KoLeoLoss()(f), (features,))
    close = torch.tensor([[1.0, 0.0], [1.0, 1e-3], [0.0, 1.0]])
    spread = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    assert KoLeoLoss()(close) > KoLeoLoss()(spread)  # near-duplicates cost more


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="B=1"):
        KoLeoLoss()(torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        KoLeoLoss()(torch.randn(4))
