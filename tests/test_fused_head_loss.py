"""The fused, chunked last layer + DINO cross-entropy (ops/fused_head_loss.py), alone and through DINO."""
import pytest
import torch

from dino_pytorch import DINO, DINOHead
from dino_pytorch.ops import RowStats, fused_last_layer_cross_entropy, multiview_cross_entropy


def rel(a, b):
    """Relative Frobenius error, as the issue states the tolerance."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def setup(views, teachers, batch, k, dim, norm_last_layer, seed=0):
    torch.manual_seed(seed)
    head = DINOHead(12, k, hidden_dim=24, bottleneck_dim=dim, norm_last_layer=norm_last_layer)
    with torch.no_grad():
        head.last_layer.parametrizations.weight.original0.uniform_(0.5, 2.0)  # g != 1: the scale matters
    feats = torch.randn(views * batch, 12)
    probs = torch.softmax(torch.randn(teachers, batch, k) / 0.07, dim=-1)
    return head, feats, probs


def unfused_and_fused(head, feats, probs, views, chunk_rows):
    params = [p for p in head.parameters() if p.requires_grad]
    loss = multiview_cross_entropy(head(feats), probs, 0.1)
    grads = torch.autograd.grad(loss, params)
    v, g = head.last_layer_weights()
    fused = fused_last_layer_cross_entropy(head.forward_bottleneck(feats), v, g, probs, 0.1, views, chunk_rows)
    fused_grads = torch.autograd.grad(fused, params)
    return loss, grads, fused, fused_grads


@pytest.mark.parametrize("norm_last_layer", [True, False])
@pytest.mark.parametrize(
    "views, teachers, batch, k, dim, chunk", [(4, 2, 3, 50, 8, 2), (10, 2, 5, 257, 16, None), (3, 3, 2, 64, 8, 1)]
)
def test_fused_matches_unfused_loss_and_every_gradient(norm_last_layer, views, teachers, batch, k, dim, chunk):
    head, feats, probs = setup(views, teachers, batch, k, dim, norm_last_layer)
    loss, grads, fused, fused_grads = unfused_and_fused(head, feats, probs, views, chunk)
    assert rel(fused, loss) <= 1e-5
    assert len(grads) == len(fused_grads)
    for a, b in zip(fused_grads, grads):  # MLP weights (through x), then g (if trainable) and v
        assert rel(a, b) <= 1e-5


def test_gradient_of_x_g_v_directly_and_stats():
    head, feats, probs = setup(6, 2, 4, 96, 8, norm_last_layer=False)
    x = head.forward_bottleneck(feats).detach()
    v, g = head.last_layer_weights()
    a = x.clone().requires_grad_(True)
    logits = head.last_layer(a)
    loss, stats = multiview_cross_entropy(logits, probs, 0.1, return_stats=True)
    loss.backward()
    ref = [a.grad, g.grad.clone(), v.grad.clone()]
    head.zero_grad(set_to_none=True)
    b = x.clone().requires_grad_(True)
    fused, fstats = fused_last_layer_cross_entropy(b, v, g, probs, 0.1, 6, chunk_rows=3, return_stats=True)
    fused.backward()
    for got, want in zip([b.grad, g.grad, v.grad], ref):
        assert rel(got, want) <= 1e-5
    assert isinstance(fstats, RowStats)
    assert rel(fstats.lse, torch.logsumexp(logits.detach() / 0.1, dim=-1)) <= 1e-6
    assert rel(fstats.teacher_entropy, stats.teacher_entropy) <= 1e-6
    # Scaled upstream gradient (not the root): gradients scale with it.
    head.zero_grad(set_to_none=True)
    (3.0 * fused_last_layer_cross_entropy(x, v, g, probs, 0.1, 6)).backward()
    assert rel(v.grad, 3.0 * ref[2]) <= 1e-5


def test_frozen_last_layer_gets_no_gradient():
    head, feats, probs = setup(4, 2, 3, 40, 8, norm_last_layer=True)
    head.last_layer.requires_grad_(False)
    v, g = head.last_layer_weights()
    x = head.forward_bottleneck(feats)
    fused_last_layer_cross_entropy(x, v, g, probs, 0.1, 4).backward()
    assert v.grad is None and g.grad is None
    assert all(p.grad is not None for p in head.mlp.parameters())


def test_bad_shapes_are_refused():
    head, feats, probs = setup(4, 2, 3, 40, 8, norm_last_layer=True)
    v, g = head.last_layer_weights()
    with pytest.raises(ValueError):
        fused_last_layer_cross_entropy(torch.randn(11, 8), v, g, probs, 0.1, 4)
    with pytest.raises(ValueError):
        fused_last_layer_cross_entropy(torch.randn(12, 8), v, g, probs[:, :2], 0.1, 4)


# -- reachable from DINO: fused_head_loss=True --------------------------------------------------
def test_dino_fused_head_loss_equals_the_unfused_step():
    def backbone():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    g = torch.Generator().manual_seed(5)
    views = [torch.randn(4, 3, 24, 24, generator=g) for _ in range(2)] + [
        torch.randn(4, 3, 12, 12, generator=g) for _ in range(3)]
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        dino = DINO(backbone(), out_dim=300, hidden_dim=32, bottleneck_dim=16, fused_head_loss=fused)
        loss = dino(views)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in dino.parameters() if p.requires_grad],
                        dino.criterion._center_sum.clone()))
    (l0, g0, c0), (l1, g1, c1) = results
    assert rel(l1, l0) <= 1e-6 and torch.equal(c1, c0)  # the same teacher statistics
    assert len(g0) == len(g1) and all(rel(b, a) <= 1e-5 for a, b in zip(g0, g1))
    with pytest.raises(TypeError, match="fused_head_loss='yes', expected True or False"):
        DINO(backbone(), out_dim=300, fused_head_loss="yes")
