import pytest
import torch
from torch import nn

from dino_pytorch import DINOHead, MultiCropWrapper


class CountingBackbone(nn.Module):
    """Pools any image size to (N, 6); counts calls and records the batch sizes it saw."""

    def __init__(self, tuple_output=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.calls = []
        self.tuple_output = tuple_output

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        out = self.conv(x).mean(dim=(2, 3))
        return (out, "extra") if self.tuple_output else out


def views_of(sizes, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, h, w, generator=g) for h, w in sizes]


@pytest.mark.parametrize("sizes, n_calls", [
    ([(16, 16)] * 2 + [(8, 8)] * 4, 2),
    ([(16, 16), (8, 8), (16, 16), (8, 8)], 2),          # not consecutive: still 2 forwards
    ([(16, 16), (16, 8), (8, 16)], 3),                  # height counts, not only width
])
def test_one_forward_per_resolution_and_input_order(sizes, n_calls):
    backbone = CountingBackbone()
    head = DINOHead(6, 11, hidden_dim=8, bottleneck_dim=4)
    wrapper = MultiCropWrapper(backbone, head).eval()
    views = views_of(sizes)
    out, feats = wrapper(views, return_backbone_feats=True)
    assert len(backbone.calls) == n_calls
    # Naive reference: each view alone through backbone and head, in input order.
    ref_feats = torch.cat([backbone(v) for v in views])
    ref = head(ref_feats)
    assert out.shape == (len(views) * 3, 11) and feats.shape == (len(views) * 3, 6)
    assert torch.allclose(feats, ref_feats, atol=1e-6)
    assert torch.allclose(out, ref, atol=1e-6)


def test_head_applied_once_and_plain_output():
    calls = []
    head = DINOHead(6, 5, hidden_dim=8, bottleneck_dim=4)
    head.register_forward_hook(lambda *a: calls.append(1))
    out = MultiCropWrapper(CountingBackbone(), head)(views_of([(16, 16), (8, 8), (8, 8)]))
    assert isinstance(out, torch.Tensor) and out.shape == (9, 5) and len(calls) == 1


def test_tuple_output_takes_element_zero():
    wrapper = MultiCropWrapper(CountingBackbone(tuple_output=True), nn.Identity())
    assert wrapper(views_of([(8, 8)] * 2)).shape == (6, 6)


def test_single_tensor_input():
    wrapper = MultiCropWrapper(CountingBackbone(), nn.Identity())
    assert wrapper(torch.randn(4, 3, 8, 8)).shape == (4, 6)


def test_user_backbone_is_not_modified():
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    backbone.fc = nn.Linear(4, 2)  # an attribute the official wrapper would overwrite
    fc = backbone.fc
    wrapper = MultiCropWrapper(backbone, nn.Identity())
    assert backbone.fc is fc and wrapper.backbone is backbone
    assert not hasattr(backbone, "head")


def test_trained_weights_live_in_the_users_backbone():
    backbone = CountingBackbone()
    wrapper = MultiCropWrapper(backbone, DINOHead(6, 5, hidden_dim=8, bottleneck_dim=4))
    opt = torch.optim.SGD(wrapper.parameters(), lr=1.0)
    before = backbone.conv.weight.clone()
    wrapper(views_of([(8, 8)] * 2)).sum().backward()
    opt.step()
    assert not torch.equal(backbone.conv.weight, before)


def test_bad_backbone_outputs_and_views():
    class DictOut(nn.Module):
        def forward(self, x):
            return {"features": x.mean(dim=(2, 3))}

    class MapOut(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="returned dict"):
        MultiCropWrapper(DictOut(), nn.Identity())(views_of([(8, 8)] * 2))
    with pytest.raises(ValueError, match=r"returned shape \(6, 3, 8, 8\)"):
        MultiCropWrapper(MapOut(), nn.Identity())(views_of([(8, 8)] * 2))
    with pytest.raises(ValueError, match="mismatched batch sizes"):
        MultiCropWrapper(CountingBackbone(), nn.Identity())([torch.randn(2, 3, 8, 8), torch.randn(3, 3, 8, 8)])
    with pytest.raises(TypeError, match="views is a str"):
        MultiCropWrapper(CountingBackbone(), nn.Identity())("images")
