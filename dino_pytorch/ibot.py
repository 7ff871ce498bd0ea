"""The iBOT option of :class:`~dino_pytorch.DINO` (DINOv2's recipe): its configuration, the masks of a
step, and the multi-crop wrapper that also returns the masked patches' logits.

With ``DINO(backbone, ..., ibot=IBOTConfig())`` the student sees the global crops with block masks
(:class:`~dino_pytorch.BlockMasking`) and the teacher sees them whole; a patch head maps the masked
patch tokens of both to prototypes, and :class:`~dino_pytorch.IBOTPatchLoss` compares them. The
backbone must be a ViT with DINOv2's features call: ``forward_features(x, masks=None)`` returning
``x_norm_clstoken`` (B, D) and ``x_norm_patchtokens`` (B, N, D), and a ``patch_size``
(:func:`~dino_pytorch.models.dinov2_vit_small` and its family are).

Masks of a step are a pure function of ``(seed, step, micro-batch)``: drawn for the global batch of
all ranks (DINOv2's collate semantics over ``T * W * B`` global crops, crop-major) and dealt to the
ranks as :class:`~dino_pytorch.sampler.ResumableSampler` deals images (rank r holds every W-th
image), so W ranks of B draw the masks of one process of W * B, and a resumed run draws the same
masks again. (DINOv2 draws each rank's masks on its own.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .masking import BlockMasking
from .validate import (
    check_choice,
    check_float,
    check_int,
    check_number_pair,
    check_optional_positive_int,
    check_positive_int,
)
from .wrapper import group_by_shape


@dataclass(frozen=True)
class IBOTConfig:
    """What the iBOT part of DINO does (DINOv2's defaults).

    Attributes:
        weight: weight of the iBOT loss in the total (DINOv2: 1.0).
        head: ``"separate"`` (a patch head of its own, DINOv2's default) or ``"shared"`` (the DINO head).
        mask_probability: share of the global crops that get a mask (DINOv2: 0.5).
        mask_ratio: (low, high) share of a masked crop's patches; the masked crops' targets are
            spread evenly over it (DINOv2: (0.1, 0.5)).
        out_dim: prototypes of a separate patch head (None: DINO's ``out_dim``; DINOv2: 65536).
        hidden_dim: hidden width of a separate patch head (None: the DINO head's).
        bottleneck_dim: bottleneck width of a separate patch head (None: the DINO head's).
        min_num_patches: smallest rectangle of a block mask (:class:`~dino_pytorch.BlockMasking`).
        max_num_patches: largest rectangle (None: half the patch grid, as DINOv2).
        seed: the masks' seed; with the step and the micro-batch it fixes every mask of a run.
    """

    weight: float = 1.0
    head: Literal["separate", "shared"] = "separate"
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    out_dim: Optional[int] = None
    hidden_dim: Optional[int] = None
    bottleneck_dim: Optional[int] = None
    min_num_patches: int = 4
    max_num_patches: Optional[int] = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_float("weight", self.weight, low=0.0)
        check_choice("head", self.head, ("separate", "shared"))
        check_float("mask_probability", self.mask_probability, low=0.0, high=1.0)
        low, high = check_number_pair("mask_ratio", self.mask_ratio)
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"mask_ratio={self.mask_ratio!r}, expected (low, high) with 0 <= low <= high <= 1")
        for name in ("out_dim", "hidden_dim", "bottleneck_dim", "max_num_patches"):
            check_optional_positive_int(name, getattr(self, name))
        check_positive_int("min_num_patches", self.min_num_patches)
        check_int("seed", self.seed, 0)


def check_ibot_config(ibot: Optional[IBOTConfig], fused_head_loss: bool) -> Optional[IBOTConfig]:
    """``DINO(ibot=)``'s value, checked: an :class:`IBOTConfig` or None, never with the fused head loss."""
    if ibot is not None and not isinstance(ibot, IBOTConfig):
        raise TypeError(f"ibot is a {type(ibot).__name__}, expected an IBOTConfig or None")
    if ibot is not None and fused_head_loss:
        raise ValueError("fused_head_loss=True with ibot=: the fused head loss covers the DINO loss only; "
                         "expected one or the other")
    return ibot


def check_masked_backbone(backbone: nn.Module, option: str = "ibot=") -> int:
    """The backbone's ``patch_size``; one line naming what is missing when it cannot run ``option``
    (iBOT, or Gram anchoring: both read DINOv2's patch tokens)."""
    patch = getattr(backbone, "patch_size", None)
    if not callable(getattr(backbone, "forward_features", None)) or not isinstance(patch, int):
        raise TypeError(
            f"{option} needs a ViT with DINOv2's features call, forward_features(x, masks=None) -> "
            f"{{'x_norm_clstoken', 'x_norm_patchtokens', ...}}, and an int patch_size; "
            f"{type(backbone).__name__} has not (use dino_pytorch.models.dinov2_vit_small or its family, or wrap "
            f"our VisionTransformer or a timm ViT with dino_pytorch.models.as_masked_vit)"
        )
    return patch


def step_masks(config: IBOTConfig, grid: tuple[int, int], batch: int, num_global: int, step: int, micro: int,
               rank: int = 0, world_size: int = 1) -> Tensor:
    """(T*B, h*w) bool masks of this rank's global crops (crop-major), on the CPU: see the module docstring.

    Args:
        config: the iBOT options. grid: the patch grid (h, w) of a global crop.
        batch: B, this rank's images. num_global: T. step: the optimizer step.
        micro: the micro-batch within the step. rank: this rank. world_size: W.
    """
    seed = np.random.SeedSequence([config.seed, step, micro]).generate_state(2, dtype=np.uint64)
    generator = torch.Generator().manual_seed(int(seed[0] >> np.uint64(1)))
    masking = BlockMasking(grid, min_num_patches=config.min_num_patches, max_num_patches=config.max_num_patches)
    masks = masking.batch(num_global * world_size * batch, mask_probability=config.mask_probability,
                          mask_ratio=config.mask_ratio, generator=generator)
    # Global crops are crop-major (view t, global image i); rank r holds the images i = r, r + W, ...
    return masks.view(num_global, batch * world_size, -1)[:, rank::world_size].reshape(num_global * batch, -1)


class MaskedMultiCropWrapper(nn.Module):
    """A multi-crop wrapper for iBOT: the DINO head on every view's CLS token, and a patch head on the
    global crops' masked patch tokens; also the student of Gram anchoring (with or without iBOT),
    which reads the global crops' patch tokens (``return_patch_tokens``).

    Args:
        backbone: a ViT with ``forward_features(x, masks=None)`` (see the module docstring).
        head: the DINO head, (N, D) -> (N, K).
        patch_head: the patch head, or None to share ``head``.

    Shapes:
        views: V tensors (B, C, H_v, W_v), the ``num_global`` global crops first.
        patch_index: (M,) long indices into the (T*B*N) patch tokens of the global crops (crop-major,
            row-major patches): the masked patches, ``masks.flatten().nonzero()``; None: no patch head
            (``patch_logits`` is None: Gram anchoring without iBOT).
        masks: (T*B, N) bool, or None (the teacher: the crops whole).
        returns: ``(logits (V*B, K), patch_logits (M, K_p))``, plus the (V*B, D) CLS features with
            ``return_backbone_feats``, then the global crops' (T*B, N, D) final-norm patch tokens
            (``x_norm_patchtokens``, masked where ``masks``) with ``return_patch_tokens``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, patch_head: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.backbone, self.head, self.patch_head = backbone, head, patch_head

    def forward(self, views: list[Tensor], num_global: int, patch_index: Optional[Tensor] = None,
                masks: Optional[Tensor] = None, return_backbone_feats: bool = False,
                return_patch_tokens: bool = False) -> tuple[Any, ...]:
        backbone: Any = self.backbone
        out = backbone.forward_features(torch.cat(views[:num_global]), masks=masks)
        per_view: list[Tensor] = list(out["x_norm_clstoken"].chunk(num_global))
        locals_ = views[num_global:]
        local_feats: list[Any] = [None] * len(locals_)
        for idx in group_by_shape(locals_):
            feats = backbone.forward_features(torch.cat([locals_[i] for i in idx]))["x_norm_clstoken"]
            for i, chunk in zip(idx, feats.chunk(len(idx))):
                local_feats[i] = chunk
        feats = torch.cat(per_view + local_feats)
        logits = self.head(feats)
        tokens = out["x_norm_patchtokens"]
        patch_logits: Optional[Tensor] = None
        if patch_index is not None:
            patch_head = self.head if self.patch_head is None else self.patch_head
            patch_logits = patch_head(tokens.flatten(0, 1).index_select(0, patch_index))
        return ((logits, patch_logits) + ((feats,) if return_backbone_feats else ())
                + ((tokens,) if return_patch_tokens else ()))
