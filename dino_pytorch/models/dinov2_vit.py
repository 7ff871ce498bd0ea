"""DINOv2's Vision Transformer: registers, layer-scale and a mask token, under DINOv2's parameter names.

The token sequence of an image with N patches and R registers, and one block (pre-norm)::

    x = [cls + pos_0,  reg_1 .. reg_R,  e_1 + pos_1 .. e_N + pos_N]      (B, 1 + R + N, D)
    e_j = mask_token where masks[:, j] else PatchEmbed(image)_j           (iBOT's masked patches)
    x <- x + ls1 * attn(norm1(x))          ls = LayerScale: a learned (D,) gain, or 1 without it
    x <- x + ls2 * mlp(norm2(x))

Registers carry no position (they are not image locations). The stored position table has
``(img_size // patch_size)**2 + 1`` rows and is resized bicubically for other grids, exactly as
DINOv2 does (:meth:`DinoVisionTransformer.interpolate_pos_encoding`).

Parameter names are DINOv2's released ones (``cls_token``, ``pos_embed``, ``register_tokens``,
``mask_token``, ``blocks.{i}.ls1.gamma`` ...), so a released backbone file loads with a plain
``load_state_dict``; training checkpoints (``teacher.backbone.`` prefixes, ``block_chunks`` keys)
load through :func:`~dino_pytorch.models.dinov2_weights.load_dinov2_state_dict`. The blocks are
in :mod:`.dinov2_layers`; the patch embedding is the v1 one (same maths and names in DINOv2).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Callable, Optional, TypedDict, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..validate import check_bool, check_choice, check_float, check_int, check_positive_float, check_positive_ints
from .dinov2_layers import LayerScaleBlock
from .vision_transformer import PatchEmbed, _init_weights, _square_size


class Dinov2Features(TypedDict):
    """What :meth:`DinoVisionTransformer.forward_features` returns (DINOv2's keys)."""

    x_norm_clstoken: Tensor  # (B, D) final-normed CLS token
    x_norm_regtokens: Tensor  # (B, R, D) final-normed registers (R = 0: an empty (B, 0, D))
    x_norm_patchtokens: Tensor  # (B, N, D) final-normed patch tokens
    x_prenorm: Tensor  # (B, 1 + R + N, D) the last block's output before the final norm
    masks: Optional[Tensor]  # (B, N) bool, the masks given (None without)


def _check_options(**options: Any) -> dict[str, Any]:
    """The DINOv2-only options of :class:`DinoVisionTransformer`, validated and normalised."""
    init_values = options["init_values"]
    if init_values is not None:
        init_values = check_float("init_values", init_values, low=0.0, what="None or a finite number >= 0")
    rate = check_float("drop_path_rate", options["drop_path_rate"], low=0.0, high=1.0, high_open=True,
                       what="a probability in [0, 1)")
    return dict(
        init_values=init_values or None,  # DINOv2: 0 also means no layer-scale
        drop_path_rate=rate,
        num_register_tokens=check_int("num_register_tokens", options["num_register_tokens"], 0),
        block_chunks=check_int("block_chunks", options["block_chunks"], 0),
        interpolate_offset=check_float("interpolate_offset", options["interpolate_offset"], low=0.0),
        mlp_ratio=check_positive_float("mlp_ratio", options["mlp_ratio"]),
        **{name: check_bool(name, options[name]) for name in (
            "qkv_bias", "ffn_bias", "proj_bias", "drop_path_uniform", "interpolate_antialias")},
    )


class Dinov2Calls(nn.Module):
    """DINOv2's two calls over a model's ``_features(x, masks) -> Dinov2Features``: shared by
    :class:`DinoVisionTransformer` and the adapter of other ViTs (:mod:`.masked_vit`)."""

    # Each model computes its tokens its own way: (B, C, H, W) images and (B, N) masks -> the dict.
    _features: Callable[[Tensor, Optional[Tensor]], Dinov2Features]

    def _cls_output(self, cls: Tensor) -> Tensor:
        return cls

    def forward_features(
        self, x: Union[Tensor, list[Tensor]], masks: Union[Tensor, None, list[Optional[Tensor]]] = None
    ) -> Union[Dinov2Features, list[Dinov2Features]]:
        """DINOv2's features of (B, C, H, W) images, masked patches (``masks`` (B, N) bool) replaced.

        A list of image batches (e.g. global and local crops, with a list of masks or None) gives
        a list of results, each batch run on its own (DINOv2 joins them with xFormers' nested
        attention, which gives the same numbers).
        """
        if isinstance(x, list):
            mask_list = masks if isinstance(masks, list) else [None] * len(x)
            if len(mask_list) != len(x):
                raise ValueError(f"{len(x)} image batches but {len(mask_list)} masks")
            return [self._features(xi, mi) for xi, mi in zip(x, mask_list)]
        if isinstance(masks, list):
            raise TypeError("masks is a list but x is a tensor; expected a (B, N) bool tensor or None")
        return self._features(x, masks)

    def forward(
        self, x: Tensor, masks: Optional[Tensor] = None, *, is_training: bool = False
    ) -> Union[Tensor, Dinov2Features, list[Dinov2Features]]:
        """(B, C, H, W) -> (B, D) final-normed CLS features; ``is_training=True`` returns
        :meth:`forward_features`' dict instead, as DINOv2's forward."""
        out = self.forward_features(x, masks)
        if is_training:
            return out
        if isinstance(out, list):
            raise TypeError("forward(list of batches) needs is_training=True (it returns one dict per batch)")
        return self._cls_output(out["x_norm_clstoken"])


class DinoVisionTransformer(Dinov2Calls):
    """DINOv2's ViT: registers, layer-scale, a mask token; DINOv2's ``state_dict`` layout and numerics.

    Args:
        img_size: side of the square training resolution; sets the stored position table.
        patch_size: side of the square patches; image sides must be multiples of it.
        in_chans: input channels.
        embed_dim: token width D.
        depth: number of blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width as a multiple of ``embed_dim``.
        qkv_bias: a bias in the query/key/value projection.
        ffn_bias: biases in the MLP's two Linears.
        proj_bias: a bias in the attention's output projection.
        drop_path_rate: stochastic depth of the last block (block i gets ``i / (depth - 1)`` of it).
        drop_path_uniform: every block gets ``drop_path_rate``.
        init_values: layer-scale start value; None or 0 give no layer-scale (DINOv2's default).
            The released models were built with 1.0 (the files hold the trained gains).
        num_register_tokens: R extra learned tokens after CLS, without position (0: none).
        interpolate_antialias: antialias in the bicubic position resize (DINOv2 ``_reg`` models).
        interpolate_offset: the resize's scale factor is ``(grid + offset) / stored grid``; 0 resizes
            to the grid size directly (DINOv2 ``_reg`` models).
        block_chunks: DINOv2's FSDP wrapping unit; recorded only. The blocks are always one flat
            list (chunks do not change the maths); chunked checkpoints load through
            :func:`~dino_pytorch.models.dinov2_weights.load_dinov2_state_dict`.
        ffn_layer: ``"mlp"`` (the only FFN here; DINOv2's SwiGLU for ViT-g is not implemented).

    Raises:
        TypeError, ValueError: on a bad argument, naming it; the forwards on an input that is not a
            floating-point (B, in_chans, H, W) tensor with H and W multiples of ``patch_size``, or
            masks that are not a bool (B, N) tensor.

    Shapes:
        forward: (B, C, H, W) -> (B, D) final-normed CLS token.
        forward_features: (B, C, H, W) -> :class:`Dinov2Features`; N = (H / p)(W / p).
    """

    def __init__(
        self,
        img_size: Union[int, Sequence[int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: Optional[float] = None,
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        block_chunks: int = 1,
        ffn_layer: str = "mlp",
    ) -> None:
        super().__init__()
        img_size = _square_size(img_size)
        patch_size, in_chans, embed_dim, depth, num_heads = check_positive_ints(
            patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth, num_heads=num_heads)
        if patch_size > img_size:
            raise ValueError(f"patch_size={patch_size} is larger than img_size={img_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        check_choice("ffn_layer", ffn_layer, ("mlp",))
        o = _check_options(
            init_values=init_values, drop_path_rate=drop_path_rate, num_register_tokens=num_register_tokens,
            block_chunks=block_chunks, interpolate_offset=interpolate_offset, mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias, ffn_bias=ffn_bias, proj_bias=proj_bias, drop_path_uniform=drop_path_uniform,
            interpolate_antialias=interpolate_antialias)
        if int(embed_dim * o["mlp_ratio"]) < 1:
            raise ValueError(f"mlp_ratio={mlp_ratio!r} gives an MLP of 0 hidden units at embed_dim={embed_dim}")

        self.num_features = self.embed_dim = embed_dim
        self.num_heads, self.patch_size, self.in_chans = num_heads, patch_size, in_chans
        self.depth = self.n_blocks = depth
        self.num_tokens = 1  # the CLS token (DINOv2's name); registers are counted apart
        self.num_register_tokens = o["num_register_tokens"]
        self.interpolate_antialias = o["interpolate_antialias"]
        self.interpolate_offset = o["interpolate_offset"]
        self.block_chunks = o["block_chunks"]
        self.init_values = o["init_values"]

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.register_tokens: Optional[nn.Parameter] = (
            nn.Parameter(torch.zeros(1, self.num_register_tokens, embed_dim)) if self.num_register_tokens else None
        )
        # float64 rates as DINOv2's np.linspace; on cpu so a meta-device context does not catch them.
        rates = ([o["drop_path_rate"]] * depth if o["drop_path_uniform"] else
                 torch.linspace(0, o["drop_path_rate"], depth, dtype=torch.float64, device="cpu").tolist())
        self.blocks = nn.ModuleList(
            LayerScaleBlock(embed_dim, num_heads, o["mlp_ratio"], o["qkv_bias"], o["proj_bias"], o["ffn_bias"],
                            o["init_values"], rates[i])
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()  # DINOv2 has one; a backbone has no classifier
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # zeros, as DINOv2 (never re-drawn)
        self._init_weights()

    def _init_weights(self) -> None:
        # DINOv2's init: positions trunc-normal(0.02) (bounds +-2, absolute), CLS and registers
        # normal(1e-6), every Linear trunc-normal(0.02) with zero bias; LayerNorm 1 / 0, the patch
        # Conv2d at PyTorch's default and layer-scale at init_values are left as built.
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-2.0, b=2.0)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        self.apply(_init_weights)

    # ------------------------------------------------------------------------- tokens

    def _position_table(self, num_patches: int, w: int, h: int, dtype: torch.dtype) -> Tensor:
        """(1, 1 + num_patches, D) positions for an image of ``w`` rows and ``h`` columns."""
        stored = self.pos_embed.shape[1] - 1
        if num_patches == stored and w == h:
            return self.pos_embed
        side = math.isqrt(stored)
        if side * side != stored:
            raise RuntimeError(f"pos_embed holds {stored} patch positions, not a square grid")
        rows, cols = w // self.patch_size, h // self.patch_size
        # Resized in float32 whatever the parameter dtype (bicubic weights in bf16 are coarse).
        table = self.pos_embed.float()
        grid = rearrange(table[:, 1:], "1 (r c) d -> 1 d r c", r=side)
        if self.interpolate_offset:
            # The sampling coordinates follow the scale factor, so the offset moves them too: kept
            # for the numerics of checkpoints trained with it (DINO's historical +0.1).
            resize: dict[str, Any] = {"scale_factor": ((rows + self.interpolate_offset) / side,
                                                       (cols + self.interpolate_offset) / side)}
        else:
            resize = {"size": (rows, cols)}
        grid = F.interpolate(grid, mode="bicubic", antialias=self.interpolate_antialias, **resize)
        if grid.shape[-2:] != (rows, cols):
            raise RuntimeError(f"position interpolation gave a {tuple(grid.shape[-2:])} grid, expected {(rows, cols)}")
        patches = rearrange(grid, "1 d r c -> 1 (r c) d")
        return torch.cat((table[:, :1], patches), dim=1).to(dtype)

    def interpolate_pos_encoding(self, x: Tensor, w: int, h: int) -> Tensor:
        """Position table for tokens ``x`` (B, 1 + N, D) (CLS and patches) of a ``w`` x ``h`` image.

        DINOv2's numerics: the stored table unchanged when N matches and ``w == h``; otherwise the
        patch grid resized bicubically (float32, ``antialias=interpolate_antialias``) with
        ``scale_factor = ((w // p + offset) / sqrt(N0), (h // p + offset) / sqrt(N0))`` when
        ``interpolate_offset`` is non-zero, else ``size = (w // p, h // p)``. ``w`` is the image
        height and ``h`` its width (DINOv2's names). Returns (1, 1 + N, D) in ``x``'s dtype.
        """
        return self._position_table(x.shape[1] - 1, w, h, x.dtype)

    def _check_input(self, x: Tensor, masks: Optional[Tensor]) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x is a {type(x).__name__}, expected a (B, C, H, W) tensor")
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected (B, {self.in_chans}, H, W)")
        if not x.is_floating_point():
            raise TypeError(f"x has dtype {x.dtype}, expected floating-point images (normalised floats)")
        p = self.patch_size
        if x.shape[-2] % p or x.shape[-1] % p or min(x.shape[-2:]) < p:
            raise ValueError(f"x has spatial size {tuple(x.shape[-2:])}, expected positive multiples of "
                             f"patch_size={p} (e.g. {16 * p} or {37 * p}; DINOv2's local crops are {7 * p})")
        if masks is None:
            return
        expected = (x.shape[0], (x.shape[-2] // p) * (x.shape[-1] // p))
        if not isinstance(masks, Tensor) or masks.dtype != torch.bool or tuple(masks.shape) != expected:
            got = f"{tuple(masks.shape)} {masks.dtype}" if isinstance(masks, Tensor) else type(masks).__name__
            raise ValueError(f"masks is {got}, expected a bool tensor of shape {expected} (True = masked patch)")

    def prepare_tokens_with_masks(self, x: Tensor, masks: Optional[Tensor] = None) -> Tensor:
        """(B, C, H, W) -> (B, 1 + R + N, D): CLS, registers, patches; masked patches (``masks``
        (B, N) bool, True = masked) replaced by ``mask_token`` before the positions are added."""
        self._check_input(x, masks)
        b, _, w, h = x.shape
        patches = self.patch_embed(x)
        if masks is not None:
            # where(), not an in-place write: the patch embedding keeps its graph for the kept patches.
            patches = torch.where(masks.unsqueeze(-1), self.mask_token.to(patches.dtype), patches)
        pos = self._position_table(patches.shape[1], w, h, patches.dtype)
        tokens = [(self.cls_token + pos[:, :1]).expand(b, -1, -1)]
        if self.register_tokens is not None:
            tokens.append(self.register_tokens.expand(b, -1, -1))  # no position: not an image location
        tokens.append(patches + pos[:, 1:])
        return torch.cat(tokens, dim=1)

    # ----------------------------------------------------------------------- forwards

    def _features(self, x: Tensor, masks: Optional[Tensor]) -> Dinov2Features:
        tokens = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            tokens = blk(tokens)
        normed = self.norm(tokens)
        r = self.num_register_tokens
        return Dinov2Features(x_norm_clstoken=normed[:, 0], x_norm_regtokens=normed[:, 1:1 + r],
                              x_norm_patchtokens=normed[:, 1 + r:], x_prenorm=tokens, masks=masks)

    def _cls_output(self, cls: Tensor) -> Tensor:
        return self.head(cls)  # an Identity, as DINOv2's

    def get_intermediate_layers(
        self, x: Tensor, n: Union[int, Sequence[int]] = 1, reshape: bool = False,
        return_class_token: bool = False, norm: bool = True,
    ) -> tuple[Any, ...]:
        """DINOv2's intermediate outputs: the patch tokens of the last ``n`` blocks (or of the blocks
        indexed by ``n``), registers and CLS removed.

        Returns a tuple of (B, N, D) tensors, or (B, D, H / p, W / p) maps with ``reshape``; with
        ``return_class_token`` a tuple of (patch tokens, (B, D) CLS) pairs. ``norm`` applies the final
        LayerNorm to each. (The v1 ViT's method of this name returns all tokens instead.)
        """
        take = range(self.depth - n, self.depth) if isinstance(n, int) else list(n)
        if any(not 0 <= i < self.depth for i in take):
            raise ValueError(f"n={n!r}, expected a count in [1, depth={self.depth}] or block indices below it")
        tokens, outputs = self.prepare_tokens_with_masks(x), []
        for i, blk in enumerate(self.blocks):
            tokens = blk(tokens)
            if i in take:
                outputs.append(self.norm(tokens) if norm else tokens)
        classes = [out[:, 0] for out in outputs]
        patches = [out[:, 1 + self.num_register_tokens:] for out in outputs]
        if reshape:
            rows, cols = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
            patches = [rearrange(p, "b (r c) d -> b d r c", r=rows, c=cols).contiguous() for p in patches]
        return tuple(zip(patches, classes)) if return_class_token else tuple(patches)

    def get_last_selfattention(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, heads, T, T) attention probabilities of the last block, T = 1 + R + N."""
        tokens = self.prepare_tokens_with_masks(x)
        for blk in self.blocks[:-1]:
            tokens = blk(tokens)
        last: LayerScaleBlock = self.blocks[-1]  # type: ignore[assignment]  # ModuleList items are Modules
        return last.attention_probabilities(tokens)


def _dinov2_vit(width: int, depth: int, heads: int, /, **kwargs: Any) -> DinoVisionTransformer:
    # DINOv2's hub defaults except init_values (None: the class default); any can be overridden.
    options: dict[str, Any] = dict(
        embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=4.0, patch_size=14, img_size=518,
        num_register_tokens=0, init_values=None, interpolate_antialias=False, interpolate_offset=0.1,
        block_chunks=0, drop_path_rate=0.0,
    )
    options.update(kwargs)
    return DinoVisionTransformer(**options)


def dinov2_vit_small(**kwargs: Any) -> DinoVisionTransformer:
    """DINOv2 ViT-S: D 384, 6 heads, depth 12; /14 at 518 px by default (22M parameters)."""
    return _dinov2_vit(384, 12, 6, **kwargs)


def dinov2_vit_base(**kwargs: Any) -> DinoVisionTransformer:
    """DINOv2 ViT-B: D 768, 12 heads, depth 12; /14 at 518 px by default (86M parameters)."""
    return _dinov2_vit(768, 12, 12, **kwargs)


def dinov2_vit_large(**kwargs: Any) -> DinoVisionTransformer:
    """DINOv2 ViT-L: D 1024, 16 heads, depth 24; /14 at 518 px by default (304M parameters)."""
    return _dinov2_vit(1024, 24, 16, **kwargs)
