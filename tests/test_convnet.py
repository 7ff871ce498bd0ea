import pytest
import torch

from dino_pytorch.models import ConvNet, create_model


@pytest.mark.parametrize("pool", [1, 2, 3])
def test_any_crop_size_gives_the_same_width(pool):
    net = ConvNet(in_chans=1, width=4, stages=3, pool=pool)
    assert net.embed_dim == 16 * pool * pool
    for side in (28, 16, 12):
        assert net(torch.randn(2, 1, side, side)).shape == (2, net.embed_dim)


def test_pool_one_is_global_average_and_pool_two_keeps_quadrants():
    torch.manual_seed(0)
    net = ConvNet(width=4, pool=2).eval()
    x = torch.randn(1, 1, 28, 28)
    fmap = net.features(x)  # (1, 16, 7, 7)
    quadrants = torch.nn.functional.adaptive_avg_pool2d(fmap, 2).flatten(1)
    assert torch.allclose(net(x), quadrants)
    net.pool = 1
    assert torch.allclose(net(x), fmap.mean(dim=(2, 3)))


def test_registry_and_errors():
    assert isinstance(create_model("convnet", width=4, pool=2), ConvNet)
    with pytest.raises(ValueError, match="pool=0"):
        ConvNet(pool=0)
