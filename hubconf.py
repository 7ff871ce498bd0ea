"""torch.hub entry points: the official DINO and DINOv2 backbones, built by dino-pytorch.

    model = torch.hub.load("/path/to/dino-pytorch", "dino_vits16", source="local")
    model = torch.hub.load("/path/to/dino-pytorch", "dino_vits16", source="local",
                           pretrained="dino_deitsmall16_pretrain.pth")
    model = torch.hub.load("/path/to/dino-pytorch", "dinov2_vits14_reg", source="local", pretrained=True)
    model = torch.hub.load("/path/to/dino-pytorch", "dinov2_vits14", source="local",
                           weights="dinov2_vits14_pretrain.pth")

The names and architectures are those of the official ``facebookresearch/dino`` and
``facebookresearch/dinov2`` hubconfs: backbones only, with the official ``state_dict`` keys, so the
released weight files load strictly. The DINO (v1) entries never download: pass
``pretrained=<path>`` to a file you have (official backbone file, full official training
checkpoint, or one of ours; see docs/checkpoints.md). The DINOv2 entries download the released file
only with ``pretrained=True`` (``torch.hub.load_state_dict_from_url``, into torch's hub cache), or
read ``weights=<path>``; without either they are randomly initialised. Extra keyword arguments go to
the model's constructor.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch
from torch import nn

dependencies = ["torch", "torchvision"]

Pretrained = Union[bool, str, "os.PathLike[str]"]
_OFFICIAL_URL = "https://dl.fbaipublicfiles.com/dino/{0}/{0}.pth"


def _weight_file(pretrained: Pretrained, official_file: str) -> Optional[str]:
    """The path to load (None for False), checked before the model is built so errors come at once."""
    if pretrained is False:
        return None
    if pretrained is True:
        raise ValueError(
            "pretrained=True would download the official weights, and this hub entry point never "
            f"downloads: fetch {_OFFICIAL_URL.format(official_file)} yourself and pass its path, "
            "e.g. pretrained='/path/to/file.pth'"
        )
    if not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(f"pretrained is a {type(pretrained).__name__}, expected False or the path of a weight file")
    return os.fspath(pretrained)


def _load(model: nn.Module, path: Optional[str]) -> nn.Module:
    """``model`` with the weights of ``path`` (strict), unchanged for None."""
    if path is not None:
        from dino_pytorch.checkpoint import load_into

        # load_official_weights (official or our layouts, the teacher of a full checkpoint) and a
        # strict load_state_dict, with a message listing missing / unexpected / mismatched keys.
        load_into(model, None, path)
    return model


def _vit(size: str, patch_size: int, pretrained: Pretrained, official_file: str, **kwargs: Any) -> nn.Module:
    from dino_pytorch.models import vit_base, vit_small

    path = _weight_file(pretrained, official_file)
    builder = {"small": vit_small, "base": vit_base}[size]
    return _load(builder(patch_size=patch_size, num_classes=0, **kwargs), path)


def dino_vits16(pretrained: Pretrained = False, **kwargs: Any) -> nn.Module:
    """ViT-S/16 backbone (21M parameters): (B, 3, H, W) -> (B, 384) CLS features."""
    return _vit("small", 16, pretrained, "dino_deitsmall16_pretrain", **kwargs)


def dino_vits8(pretrained: Pretrained = False, **kwargs: Any) -> nn.Module:
    """ViT-S/8 backbone (21M parameters): (B, 3, H, W) -> (B, 384) CLS features."""
    return _vit("small", 8, pretrained, "dino_deitsmall8_pretrain", **kwargs)


def dino_vitb16(pretrained: Pretrained = False, **kwargs: Any) -> nn.Module:
    """ViT-B/16 backbone (85M parameters): (B, 3, H, W) -> (B, 768) CLS features."""
    return _vit("base", 16, pretrained, "dino_vitbase16_pretrain", **kwargs)


def dino_vitb8(pretrained: Pretrained = False, **kwargs: Any) -> nn.Module:
    """ViT-B/8 backbone (85M parameters): (B, 3, H, W) -> (B, 768) CLS features."""
    return _vit("base", 8, pretrained, "dino_vitbase8_pretrain", **kwargs)


def dino_resnet50(pretrained: Pretrained = False, **kwargs: Any) -> nn.Module:
    """torchvision ResNet-50 with ``fc = Identity`` (23M parameters): (B, 3, H, W) -> (B, 2048)."""
    from torchvision.models import resnet50

    path = _weight_file(pretrained, "dino_resnet50_pretrain")
    model = resnet50(weights=None, **kwargs)
    model.fc = nn.Identity()  # as official: the released weights hold no classifier
    return _load(model, path)


# ------------------------------------------------------------------------------------- DINOv2

# The released models' settings (DINOv2's hub): layer-scale (its trained gains are in the files),
# no block chunks; the _reg models add 4 registers and resize positions by size, antialiased.
_DINOV2_RELEASED: dict[str, Any] = dict(patch_size=14, img_size=518, init_values=1.0, block_chunks=0)
_DINOV2_REGISTERS: dict[str, Any] = dict(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
WeightsPath = Optional[Union[str, "os.PathLike[str]"]]
_DINOV2_DATASET = "LVD142M"  # the official entries' weights= value: the released weights themselves


def _dinov2(name: str, size: str, registers: bool, pretrained: bool,
            weights: WeightsPath, **kwargs: Any) -> nn.Module:
    """The released DINOv2 ``size`` backbone, with the released weights when asked for."""
    from dino_pytorch.models import create_model
    from dino_pytorch.models.dinov2_weights import dinov2_weights_url, load_dinov2_state_dict

    if not isinstance(pretrained, bool):
        raise TypeError(f"{name}(pretrained={pretrained!r}): expected True or False; pass a file as weights=PATH")
    if weights == _DINOV2_DATASET:
        weights = None
    if weights is not None and not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"{name}(weights={weights!r}): expected None or the path of a weight file")
    options = {**_DINOV2_RELEASED, **(_DINOV2_REGISTERS if registers else {}), **kwargs}
    model = create_model(f"dinov2_vit_{size}", **options)
    if weights is not None:
        load_dinov2_state_dict(model, os.fspath(weights))
    elif pretrained:
        url = dinov2_weights_url(size, _DINOV2_REGISTERS["num_register_tokens"] if registers else 0)
        try:
            state = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
        except OSError as err:  # URLError, HTTPError, timeouts, DNS: no file to read
            reason = (str(err).splitlines() or [type(err).__name__])[0]
            raise RuntimeError(f"{name}(pretrained=True) could not download {url} ({reason}); fetch it where there "
                               f"is a network and pass weights='/path/to/{url.rsplit('/', 1)[-1]}'") from err
        load_dinov2_state_dict(model, state)
    return model


def dinov2_vits14(*, pretrained: bool = False, weights: WeightsPath = None, **kwargs: Any) -> nn.Module:
    """DINOv2 ViT-S/14 backbone (22M parameters): (B, 3, H, W) -> (B, 384), H and W multiples of 14."""
    return _dinov2("dinov2_vits14", "small", False, pretrained, weights, **kwargs)


def dinov2_vits14_reg(*, pretrained: bool = False, weights: WeightsPath = None, **kwargs: Any) -> nn.Module:
    """DINOv2 ViT-S/14 with 4 registers (22M parameters): (B, 3, H, W) -> (B, 384)."""
    return _dinov2("dinov2_vits14_reg", "small", True, pretrained, weights, **kwargs)


def dinov2_vitb14(*, pretrained: bool = False, weights: WeightsPath = None, **kwargs: Any) -> nn.Module:
    """DINOv2 ViT-B/14 backbone (86M parameters): (B, 3, H, W) -> (B, 768), H and W multiples of 14."""
    return _dinov2("dinov2_vitb14", "base", False, pretrained, weights, **kwargs)


def dinov2_vitb14_reg(*, pretrained: bool = False, weights: WeightsPath = None, **kwargs: Any) -> nn.Module:
    """DINOv2 ViT-B/14 with 4 registers (86M parameters): (B, 3, H, W) -> (B, 768)."""
    return _dinov2("dinov2_vitb14_reg", "base", True, pretrained, weights, **kwargs)


def dinov2_vitl14(*, pretrained: bool = False, weights: WeightsPath = None, **kwargs: Any) -> nn.Module:
    """DINOv2 ViT-L/14 backbone (304M parameters): (B, 3, H, W) -> (B, 1024), H and W multiples of 14."""
    return _dinov2("dinov2_vitl14", "large", False, pretrained, weights, **kwargs)


def dinov2_vitl14_reg(*, pretrained: bool = False, weights: WeightsPath = None, **kwargs: Any) -> nn.Module:
    """DINOv2 ViT-L/14 with 4 registers (304M parameters): (B, 3, H, W) -> (B, 1024)."""
    return _dinov2("dinov2_vitl14_reg", "large", True, pretrained, weights, **kwargs)
