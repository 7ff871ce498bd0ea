"""RGB-pretrained weights for N-channel images: the input convolution of a 3-channel model made N-channel.

The rule is timm's (``timm.models._manipulate.adapt_input_conv``), written here on its own:

- ``in_chans == 1``: the three RGB filters are summed. A grey image ``g`` fed to the summed filter
  gives exactly what the RGB model gives on ``(g, g, g)``, so nothing is lost for grey data;
- ``in_chans > 3`` (and ``in_chans == 2``): the RGB filters are repeated cyclically (R, G, B, R, ...)
  up to ``in_chans`` and scaled by ``3 / in_chans``, which keeps the response to a flat image the
  same. When ``in_chans`` is a multiple of 3 and the image's bands repeat its RGB bands, the output
  is exactly the RGB model's; for any other ``in_chans`` or image it is an initialisation only;
- ``in_chans == 3``: nothing changes (the model, its conv and its weights are untouched).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..validate import check_positive_int

__all__ = ["adapt_input_channels", "adapt_rgb_weight", "find_input_conv", "input_conv_name"]

RGB = 3

# Where the input conv lives in the models we know by name, tried before the generic search because a
# model may register another conv first (e.g. a conv in a head declared before the stem).
_KNOWN_PATHS = ("patch_embed.proj", "conv1")


def adapt_rgb_weight(weight: Tensor, in_chans: int) -> Tensor:
    """An RGB conv weight made ``in_chans``-channel by timm's rule (see the module docstring).

    Args:
        weight: the pretrained Conv2d weight, shape (O, 3, kH, kW).
        in_chans: the input channels wanted, a positive int.

    Returns:
        A new tensor of shape (O, in_chans, kH, kW), ``weight``'s dtype and device (``weight``
        itself when ``in_chans == 3``).

    Raises:
        ValueError: ``in_chans`` is not a positive int, or ``weight`` is not (O, 3, kH, kW).
    """
    in_chans = check_positive_int("in_chans", in_chans)
    if weight.ndim != 4 or weight.shape[1] != RGB:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected (O, {RGB}, kH, kW)")
    if in_chans == RGB:
        return weight
    # Half-precision weights are combined in float32 (as timm does) so that only the cast back rounds.
    w = weight.detach().float()
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        repeat = math.ceil(in_chans / RGB)
        w = w.repeat(1, repeat, 1, 1)[:, :in_chans] * (RGB / in_chans)
    return w.to(weight.dtype)


def _first_conv(model: nn.Module) -> Optional[tuple[str, nn.Conv2d]]:
    """The (qualified name, module) of the conv that receives the images, or None without a Conv2d."""
    modules = dict(model.named_modules())
    cfg = getattr(model, "pretrained_cfg", None)
    # timm records its input conv in the pretrained config; it is the authority for timm models.
    named = cfg.get("first_conv") if isinstance(cfg, dict) else None
    paths = ((named,) if isinstance(named, str) else ()) + _KNOWN_PATHS
    for path in paths:
        module = modules.get(path)
        if isinstance(module, nn.Conv2d):
            return path, module
    # The first Conv2d in registration order, the same rule as features.first_conv_channels so that
    # it reports the new channel count afterwards.
    return next(((name, m) for name, m in modules.items() if isinstance(m, nn.Conv2d)), None)


def input_conv_name(model: nn.Module) -> Optional[str]:
    """The qualified name of the Conv2d that receives ``model``'s images, whatever its channels (the
    search of :func:`find_input_conv`); None when ``model`` has no Conv2d. ``f"{name}.weight"`` is
    then its weight's key in ``model.state_dict()``, the tensor a 3-channel file's weights are
    adapted at (:func:`dino_pytorch.pretrained.load_pretrained`)."""
    found = _first_conv(model)
    return None if found is None else found[0]


def find_input_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The 3-channel Conv2d that receives ``model``'s images, with its qualified name.

    Tried in order: timm's ``pretrained_cfg["first_conv"]``, ``patch_embed.proj`` (our ViTs, DINOv2's
    ViT, timm ViTs), ``conv1`` (torchvision ResNets), then the first ``nn.Conv2d`` in registration
    order (our ConvNet, most other models).

    Args:
        model: the network, any ``nn.Module``.

    Returns:
        ``(name, conv)``: the conv's name in ``model.named_modules()`` (``""`` when ``model`` is the
        conv) and the conv itself.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model`` has no Conv2d, or the one found does not take 3 channels.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model is a {type(model).__name__}, expected an nn.Module")
    found = _first_conv(model)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no nn.Conv2d input layer to adapt from {RGB} channels")
    name, conv = found
    where = f"{type(model).__name__}.{name}" if name else type(model).__name__
    if conv.in_channels != RGB:
        raise ValueError(f"{where} takes in_channels={conv.in_channels}, expected a {RGB}-channel input conv")
    if conv.groups != 1:  # a grouped filter sees one band per group: there is no RGB filter to spread
        raise ValueError(f"{where} has groups={conv.groups}, expected groups=1 for a {RGB}-channel input conv")
    return name, conv


def _adapted_conv(conv: nn.Conv2d, in_chans: int) -> nn.Conv2d:
    """A copy of ``conv`` (same class, attributes, bias parameter) taking ``in_chans`` channels."""
    # The memo makes deepcopy share conv's own parameters instead of cloning them: the bias stays the
    # very same Parameter (an optimiser holding it keeps working) and the weight is not copied twice.
    memo: dict[int, Any] = {id(p): p for p in conv.parameters(recurse=False)}
    new = copy.deepcopy(conv, memo)
    with torch.no_grad():
        weight = adapt_rgb_weight(conv.weight, in_chans)
    new.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
    new.in_channels = in_chans
    return new


def _set_in_chans(model: nn.Module, conv_name: str, in_chans: int) -> None:
    """``in_chans = in_chans`` on ``model`` and on each module between it and the conv declaring one."""
    parts = conv_name.split(".") if conv_name else []
    chain = [model] + [model.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]
    for module in chain:
        value = getattr(module, "in_chans", None)
        # Only an int declaration is a channel count (features.first_conv_channels reads ints only).
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(module, "in_chans", in_chans)  # noqa: B010 (nn.Module types attributes as Tensor | Module)


def adapt_input_channels(model: nn.Module, in_chans: int) -> nn.Module:
    """Make a 3-channel (RGB-pretrained) model take ``in_chans``-channel images, in place.

    The input conv (see :func:`find_input_conv`) is replaced by a copy whose weight follows
    :func:`adapt_rgb_weight`: summed RGB filters for ``in_chans=1`` (exact on grey images), RGB
    filters repeated and scaled by ``3 / in_chans`` otherwise (exact for a multiple of 3 when the
    bands repeat the RGB bands, an initialisation otherwise). Its bias, stride, padding and other
    attributes are kept, and so is its class (timm's ``StdConv2d``, ``Conv2dSame``). Every
    ``in_chans`` attribute on the model and on the modules leading to the conv is set, so
    :func:`dino_pytorch.features.first_conv_channels` and the models' input checks agree.

    Args:
        model: a model whose input layer is a 3-channel ``nn.Conv2d``: our ViTs, DINOv2's ViT, our
            ``ConvNet(in_chans=3)``, torchvision ResNets, timm models.
        in_chans: the channels of the images it will take, a positive int.

    Returns:
        ``model`` itself, now taking (B, in_chans, H, W) instead of (B, 3, H, W); for
        ``in_chans == 3`` untouched.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``in_chans`` is not a positive int, or ``model`` has no 3-channel input conv.
    """
    in_chans = check_positive_int("in_chans", in_chans)
    name, conv = find_input_conv(model)
    if in_chans == RGB:
        return model
    new = _adapted_conv(conv, in_chans)
    if name:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    else:  # the model is the conv: nothing holds it, so its own weight is swapped
        conv.weight = new.weight
        conv.in_channels = in_chans
    _set_in_chans(model, name, in_chans)
    return model
