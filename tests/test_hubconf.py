"""hubconf.py: torch.hub.load(<this repository>, name, source="local") builds the official DINO
backbones with their official state_dict keys, loads a local weight file, and never downloads."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dino_pytorch.models import vit_base, vit_small

ROOT = Path(__file__).resolve().parents[1]


def hub(name: str, **kwargs):
    return torch.hub.load(str(ROOT), name, source="local", **kwargs)


def test_vits16_is_the_official_backbone():
    model = hub("dino_vits16")
    keys = list(model.state_dict())
    assert keys == list(vit_small(patch_size=16, num_classes=0).state_dict())
    # The official vision_transformer.py layout: no classifier, timm-style block names.
    assert keys[:4] == ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    assert "blocks.11.attn.qkv.weight" in keys and keys[-2:] == ["norm.weight", "norm.bias"]
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 384)


@pytest.mark.parametrize("name,builder,patch_size", [("dino_vits8", vit_small, 8), ("dino_vitb16", vit_base, 16),
                                                     ("dino_vitb8", vit_base, 8)])
def test_the_other_vits_have_the_official_shapes(name, builder, patch_size):
    # On the meta device: shapes and names without allocating (or initialising) 85M parameters.
    with torch.device("meta"):
        model, reference = hub(name), builder(patch_size=patch_size, num_classes=0)
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    assert model.patch_embed.patch_size == patch_size


def test_resnet50_is_torchvision_without_its_classifier():
    model = hub("dino_resnet50")
    assert isinstance(model.fc, torch.nn.Identity)
    assert not any(k.startswith("fc.") for k in model.state_dict())
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 2048)


def test_pretrained_takes_a_local_file(tmp_path):
    source = hub("dino_vits16")
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(source.state_dict(), path)  # a backbone-only file, as released
    loaded = hub("dino_vits16", pretrained=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_file_of_another_model_is_refused(tmp_path):
    from dino_pytorch.checkpoint import CheckpointError

    path = tmp_path / "resnet.pth"
    torch.save(hub("dino_resnet50").state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit the backbone"):
        hub("dino_vits16", pretrained=path)


def test_pretrained_true_explains_there_is_no_download():
    with pytest.raises(ValueError, match=r"never downloads.*pass its path"):
        hub("dino_vits16", pretrained=True)
