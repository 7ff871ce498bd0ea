"""adapt_input_channels: a 3-channel model made N-channel by timm's rule, exact where the rule says so."""
import copy

import pytest
import timm
import torch
from torch import nn
from torchvision.models import resnet18

from dino_pytorch.features import first_conv_channels
from dino_pytorch.models import ConvNet, adapt_input_channels, vit_tiny
from dino_pytorch.models.adapt_channels import adapt_rgb_weight, find_input_conv

SIDE = 32


def _vit() -> nn.Module:
    return vit_tiny(depth=1, img_size=SIDE, patch_size=8)


def _convnet() -> nn.Module:
    return ConvNet(in_chans=3, width=4, stages=2)


def _resnet() -> nn.Module:
    return resnet18(weights=None)


def _timm_vit() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIDE, depth=1, num_classes=0)


MODELS = {"vit": (_vit, "patch_embed.proj"), "convnet": (_convnet, "features.0.0"),
          "resnet18": (_resnet, "conv1"), "timm_vit": (_timm_vit, "patch_embed.proj")}


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request):
    """(factory, conv name, RGB model in eval mode, RGB image, its output) per model, built once."""
    factory, name = MODELS[request.param]
    torch.manual_seed(0)
    model = factory().eval()
    # BatchNorm at init is the identity up to eps: random running statistics make the check bite.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        y = model(x)
    return factory, name, model, x, y


def _adapted(model: nn.Module, n: int) -> nn.Module:
    """A copy of ``model`` adapted to ``n`` channels (the fixture's model stays RGB)."""
    return adapt_input_channels(copy.deepcopy(model), n)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    err = ((a - b).norm() / b.norm()).item()
    assert err < 1e-5, err


def test_three_channels_changes_nothing(case):
    _, name, model, x, y = case
    conv = model.get_submodule(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert adapt_input_channels(model, 3) is model
    assert model.get_submodule(name) is conv
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(model(x), y)


def test_one_channel_is_exact_on_grey_images(case):
    _, name, model, x, _ = case
    grey = x[:, :1]
    with torch.no_grad():
        want = model(grey.expand(-1, 3, -1, -1))
        grey_model = _adapted(model, 1)
        _close(grey_model(grey), want)
    old, new = model.get_submodule(name), grey_model.get_submodule(name)
    assert type(new) is type(old) and new.in_channels == 1 and new.weight.shape[1] == 1
    assert (new.stride, new.padding, new.kernel_size) == (old.stride, old.padding, old.kernel_size)
    assert (new.bias is None) == (old.bias is None)
    if old.bias is not None:
        assert torch.equal(new.bias, old.bias)
    assert first_conv_channels(grey_model) == 1
    if hasattr(model, "in_chans"):
        assert grey_model.in_chans == 1


def test_six_channels_is_exact_on_repeated_bands(case):
    _, _, model, x, y = case
    six = _adapted(model, 6)
    with torch.no_grad():
        _close(six(torch.cat([x, x], dim=1)), y)
    assert first_conv_channels(six) == 6


def test_four_channels_runs(case):
    _, name, model, x, y = case
    four = _adapted(model, 4)
    with torch.no_grad():
        out = four(torch.cat([x, x[:, :1]], dim=1))
    assert out.shape == y.shape and torch.isfinite(out).all()
    assert four.get_submodule(name).weight.shape[1] == 4
    assert first_conv_channels(four) == 4


def test_weight_rule_matches_timm():
    from timm.models._manipulate import adapt_input_conv
    torch.manual_seed(0)
    w = torch.randn(5, 3, 2, 2)
    for n in (1, 2, 3, 4, 6, 7):
        assert torch.equal(adapt_rgb_weight(w, n), adapt_input_conv(n, w))
    assert adapt_rgb_weight(w.half(), 4).dtype == torch.float16


def test_bias_parameter_is_shared_and_grad_flag_kept():
    model = ConvNet(in_chans=3, width=4, stages=1)
    model.features[0][0] = nn.Conv2d(3, 4, 3, padding=1, bias=True)
    bias = model.features[0][0].bias
    adapt_input_channels(model, 2)
    assert model.features[0][0].bias is bias and model.features[0][0].weight.requires_grad


def test_errors():
    with pytest.raises(ValueError, match=r"^in_chans=0, expected a positive int$"):
        adapt_input_channels(_convnet(), 0)
    with pytest.raises(ValueError, match=r"in_chans=True"):
        adapt_input_channels(_convnet(), True)
    with pytest.raises(ValueError, match=r"^ConvNet\.features\.0\.0 takes in_channels=1, expected a 3-channel"):
        adapt_input_channels(ConvNet(in_chans=1, width=4, stages=1), 2)
    with pytest.raises(ValueError, match=r"^Linear has no nn\.Conv2d input layer"):
        adapt_input_channels(nn.Linear(3, 4), 1)
    with pytest.raises(ValueError, match="groups=3"):
        find_input_conv(nn.Conv2d(3, 3, 3, groups=3))
    with pytest.raises(TypeError, match="model is a str"):
        adapt_input_channels("resnet", 1)  # type: ignore[arg-type]


def test_bare_conv_is_adapted_in_place():
    conv = nn.Conv2d(3, 4, 3)
    assert adapt_input_channels(conv, 1) is conv
    assert conv.in_channels == 1 and conv.weight.shape == (4, 1, 3, 3)
