import copy
import math
import warnings

import pytest
import torch

from dino_pytorch import DINOHead
from reference import official_head_forward


def official_state_dict(in_dim=32, out_dim=100, hidden=64, bottleneck=16, seed=0):
    """A state_dict in the official layout, with a trainable-looking (not unit) gain."""
    g = torch.Generator().manual_seed(seed)
    return {
        "mlp.0.weight": torch.randn(hidden, in_dim, generator=g) * 0.1,
        "mlp.0.bias": torch.randn(hidden, generator=g) * 0.1,
        "mlp.2.weight": torch.randn(hidden, hidden, generator=g) * 0.1,
        "mlp.2.bias": torch.randn(hidden, generator=g) * 0.1,
        "mlp.4.weight": torch.randn(bottleneck, hidden, generator=g) * 0.1,
        "mlp.4.bias": torch.randn(bottleneck, generator=g) * 0.1,
        "last_layer.weight_g": torch.rand(out_dim, 1, generator=g) + 0.5,
        "last_layer.weight_v": torch.randn(out_dim, bottleneck, generator=g),
    }


def test_official_state_dict_loads_and_matches_official_forward():
    state = official_state_dict()
    head = DINOHead(32, 100, hidden_dim=64, bottleneck_dim=16, norm_last_layer=False)
    head.load_state_dict(copy.deepcopy(state))
    x = torch.randn(8, 32)
    out = head(x)
    ref = official_head_forward(state, x)
    assert out.shape == (8, 100)
    assert (out.double() - ref).abs().max() / ref.abs().max() <= 1e-6
    # And back to the official layout, unchanged.
    back = head.official_state_dict()
    assert set(back) == set(state)
    for k in state:
        assert torch.equal(back[k], state[k])


def test_loads_inside_a_parent_module_with_prefix():
    state = {f"head.{k}": v for k, v in official_state_dict().items()}
    parent = torch.nn.Module()
    parent.head = DINOHead(32, 100, hidden_dim=64, bottleneck_dim=16)
    parent.load_state_dict(state)
    assert torch.equal(parent.head.last_layer.parametrizations.weight.original0, state["head.last_layer.weight_g"])


def test_official_init():
    torch.manual_seed(0)
    head = DINOHead(384, 4096)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(2048, 384), (2048, 2048), (256, 2048)]
    for m in linears:
        assert abs(m.weight.std().item() - 0.02) < 0.002
        assert torch.count_nonzero(m.bias) == 0
    v = head.last_layer.parametrizations.weight.original1
    g = head.last_layer.parametrizations.weight.original0
    # Default Linear init: kaiming-uniform U(+-1/sqrt(256)), std 1/sqrt(3*256) ~ 0.036.
    assert v.abs().max() <= 1 / math.sqrt(256) + 1e-7
    assert abs(v.std().item() - 1 / math.sqrt(3 * 256)) < 0.002
    assert torch.all(g == 1)
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(4096), atol=1e-5)
    assert isinstance(head.mlp[1], torch.nn.GELU) and head.mlp[1].approximate == "none"


def test_norm_last_layer_freezes_gain_only():
    frozen = DINOHead(16, 10, hidden_dim=8, bottleneck_dim=4)
    free = DINOHead(16, 10, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    g = frozen.last_layer.parametrizations.weight
    assert not g.original0.requires_grad and g.original1.requires_grad
    assert free.last_layer.parametrizations.weight.original0.requires_grad
    frozen(torch.randn(4, 16)).sum().backward()
    assert g.original0.grad is None and g.original1.grad is not None
    # Logits are cosines when the gain is 1.
    assert frozen(torch.randn(4, 16)).abs().max() <= 1 + 1e-6


def test_layer_indices_with_and_without_bn():
    assert [k for k in DINOHead(8, 4, hidden_dim=8, bottleneck_dim=4).state_dict() if k.startswith("mlp")] == [
        "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias"]
    bn = DINOHead(8, 4, use_bn=True, hidden_dim=8, bottleneck_dim=4)
    assert isinstance(bn.mlp[1], torch.nn.BatchNorm1d) and isinstance(bn.mlp[6], torch.nn.Linear)
    one = DINOHead(8, 4, nlayers=1, bottleneck_dim=4)
    assert isinstance(one.mlp, torch.nn.Linear)
    # The official head clamps nlayers with max(nlayers, 1); here 0 or less is named as an error.
    with pytest.raises(ValueError, match=r"nlayers=0, expected a positive int"):
        DINOHead(8, 4, nlayers=0)


def random_official_state(head, seed=0):
    """Random values for every entry of ``head``'s official-layout state_dict (BN statistics too)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in head.official_state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = value.clone()
        elif name.endswith("running_var") or name == "last_layer.weight_g":
            state[name] = torch.rand(value.shape, generator=g) + 0.5
        else:
            state[name] = torch.randn(value.shape, generator=g) * 0.3
    return state


@pytest.mark.parametrize("nlayers, use_bn", [(1, False), (2, False), (4, False), (2, True), (3, True), (4, True)])
def test_depths_and_batchnorm_match_official_forward_in_eval_mode(nlayers, use_bn):
    head = DINOHead(12, 40, use_bn=use_bn, nlayers=nlayers, hidden_dim=20, bottleneck_dim=6, norm_last_layer=False)
    state = random_official_state(head, seed=nlayers)
    head.load_state_dict(copy.deepcopy(state))
    x = torch.randn(7, 12, generator=torch.Generator().manual_seed(1))
    ref = official_head_forward(state, x, nlayers=nlayers, use_bn=use_bn)
    out = head.eval()(x)
    assert out.shape == (7, 40)
    assert (out.double() - ref).abs().max() / ref.abs().max() <= 1e-5
    if use_bn:  # BN really acts: without it the numbers are different
        plain = {k: v for k, v in state.items()}
        for k in [k for k in state if k.endswith("running_mean")]:
            plain[k] = torch.zeros_like(state[k])
        bn_off = official_head_forward(plain, x, nlayers=nlayers, use_bn=True)
        assert (bn_off - ref).abs().max() / ref.abs().max() > 1e-2


@pytest.mark.parametrize("nlayers", [2, 3])
def test_batchnorm_in_train_mode_uses_batch_statistics(nlayers):
    head = DINOHead(12, 40, use_bn=True, nlayers=nlayers, hidden_dim=20, bottleneck_dim=6, norm_last_layer=False)
    state = random_official_state(head, seed=5)
    head.load_state_dict(copy.deepcopy(state))
    x = torch.randn(9, 12, generator=torch.Generator().manual_seed(2))
    ref = official_head_forward(state, x, nlayers=nlayers, use_bn=True, bn_training=True)
    out = head.train()(x)
    assert (out.double() - ref).abs().max() / ref.abs().max() <= 1e-5
    eval_ref = official_head_forward(state, x, nlayers=nlayers, use_bn=True)
    assert (eval_ref - ref).abs().max() / ref.abs().max() > 1e-2  # the two modes differ on this input


def test_no_deprecation_warning_and_deepcopyable():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head = DINOHead(16, 10, hidden_dim=8, bottleneck_dim=4)
        clone = copy.deepcopy(head)
    x = torch.randn(3, 16)
    assert torch.equal(head(x), clone(x))
    assert clone.last_layer.parametrizations.weight.original1 is not head.last_layer.parametrizations.weight.original1


def test_half_precision_normalize_eps_is_representable():
    head = DINOHead(16, 10, hidden_dim=8, bottleneck_dim=4).half()
    out = head(torch.zeros(2, 16, dtype=torch.float16))  # zero bottleneck: 0 / eps must stay finite
    assert torch.isfinite(out).all()


def test_bad_dimensions():
    with pytest.raises(ValueError, match="out_dim=0"):
        DINOHead(16, 0)
    with pytest.raises(ValueError, match="in_dim"):
        DINOHead(-1, 10)
