"""Backbones by name: the ViT families (v1, DINOv2), the small ConvNet, torchvision ResNets and any timm model.

Nothing here downloads: torchvision models are built with ``weights=None`` and timm models with
``pretrained=False`` unless the caller passes otherwise.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .convnet import ConvNet
from .dinov2_vit import dinov2_vit_base, dinov2_vit_large, dinov2_vit_small
from .vision_transformer import vit_base, vit_small, vit_tiny

TIMM_PREFIX = "timm:"

# torchvision.models builders; looked up lazily so importing this module stays cheap.
_TORCHVISION_RESNETS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)

_BUILTIN: dict[str, Callable[..., nn.Module]] = {
    "vit_tiny": vit_tiny,
    "vit_small": vit_small,
    "vit_base": vit_base,
    "dinov2_vit_small": dinov2_vit_small,
    "dinov2_vit_base": dinov2_vit_base,
    "dinov2_vit_large": dinov2_vit_large,
    "convnet": ConvNet,
}


def list_models() -> list[str]:
    """Names :func:`create_model` knows; any ``"timm:<name>"`` works too when timm is installed."""
    return [*_BUILTIN, *_TORCHVISION_RESNETS]


def _torchvision_model(name: str, **kwargs: Any) -> nn.Module:
    import torchvision.models

    if "in_chans" in kwargs:
        raise TypeError(
            f"create_model({name!r}, in_chans={kwargs['in_chans']!r}): torchvision's {name} takes no in_chans "
            f"(its conv1 takes 3 channels); expected 'timm:{name}' for another channel count, or 3-channel images"
        )
    kwargs.setdefault("weights", None)
    return getattr(torchvision.models, name)(**kwargs)


def _timm_model(name: str, **kwargs: Any) -> nn.Module:
    if not name:
        raise ValueError(
            f"model name {TIMM_PREFIX!r} has no timm model after the prefix, expected e.g. 'timm:resnet50'"
        )
    try:
        import timm
    except ImportError as err:
        raise ImportError(f"create_model({TIMM_PREFIX + name!r}) needs timm: pip install timm") from err
    if not timm.is_model(name):
        raise ValueError(f"timm has no model named {name!r} (see timm.list_models())")
    kwargs.setdefault("pretrained", False)
    return timm.create_model(name, **kwargs)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the backbone called ``name`` with ``kwargs`` passed to its constructor.

    ``vit_tiny`` / ``vit_small`` / ``vit_base`` (e.g. ``patch_size=8, in_chans=1, img_size=28``),
    ``dinov2_vit_small`` / ``dinov2_vit_base`` / ``dinov2_vit_large`` (DINOv2's keywords, e.g.
    ``num_register_tokens=4, init_values=1.0``),
    ``convnet`` (:class:`ConvNet`), the torchvision ResNets of :func:`list_models` (the model as
    torchvision builds it, ``fc`` included: :mod:`dino_pytorch.features` takes its features), or
    ``"timm:<name>"`` for any timm model.
    """
    if not isinstance(name, str):
        raise TypeError(f"name is a {type(name).__name__}, expected a model name (str)")
    if name.startswith(TIMM_PREFIX):
        return _timm_model(name[len(TIMM_PREFIX):], **kwargs)
    if name in _BUILTIN:
        return _BUILTIN[name](**kwargs)
    if name in _TORCHVISION_RESNETS:
        return _torchvision_model(name, **kwargs)
    raise ValueError(f"unknown model name {name!r}; expected one of {list_models()} or 'timm:<name>'")
