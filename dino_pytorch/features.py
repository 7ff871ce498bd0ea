"""Features from any backbone without editing it: timm, torchvision, or a user's own module.

The official wrapper sets ``backbone.fc = backbone.head = nn.Identity()`` on the user's model. Here
the classifier is bypassed instead, and the returned module shares every parameter with the
user's object, so the trained weights live there.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .validate import is_int
from .wrapper import backbone_tensor

CLASSIFIER_NAMES = ("fc", "head", "heads", "classifier")


_PASSIVE = (nn.Dropout, nn.Identity, nn.Flatten)


def _ends_in_linear(module: nn.Module) -> bool:
    """A Linear, or a Sequential whose last non-passive layer is a Linear (VGG, MobileNet)."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Sequential):
        active = [m for m in module if not isinstance(m, _PASSIVE)]
        return bool(active) and isinstance(active[-1], nn.Linear)
    return False


def find_classifier(backbone: nn.Module) -> Optional[str]:
    """Name of a trailing classifier attribute (``fc``, ``head``, ``heads``, ``classifier``), if any."""
    for name in CLASSIFIER_NAMES:
        module = getattr(backbone, name, None)
        if isinstance(module, nn.Module) and _ends_in_linear(module):
            return name
    return None


class _Bypass(Exception):
    """Raised inside the classifier's pre-hook to stop the forward once its input is known."""

    def __init__(self, features: Tensor) -> None:
        super().__init__()
        self.features = features


class TimmFeatures(nn.Module):
    """Pre-logits features of a timm model (``forward_features`` + ``forward_head(pre_logits=True)``).

    Shapes: (B, C, H, W) -> (B, D).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        model: Any = self.model  # a timm model (untyped): forward_features and forward_head
        return model.forward_head(model.forward_features(x), pre_logits=True)


class BypassClassifier(nn.Module):
    """Features of ``model`` taken at the input of its classifier attribute ``name``.

    A forward pre-hook on the classifier catches its input and stops the forward there, so the
    classifier never runs and its parameters get no gradient. The hook exists only during the call.

    Shapes: model input -> (B, D) (feature maps are flattened as the model itself would).
    """

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.model = model
        self.classifier_name = name

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        def stop(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            raise _Bypass(inputs[0])

        handle = getattr(self.model, self.classifier_name).register_forward_pre_hook(stop)
        try:
            self.model(*args, **kwargs)
        except _Bypass as bypass:
            return bypass.features
        finally:
            handle.remove()
        raise RuntimeError(f"{type(self.model).__name__}.{self.classifier_name} was never called in forward")

    def extra_repr(self) -> str:
        return f"bypassed={self.classifier_name!r}"


def _traced_without(model: nn.Module, name: str) -> Optional[nn.Module]:
    """An FX graph of ``model`` that returns the classifier's input; None when tracing fails.

    The GraphModule holds the very submodules of ``model`` (not copies), and it can be compiled,
    unlike the exception-based :class:`BypassClassifier`.
    """
    try:
        graph_module = torch.fx.symbolic_trace(model)
    except Exception:
        return None
    graph = graph_module.graph
    target = next(
        (
            n for n in graph.nodes
            if n.op == "call_module" and (n.target == name or str(n.target).startswith(name + "."))
        ),
        None,
    )
    if target is None or not target.args:
        return None
    features = target.args[0]
    for node in list(graph.nodes):
        if node.op == "output":
            node.args = (features,)
    graph.eliminate_dead_code()
    graph.lint()
    traced = torch.fx.GraphModule(model, graph, class_name=type(model).__name__ + "Features")
    declared = _declared_in_chans(model)
    if declared is not None:  # kept for first_conv_channels: the graph holds submodules, not attributes
        setattr(traced, "in_chans", declared)  # noqa: B010 (nn.Module types attributes as Tensor | Module)
    return traced


def as_feature_extractor(backbone: nn.Module) -> nn.Module:
    """A module computing ``backbone``'s pooled features, sharing all of its parameters.

    - timm models: ``forward_head(forward_features(x), pre_logits=True)``;
    - models with a trailing ``fc`` / ``head`` / ``classifier`` Linear (torchvision ResNet, ViT,
      EfficientNet, ...): the input of that classifier (FX graph, or a hook when tracing fails);
    - anything else: the model itself, which should return (B, D) features.
    """
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone is a {type(backbone).__name__}, expected an nn.Module")
    if next(backbone.parameters(), None) is None:
        warnings.warn(f"backbone ({type(backbone).__name__}) has no parameters: DINO will train only the head; "
                      "pass the network whose weights should learn", UserWarning, stacklevel=2)
    if hasattr(backbone, "forward_features") and hasattr(backbone, "forward_head"):
        return TimmFeatures(backbone)
    name = find_classifier(backbone)
    if name is None:
        return backbone
    return _traced_without(backbone, name) or BypassClassifier(backbone, name)


# Attributes through which a wrapper holds the model that receives the images: TimmFeatures and
# BypassClassifier (``model``), DistributedDataParallel / DataParallel (``module``), torch.compile
# (``_orig_mod``).
_WRAPPED = ("model", "module", "_orig_mod")


def _declared_in_chans(module: nn.Module) -> Optional[int]:
    """The ``in_chans`` int that ``module`` (or the model it wraps) declares; None without one."""
    seen: set[int] = set()
    current: Any = module
    while isinstance(current, nn.Module) and id(current) not in seen:
        seen.add(id(current))
        value = getattr(current, "in_chans", None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        current = next((getattr(current, name) for name in _WRAPPED
                        if isinstance(getattr(current, name, None), nn.Module)), None)
    return None


def first_conv_channels(module: nn.Module) -> Optional[int]:
    """The input channels ``module`` takes, or None when they cannot be told without a forward.

    In this order:

    1. the ``in_chans`` attribute of the model (or of the model a feature extractor, DDP or
       ``torch.compile`` wraps): timm models have one (all 98 model families of timm 1.0.31), as do
       :class:`~dino_pytorch.models.VisionTransformer` and :class:`~dino_pytorch.models.ConvNet`.
       It is right where the first convolution is not: a space-to-depth stem (timm's TResNet:
       ``conv1`` takes 16x the image channels), a linear patch embedding with no convolution at all
       (timm's NaFlexViT), or a stem whose first conv sees a transformed input (timm's CSATv2);
    2. else the first ``nn.Conv2d`` in registration order (torchvision models, most user models),
       or None when that conv is lazy and not yet materialised (``nn.LazyConv2d``: 0 channels).

    None means "unknown": callers then skip their channel check rather than guess. A model whose
    first registered Conv2d is not the one that receives the images (an auxiliary conv declared
    before the stem) gets a wrong answer from rule 2: give it an ``in_chans`` attribute, or pass
    :class:`~dino_pytorch.DINO` its ``input_size``.
    """
    declared = _declared_in_chans(module)
    if declared is not None:
        return declared
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
                return None
            return m.in_channels
    return None


def check_input_size(name: str, value: Any) -> Optional[tuple[int, ...]]:
    """None, or the per-sample input shape of a dummy forward: positive ints, ``(C, H, W)`` for
    images (``(D,)`` for a backbone on vectors), returned as a tuple.

    Raises TypeError for anything but a non-empty sequence of ints (``28``, ``(1.0, 28, 28)``) and
    ValueError for a size below 1, each naming ``name`` and the value.
    """
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value or not all(
        map(is_int, value)
    ):
        raise TypeError(f"{name}={value!r}, expected the per-sample input shape, e.g. (C, H, W): positive ints")
    if min(value) < 1:
        raise ValueError(f"{name}={value!r}, expected the per-sample input shape, e.g. (C, H, W): positive ints")
    return tuple(int(v) for v in value)


def infer_feature_dim(features: nn.Module, input_size: Optional[Sequence[int]] = None) -> int:
    """Width D of ``features``' output, from a dummy forward of two (C, H, W) inputs.

    ``input_size`` defaults to (C, 224, 224) with C from :func:`first_conv_channels` (the model's
    ``in_chans`` attribute, else its first Conv2d; 3 when unknown). The forward runs in eval mode
    under no_grad, so BatchNorm statistics are not touched.

    Raises:
        TypeError, ValueError: ``input_size`` is not a shape of positive ints (:func:`check_input_size`).
        ValueError: the dummy forward failed (its error quoted).
    """
    input_size = check_input_size("input_size", input_size)
    if input_size is None:
        input_size = (first_conv_channels(features) or 3, 224, 224)
    param = next(features.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = features.training
    features.eval()
    try:
        with torch.no_grad():
            out = features(torch.zeros(2, *input_size, device=device, dtype=dtype))
    except Exception as err:
        raise ValueError(
            "could not infer the backbone's feature width from a dummy input of shape "
            f"(2, {', '.join(map(str, input_size))}): "
            f"{type(err).__name__}: {err}. Pass embed_dim= (and/or input_size=)"
        ) from err
    finally:
        features.train(was_training)
    return backbone_tensor(out, "backbone (dummy forward)").shape[-1]


def feature_dim_hint(backbone: nn.Module) -> Optional[int]:
    """Feature width read off common attributes, without a forward; None if unknown."""
    for attr in ("embed_dim", "num_features"):
        value = getattr(backbone, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    name = find_classifier(backbone)
    if name is not None:
        module = getattr(backbone, name)
        linear = module if isinstance(module, nn.Linear) else next(m for m in module if isinstance(m, nn.Linear))
        return linear.in_features
    return None
