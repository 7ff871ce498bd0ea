"""MultiCropWrapper: one backbone forward per resolution, one head forward for all views."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .validate import check_optional_positive_int


def backbone_tensor(output: object, where: str = "backbone") -> Tensor:
    """The feature tensor of a backbone's output: a Tensor, or element 0 of a tuple/list (XCiT)."""
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        output = output[0]
    if not isinstance(output, Tensor):
        raise TypeError(
            f"{where} returned {type(output).__name__}, expected a (N, D) Tensor (or a tuple whose "
            "first element is one); wrap the model so its forward returns features, e.g. with "
            "dino_pytorch.features.as_feature_extractor"
        )
    if output.ndim != 2:
        raise ValueError(
            f"{where} returned shape {tuple(output.shape)}, expected (N, D) pooled features; "
            "pool feature maps or take the CLS token in the backbone's forward"
        )
    return output


def group_by_shape(views: Sequence[Tensor]) -> list[list[int]]:
    """Indices of the views grouped by their per-sample shape, groups in order of first appearance.

    Unlike the official wrapper (consecutive runs of equal *width* only), equal sizes are batched
    together wherever they sit in the list, and height and channels count too.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, v in enumerate(views):
        groups.setdefault(tuple(v.shape[1:]), []).append(i)
    return list(groups.values())


class MultiCropWrapper(nn.Module):
    """Run a backbone on multi-crop views, batching equal sizes, then the head once.

    The backbone is used as given: nothing on it is replaced (the official wrapper overwrites
    ``backbone.fc`` and ``backbone.head``), so the trained weights live in the user's object. Give a
    backbone whose forward returns (N, D) features (see :mod:`dino_pytorch.features`).

    Args:
        backbone: the feature extractor, (B, C, H, W) -> (B, D).
        head: applied once to the (V*B, D) features of all views.
        in_chans: the channel count C the backbone takes; None reads it off the backbone
            (:func:`~dino_pytorch.features.first_conv_channels`: its ``in_chans`` attribute, else
            its first Conv2d). When known, every view must be a floating-point (B, in_chans, H, W)
            tensor, checked before the backbone runs (shapes and dtypes only: no device sync), so a
            mismatch is named instead of failing inside the first convolution. Set the attribute
            ``in_chans`` to None to turn the check off.

    Shapes:
        views: a list of V tensors (B, C, H_v, W_v) (all the same B), or one (B, C, H, W) tensor.
        returns: (V*B, K) head output, crop-major in the input order (rows [vB:(v+1)B] are view v);
            with ``return_backbone_feats=True`` also the (V*B, D) backbone features.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, *, in_chans: Optional[int] = None) -> None:
        super().__init__()
        for name, module in (("backbone", backbone), ("head", head)):
            if not isinstance(module, nn.Module):
                raise TypeError(f"{name} is a {type(module).__name__}, expected an nn.Module")
        from .features import first_conv_channels  # features imports this module

        self.backbone = backbone
        self.head = head
        self.in_chans: Optional[int] = (
            check_optional_positive_int("in_chans", in_chans) if in_chans is not None else first_conv_channels(backbone)
        )

    def forward_backbone(self, views: Union[Tensor, Sequence[Tensor]]) -> Tensor:
        """(V*B, D) backbone features of all views, crop-major in the input order."""
        if isinstance(views, Tensor):
            views = [views]
        if not isinstance(views, (list, tuple)) or not views:
            raise TypeError(f"views is a {type(views).__name__}, expected a non-empty list of (B, C, H, W) tensors")
        for i, v in enumerate(views):
            if not isinstance(v, Tensor):
                raise TypeError(f"views[{i}] is a {type(v).__name__}, expected a (B, C, H, W) tensor")
            if self.in_chans is not None:
                self._check_image_view(i, v, self.in_chans)
        batch = views[0].shape[0]
        if any(v.shape[0] != batch for v in views):
            raise ValueError(
                f"views have mismatched batch sizes {[v.shape[0] for v in views]}; expected one batch size B"
            )
        groups = group_by_shape(views)
        if len(groups) == 1:
            return backbone_tensor(self.backbone(torch.cat(list(views))))
        per_view: list[Tensor] = [None] * len(views)  # type: ignore[list-item]
        for idx in groups:
            feats = backbone_tensor(self.backbone(torch.cat([views[i] for i in idx])))
            for i, chunk in zip(idx, feats.split(batch)):
                per_view[i] = chunk
        return torch.cat(per_view)

    @staticmethod
    def _check_image_view(i: int, v: Tensor, in_chans: int) -> None:
        if v.ndim != 4:
            raise ValueError(f"views[{i}] has shape {tuple(v.shape)}, expected a (B, {in_chans}, H, W) batch of images")
        if v.shape[1] != in_chans:
            raise ValueError(
                f"views[{i}] has {v.shape[1]} channels, but the backbone takes in_chans={in_chans}; convert the "
                f"images (e.g. MultiCropRecipe mean/std of length {in_chans}) or build the backbone with "
                f"in_chans={v.shape[1]}"
            )
        if not v.is_floating_point():
            raise TypeError(
                f"views[{i}] has dtype {v.dtype}, expected floating-point images (normalised floats, as "
                "MultiCropTransform and BatchedMultiCrop return)"
            )

    def forward(
        self, views: Union[Tensor, Sequence[Tensor]], return_backbone_feats: bool = False, bottleneck: bool = False
    ) -> Union[Tensor, tuple[Tensor, Tensor]]:
        """Head output of all views; ``bottleneck=True`` stops before a :class:`DINOHead`'s last layer
        (``head.forward_bottleneck``), for a loss that applies it itself. Through this forward, so
        that DistributedDataParallel sees the call either way."""
        feats = self.forward_backbone(views)
        head: Any = self.head  # a DINOHead, or any module when bottleneck=False
        out = head.forward_bottleneck(feats) if bottleneck else head(feats)
        return (out, feats) if return_backbone_feats else out
