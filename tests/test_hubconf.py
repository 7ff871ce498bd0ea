"""hubconf.py: torch.hub.load(<this repository>, name, source="local") builds the official DINO and
DINOv2 backbones with their official state_dict keys and loads a local weight file; the DINO entries
never download, the DINOv2 ones only with pretrained=True (mocked here: this machine is offline)."""
from __future__ import annotations

import time
import urllib.error
from pathlib import Path

import pytest
import torch

from dino_pytorch.models import DinoVisionTransformer, create_model, vit_base, vit_small

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


DINOV2 = [("dinov2_vits14", "small", 0), ("dinov2_vits14_reg", "small", 4), ("dinov2_vitb14", "base", 0),
          ("dinov2_vitb14_reg", "base", 4), ("dinov2_vitl14", "large", 0), ("dinov2_vitl14_reg", "large", 4)]
URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth"


@pytest.mark.parametrize("name,size,registers", DINOV2)
def test_dinov2_entries_have_the_released_settings(name, size, registers):
    with torch.device("meta"):  # up to 304M parameters: shapes only
        model = hub(name)
        reference = create_model(f"dinov2_vit_{size}", init_values=1.0, num_register_tokens=registers)
    assert isinstance(model, DinoVisionTransformer)
    assert (model.patch_size, model.pos_embed.shape[1], model.init_values, model.num_register_tokens) == \
        (14, 37 * 37 + 1, 1.0, registers)
    # The _reg models resize positions to the grid size, antialiased; the others with DINO's +0.1.
    assert (model.interpolate_offset, model.interpolate_antialias) == ((0.0, True) if registers else (0.1, False))
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}


def test_dinov2_pretrained_reads_the_official_file(monkeypatch):
    source = hub("dinov2_vits14_reg", depth=1)
    calls = []

    def fake_download(url, **kwargs):
        calls.append((url, kwargs))
        return {k: v.clone() for k, v in source.state_dict().items()}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    loaded = hub("dinov2_vits14_reg", pretrained=True, depth=1)
    assert calls == [(URL, {"map_location": "cpu", "weights_only": True})]
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_dinov2_offline_says_so_in_one_line_at_once(monkeypatch):
    def offline(url, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as err:
        hub("dinov2_vits14_reg", pretrained=True, depth=1)
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "\n" not in message and URL in message and "name resolution" in message
    assert "weights='/path/to/dinov2_vits14_reg4_pretrain.pth'" in message


def test_dinov2_weights_takes_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", None)  # never called with weights=
    source = hub("dinov2_vits14", depth=1)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(source.state_dict(), path)
    loaded = hub("dinov2_vits14", weights=str(path), depth=1)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert hub("dinov2_vits14", weights="LVD142M", depth=1).init_values == 1.0  # the official default: no file
    with pytest.raises(TypeError, match="weights=PATH"):
        hub("dinov2_vits14", pretrained="dinov2_vits14_pretrain.pth")
