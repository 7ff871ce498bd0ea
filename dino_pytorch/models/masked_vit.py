"""DINOv2's masked features call for ViTs that lack it: our v1 :class:`VisionTransformer` and timm's.

``DINO(..., ibot=IBOTConfig())`` needs ``forward_features(x, masks=None)`` returning DINOv2's dict
and an int ``patch_size`` (:func:`~dino_pytorch.ibot.check_masked_backbone`). :func:`as_masked_vit`
gives them to a ViT that has not, without editing or copying it::

    e_j = mask_token if masks[:, j] else PatchEmbed(image)_j     then the model's own positions,
                                                                  blocks and final norm

The mask token is the adapter's parameter (zeros, DINOv2's init), set in after the patch embedding
and before the position embedding, as DINOv2 does. Every other step is the wrapped model's own
module or method (its ``interpolate_pos_encoding`` / ``_pos_embed``, blocks, norms and, for timm,
``forward_head(pre_logits=True)``), so without masks the features are bit for bit the model's own.

The wrapped model's parameters are shared, never copied: training the adapter trains the model you
passed. Its ``state_dict`` keys are the model's under ``vit.``, plus ``mask_token``;
:func:`strip_masked_vit` turns such a dict (or a DINO checkpoint's ``backbone.vit.`` keys) back into
the plain model's layout for export, and ``adapter.vit`` is the plain model itself.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .dinov2_vit import Dinov2Calls, Dinov2Features, DinoVisionTransformer
from .vision_transformer import VisionTransformer

PREFIX = "vit."  # where the wrapped model's state_dict keys appear in the adapter's


def _timm_vit_class() -> Optional[type]:
    """timm's ``VisionTransformer`` class when timm is imported (a timm model implies it); else None."""
    module = sys.modules.get("timm.models.vision_transformer")
    return getattr(module, "VisionTransformer", None)


def _is_timm_vit(model: nn.Module) -> bool:
    cls = _timm_vit_class()
    return cls is not None and isinstance(model, cls)


def _timm_patch_size(vit: Any) -> int:
    """timm's (p, p) patch size as an int; a one-line ValueError for what the adapter cannot mask."""
    patch = tuple(getattr(vit.patch_embed, "patch_size", ()))
    if len(patch) != 2 or patch[0] != patch[1]:
        raise ValueError(f"{type(vit).__name__} has patch_size={patch!r}, expected square patches (p, p)")
    if not isinstance(vit.patch_drop, nn.Identity):
        raise ValueError(f"{type(vit).__name__} has patch_drop_rate > 0: it drops patch tokens, and iBOT needs "
                         "every patch; build it with patch_drop_rate=0")
    return int(patch[0])


class MaskedViT(Dinov2Calls):
    """A ViT with DINOv2's ``forward_features(x, masks=None)``: see the module docstring.

    Args:
        vit: our v1 :class:`~dino_pytorch.models.VisionTransformer`, or a timm
            ``timm.models.vision_transformer.VisionTransformer`` (registers ``reg_tokens``,
            ``no_embed_class``, ``class_token=False`` with another pooling, ``dynamic_img_size``).

    Attributes:
        vit: the wrapped model (shared, not copied). mask_token: (1, D) parameter, zeros at init.
        patch_size, embed_dim (= num_features), in_chans, num_register_tokens: the model's.

    Shapes:
        forward_features: (B, C, H, W) and masks (B, N) bool (True = masked) or None -> dict with
            ``x_norm_clstoken`` (B, D), ``x_norm_regtokens`` (B, R, D), ``x_norm_patchtokens``
            (B, N, D), ``x_prenorm`` (B, P + N, D) (P prefix tokens, CLS and registers) and ``masks``.
        forward: (B, C, H, W) -> (B, D) the model's own features (``x_norm_clstoken``).

    ``x_norm_clstoken`` is the model's own feature: our v1 ViT's final-normed CLS token (its
    ``forward`` without ``head``, which is an Identity for DINO backbones); for timm,
    ``forward_head(features, pre_logits=True)``, the CLS token with ``global_pool="token"`` (the
    pooled tokens with another pooling). Patch tokens are the model's final-normed ones; a timm
    model that norms after pooling (``fc_norm``, ``norm`` an Identity) has ``fc_norm`` applied to each.

    Raises:
        TypeError: ``vit`` is not one of the ViTs above.
        ValueError: a timm ViT with non-square patches or patch dropout; in the forwards, masks that
            are not a (B, N) bool tensor.
    """

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        if isinstance(vit, VisionTransformer):
            self.family = "dino"
            patch = vit.patch_size
        elif _is_timm_vit(vit):
            self.family = "timm"
            patch = _timm_patch_size(vit)
        else:
            raise TypeError(f"as_masked_vit takes dino_pytorch.models.VisionTransformer or a timm VisionTransformer, "
                            f"got {type(vit).__name__}")
        self.vit = vit
        timm: Any = vit
        self.patch_size: int = patch
        self.num_features = self.embed_dim = int(timm.embed_dim)
        self.in_chans = int(timm.in_chans)
        self.num_prefix_tokens = 1 if self.family == "dino" else int(timm.num_prefix_tokens)
        has_cls = self.family == "dino" or bool(getattr(timm, "has_class_token", timm.cls_token is not None))
        self.num_register_tokens = self.num_prefix_tokens - int(has_cls)
        self._has_cls = has_cls
        param = next(vit.parameters())
        self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim, device=param.device, dtype=param.dtype))

    # ----------------------------------------------------------------------- masks

    def _apply_masks(self, patches: Tensor, masks: Optional[Tensor]) -> Tensor:
        """Patch embeddings (B, N, D), or (B, h, w, D) for timm's dynamic size, with the masked ones
        replaced by ``mask_token``; ``masks`` (B, N) bool checked against them."""
        if masks is None:
            return patches
        expected = (patches.shape[0], patches[0, ..., 0].numel())
        if not isinstance(masks, Tensor) or masks.dtype != torch.bool or tuple(masks.shape) != expected:
            got = f"{tuple(masks.shape)} {masks.dtype}" if isinstance(masks, Tensor) else type(masks).__name__
            raise ValueError(f"masks is {got}, expected a bool tensor of shape {expected} (True = masked patch)")
        masked = masks.to(patches.device).view(*patches.shape[:-1], 1)
        # where(), not an in-place write, as DINOv2: the kept patches keep their graph.
        return torch.where(masked, self.mask_token.to(patches.dtype), patches)

    # ----------------------------------------------------------------------- the two families

    def _dino_tokens(self, x: Tensor, masks: Optional[Tensor]) -> Tensor:
        """Our v1 ViT: its ``prepare_tokens`` with the mask set in, then its blocks. (B, 1 + N, D) pre-norm."""
        vit: Any = self.vit
        vit._check_input(x)
        _, _, w, h = x.shape
        patches = self._apply_masks(vit.patch_embed(x), masks)
        tokens = torch.cat((vit.cls_token.expand(patches.shape[0], -1, -1), patches), dim=1)
        tokens = vit.pos_drop(tokens + vit.interpolate_pos_encoding(tokens, w, h))
        for blk in vit.blocks:
            tokens = blk(tokens)
        return tokens

    def _timm_tokens(self, x: Tensor, masks: Optional[Tensor]) -> Tensor:
        """timm: its ``forward_features`` with the mask set in after ``patch_embed``; (B, P + N, D) pre-norm."""
        vit: Any = self.vit
        tokens = vit._pos_embed(self._apply_masks(vit.patch_embed(x), masks))
        tokens = vit.norm_pre(vit.patch_drop(tokens))
        if getattr(vit, "grad_checkpointing", False) and not torch.jit.is_scripting():
            from timm.models import checkpoint_seq  # timm is imported: vit is a timm model

            return checkpoint_seq(vit.blocks, tokens)
        return vit.blocks(tokens)

    def _features(self, x: Tensor, masks: Optional[Tensor]) -> Dinov2Features:
        vit: Any = self.vit
        p = self.num_prefix_tokens
        if self.family == "dino":
            prenorm = self._dino_tokens(x, masks)
            normed = vit.norm(prenorm)
            cls, patches = normed[:, 0], normed[:, p:]
        else:
            prenorm = self._timm_tokens(x, masks)
            normed = vit.norm(prenorm)
            cls, patches = vit.forward_head(normed, pre_logits=True), normed[:, p:]
            fc_norm = getattr(vit, "fc_norm", None)
            if isinstance(vit.norm, nn.Identity) and isinstance(fc_norm, nn.Module):
                patches = fc_norm(patches)  # the model norms after pooling: the same norm per token
        regs = normed[:, int(self._has_cls):p]
        return Dinov2Features(x_norm_clstoken=cls, x_norm_regtokens=regs, x_norm_patchtokens=patches,
                              x_prenorm=prenorm, masks=masks)

    # ----------------------------------------------------------------------- DINOv2's calls

    def extra_repr(self) -> str:
        return f"family={self.family!r}, patch_size={self.patch_size}, mask_token=(1, {self.embed_dim})"


def as_masked_vit(vit: nn.Module) -> nn.Module:
    """``vit`` with DINOv2's ``forward_features(x, masks=None)``, for ``DINO(..., ibot=IBOTConfig())``.

    A :class:`~dino_pytorch.models.DinoVisionTransformer` or a :class:`MaskedViT` already has it and
    is returned as it is; our v1 ViT and timm ViTs are wrapped in a :class:`MaskedViT` (parameters
    shared, keys under ``vit.``). Anything else: a one-line TypeError.
    """
    if isinstance(vit, (DinoVisionTransformer, MaskedViT)):
        return vit
    return MaskedViT(vit)


def strip_masked_vit(state_dict: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A :class:`MaskedViT` state_dict in the plain model's layout: ``{prefix}vit.k`` -> ``{prefix}k``,
    ``{prefix}mask_token`` dropped, other keys kept. ``prefix="backbone."`` converts the student or
    teacher of a DINO checkpoint (``backbone.vit.blocks.0...`` -> ``backbone.blocks.0...``)."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        if key == prefix + "mask_token":
            continue
        if key.startswith(prefix + PREFIX):
            key = prefix + key[len(prefix + PREFIX):]
        out[key] = value
    return out
