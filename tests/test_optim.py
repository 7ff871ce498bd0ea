import math

import pytest
import torch
from torch import nn

from dino_pytorch import DINOHead
from dino_pytorch.diagnostics import collapse_metrics
from dino_pytorch.optim import (
    LARS,
    build_optimizer,
    cancel_gradients_,
    clip_gradients_,
    get_params_groups,
    set_schedules,
)


def official_clip(model, clip):
    """The official utils.clip_gradients, loop and .item() included."""
    norms = []
    for p in model.parameters():
        if p.grad is not None:
            n = p.grad.data.norm(2)
            norms.append(n.item())
            coef = clip / (n + 1e-6)
            if coef < 1:
                p.grad.data.mul_(coef)
    return norms


def model_with_grads(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    (m(torch.randn(5, 6)) * 50).pow(2).sum().backward()
    return m


def test_clip_equals_official_per_parameter_clip():
    ours, ref = model_with_grads(), model_with_grads()
    norms = clip_gradients_(ours.parameters(), 3.0)
    ref_norms = official_clip(ref, 3.0)
    assert [n.item() for n in norms] == pytest.approx(ref_norms, rel=1e-6)
    assert any(n > 3 for n in ref_norms)  # the case exercises the clipping branch
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=0)
    assert all(p.grad.norm() <= 3.0 + 1e-4 for p in ours.parameters())


def test_clip_leaves_small_gradients_untouched_bitwise():
    m = model_with_grads()
    for p in m.parameters():
        p.grad.mul_(1e-6)
    before = [p.grad.clone() for p in m.parameters()]
    clip_gradients_(m.parameters(), 3.0)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, m.parameters()))


def test_params_groups_follow_official_rules():
    head = DINOHead(8, 16, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    decayed, plain = get_params_groups(head)
    names = {id(p): n for n, p in head.named_parameters()}
    assert {names[id(p)] for p in plain["params"]} == {"mlp.0.bias", "mlp.2.bias", "mlp.4.bias"}
    assert "last_layer.parametrizations.weight.original0" in {names[id(p)] for p in decayed["params"]}  # official quirk
    assert plain["weight_decay"] == 0.0
    frozen = DINOHead(8, 16, hidden_dim=8, bottleneck_dim=4)
    trainable = [p for p in frozen.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in get_params_groups(frozen)) == len(trainable)


def test_set_schedules_decays_group_zero_only():
    opt = build_optimizer("adamw", get_params_groups(model_with_grads()))
    set_schedules(opt, 0.1, 0.3)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]
    with pytest.raises(ValueError, match="optimizer='adam'"):
        build_optimizer("adam", [])


def test_cancel_gradients_skips_adamw_update():
    m = model_with_grads()
    opt = torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.5)
    before = m[2].weight.clone()
    cancel_gradients_(list(m[2].parameters()))
    opt.step()
    assert torch.equal(m[2].weight, before) and not opt.state.get(m[2].weight)


def naive_lars(params, grads_per_step, groups, mu=None):
    """The official DINO utils.LARS step loop, float64, one tensor at a time.

    params: list of tensors; grads_per_step: list (steps) of lists of grads; groups: per param
    (lr, weight_decay, momentum, eta); mu: initial momentum buffers (None: zeros, created lazily).
    """
    params = [p.double().clone() for p in params]
    mu = [None if m is None else m.double().clone() for m in (mu or [None] * len(params))]
    for grads in grads_per_step:
        for i, (p, g) in enumerate(zip(params, grads)):
            lr, wd, momentum, eta = groups[i]
            dp = g.double()
            if p.ndim != 1:
                dp = dp + wd * p
                param_norm, update_norm = p.norm().item(), dp.norm().item()
                q = eta * param_norm / update_norm if param_norm > 0 and update_norm > 0 else 1.0
                dp = dp * q
            mu[i] = dp if mu[i] is None else momentum * mu[i] + dp
            params[i] = p - lr * mu[i]
    return params, mu


def test_lars_several_steps_against_naive_official_loop():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 6, generator=g)  # decayed and adapted
    conv = torch.randn(4, 2, 3, 3, generator=g)  # ndim 4: decayed and adapted, with a momentum state
    bias = torch.randn(8, generator=g)  # ndim 1: neither
    zero = torch.zeros(5, 3)  # ||p|| = 0: trust ratio 1
    start = [weight, conv, bias, zero]
    mu0 = [None, torch.randn(4, 2, 3, 3, generator=g), torch.randn(8, generator=g), None]
    steps = [[torch.randn(p.shape, generator=g) * (k + 1) for p in start] for k in range(4)]
    params = [torch.nn.Parameter(p.clone()) for p in start]
    opt = LARS([{"params": params[:2], "lr": 0.5, "weight_decay": 0.1},
                {"params": params[2:], "lr": 0.2, "weight_decay": 0.3, "momentum": 0.8, "eta": 0.01}],
               momentum=0.9, eta=0.001)
    opt.state[params[1]]["mu"] = mu0[1].clone()  # resumed: non-zero momentum state
    opt.state[params[2]]["mu"] = mu0[2].clone()
    for grads in steps:
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        opt.step()
    groups = [(0.5, 0.1, 0.9, 0.001)] * 2 + [(0.2, 0.3, 0.8, 0.01)] * 2
    ref, ref_mu = naive_lars(start, steps, groups, mu0)
    for i, (p, r, m) in enumerate(zip(params, ref, ref_mu)):
        scale = (r - start[i].double()).abs().max()
        assert scale > 1e-4, f"param {i} barely moved: the check would be empty"
        assert (p.detach().double() - r).abs().max() <= 1e-5 * scale + 1e-7, f"param {i}"
        assert torch.allclose(opt.state[p]["mu"].double(), m, rtol=1e-5, atol=1e-7), f"momentum of param {i}"


def test_lars_skips_parameters_without_gradient():
    p, q = torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.ones(3, 3))
    opt = LARS([p, q], lr=1.0, weight_decay=0.5)
    p.grad = torch.ones(3, 3)
    opt.step()
    assert torch.equal(q, torch.ones(3, 3)) and q not in opt.state
    assert not torch.equal(p, torch.ones(3, 3))


def test_collapse_metrics_on_known_distributions():
    k = 64
    uniform = torch.full((8, k), 1.0 / k)
    one_hot = torch.zeros(8, k)
    one_hot[:, 3] = 1.0
    diverse = torch.eye(k)[:8]
    m = collapse_metrics(uniform, torch.zeros(1, k))
    assert m["teacher_entropy"].item() == pytest.approx(math.log(k), rel=1e-5)
    assert m["teacher_kl_uniform"].item() == pytest.approx(0.0, abs=1e-5)
    m = collapse_metrics(one_hot, torch.ones(1, k))
    assert m["teacher_entropy"].item() == pytest.approx(0.0, abs=1e-5)
    assert m["teacher_kl_uniform"].item() == pytest.approx(math.log(k), rel=1e-5)
    assert m["center_norm"].item() == pytest.approx(8.0) and m["prototypes_used"].item() == 1
    m = collapse_metrics(diverse, torch.zeros(1, k))
    assert m["prototypes_used"].item() == 8
    assert m["teacher_kl_uniform"].item() == pytest.approx(math.log(k / 8), rel=1e-5)
