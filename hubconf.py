"""torch.hub entry points: the official DINO backbones, built by dino-pytorch.

    model = torch.hub.load("/path/to/dino-pytorch", "dino_vits16", source="local")
    model = torch.hub.load("/path/to/dino-pytorch", "dino_vits16", source="local",
                           pretrained="dino_deitsmall16_pretrain.pth")

The names and architectures are those of the official ``facebookresearch/dino`` hubconf: backbones
only (ViTs with ``num_classes=0``, torchvision's ResNet-50 with ``fc = Identity``), with the official
``state_dict`` keys, so the released weight files load strictly. Nothing is downloaded: pass
``pretrained=<path>`` to a file you have (official backbone file, full official training checkpoint,
or one of ours; see docs/checkpoints.md). Extra keyword arguments go to the model's constructor.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Union

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
