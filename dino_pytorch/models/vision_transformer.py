"""The Vision Transformer of the official DINO code, parameter for parameter.

Parameter names, init and the position-embedding interpolation are the official ones, so a
released DINO backbone loads with ``strict=True`` (after stripping ``module.`` / ``backbone.``) and
gives the same features. Two things differ from the official module, neither numerically:
attention runs through ``F.scaled_dot_product_attention`` unless its weights are asked for, and
``forward`` applies ``head`` (an Identity unless ``num_classes > 0``; the official forward skips it).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any, Callable, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..validate import (
    check_bool,
    check_float,
    check_int,
    check_positive_float,
    check_positive_int,
    check_positive_ints,
)


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False) -> Tensor:
    """Stochastic depth: zero whole samples with probability ``drop_prob``, rescale the rest.

    Shapes: (B, ...) -> (B, ...); identity when not training or ``drop_prob == 0``.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    # floor(keep + U[0, 1)) is Bernoulli(keep), drawn as the official code draws it.
    mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)).floor_()
    return x.div(keep) * mask


class DropPath(nn.Module):
    """:func:`drop_path` as a module (residual branches of :class:`Block`)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.4f}"


class Mlp(nn.Module):
    """``fc1 -> GELU (exact) -> dropout -> fc2 -> dropout``. Shapes: (B, N, D) -> (B, N, D)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection.

    Shapes: x (B, N, D) -> (B, N, D); with ``return_attention=True`` also the post-softmax,
    post-dropout probabilities (B, heads, N, N).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: Union[float, None] = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        # `or` as official: qk_scale=0 also falls back to 1/sqrt(head_dim).
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, return_attention: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        attn: Union[Tensor, None] = None  # set (and returned) only with return_attention
        if return_attention:
            attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
            out = attn @ v
        else:
            # Same maths; the fused kernels never materialise the (N, N) matrix.
            p = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.scale)
        out = self.proj_drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))
        return (out, attn) if attn is not None else out


class Block(nn.Module):
    """Pre-norm transformer block: ``x + DropPath(attn(norm1 x))``, then ``x + DropPath(mlp(norm2 x))``.

    Shapes: (B, N, D) -> (B, N, D); with ``return_attention=True`` returns the attention
    probabilities (B, heads, N, N) of this block instead (the MLP is not run).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: Union[float, None] = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor:
        if return_attention:
            return self.attn(self.norm1(x), return_attention=True)[1]
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches through a Conv2d (kernel = stride = p).

    Shapes: (B, C, H, W) -> (B, (H // p) * (W // p), D), patches in row-major order.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return rearrange(self.proj(x), "b d h w -> b (h w) d")


def _square_size(img_size: Union[int, Sequence[int]]) -> int:
    # The official signature takes a list ([224]); the position grid is square either way.
    if isinstance(img_size, (list, tuple)):
        if not img_size or any(s != img_size[0] for s in img_size):
            raise ValueError(f"img_size={img_size!r}, expected an int or a sequence of equal ints (a square grid)")
        img_size = img_size[0]
    return check_positive_int("img_size", img_size)


def _init_weights(module: nn.Module) -> None:
    # Official bounds are absolute (+-2), i.e. about 100 sigma: effectively a plain normal.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class VisionTransformer(nn.Module):
    """ViT as in the official DINO code; any image size at run time via position interpolation.

    Args:
        img_size: side of the square training resolution; sets the stored position table
            (``(img_size // patch_size)**2 + 1`` rows). Other sizes are interpolated.
        patch_size: side of the square patches.
        in_chans: input channels.
        embed_dim: token width D.
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: hidden width of each block's MLP, as a multiple of ``embed_dim`` (at least one unit).
        qkv_bias: a bias in the query/key/value projection.
        qk_scale: attention logit scale, a number >= 0; None or 0 (official ``qk_scale or ...``) give
            ``head_dim ** -0.5``.
        num_classes: 0 gives ``head = Identity`` (DINO backbones); > 0 a Linear classifier.
        drop_rate: dropout on tokens.
        attn_drop_rate: dropout on attention probabilities.
        drop_path_rate: stochastic depth of the last block; block i gets ``i / (depth-1)`` of it.
        norm_layer: ``norm_layer(dim)`` builds each LayerNorm. The class default is
            ``nn.LayerNorm`` (eps 1e-5) as official; :func:`vit_small` & co. use eps 1e-6.

    Raises:
        TypeError, ValueError: on a bad argument, naming it and the value given; the forwards on an
            input that is not a floating-point (B, in_chans, H, W) tensor at least ``patch_size`` on
            each side.

    Shapes:
        forward: (B, C, H, W) -> (B, D) final-normed CLS token (``head`` applied: (B, num_classes)
            when ``num_classes > 0``). H and W need not be ``img_size`` nor equal; they are
            floored to multiples of ``patch_size`` by the patch convolution.
        get_last_selfattention: (B, C, H, W) -> (B, heads, N+1, N+1), N = (H//p)(W//p).
        get_intermediate_layers: (B, C, H, W) -> list of n tensors (B, N+1, D).
    """

    def __init__(
        self,
        img_size: Union[int, Sequence[int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 0,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: Union[float, None] = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        img_size = _square_size(img_size)
        patch_size, in_chans, embed_dim, depth, num_heads = check_positive_ints(
            patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth, num_heads=num_heads
        )
        num_classes = check_int("num_classes", num_classes, 0)
        if patch_size > img_size:
            raise ValueError(f"patch_size={patch_size} is larger than img_size={img_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        mlp_ratio = check_positive_float("mlp_ratio", mlp_ratio)
        if int(embed_dim * mlp_ratio) < 1:
            raise ValueError(
                f"mlp_ratio={mlp_ratio!r} gives an MLP of int({embed_dim} * {mlp_ratio!r}) = 0 hidden units, "
                f"expected mlp_ratio >= 1 / embed_dim = {1 / embed_dim:.3g}"
            )
        qkv_bias = check_bool("qkv_bias", qkv_bias)
        if qk_scale is not None:
            # 0 keeps the official meaning (`qk_scale or head_dim ** -0.5`): the default scale.
            qk_scale = check_float("qk_scale", qk_scale, low=0.0, what="None or a finite number >= 0")
        if isinstance(norm_layer, nn.Module) or not callable(norm_layer):
            raise TypeError(
                f"norm_layer={norm_layer!r}, expected a callable that builds a norm layer from the width, "
                "e.g. nn.LayerNorm or partial(nn.LayerNorm, eps=1e-6) (a class, not a module instance)"
            )
        # Dropout and stochastic depth rescale by 1 / (1 - rate): every rate is below 1.
        drop_rate, attn_drop_rate, drop_path_rate = (
            check_float(name, value, low=0.0, high=1.0, high_open=True, what="a probability in [0, 1)")
            for name, value in (("drop_rate", drop_rate), ("attn_drop_rate", attn_drop_rate),
                                ("drop_path_rate", drop_path_rate))
        )

        self.num_features = self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.depth = depth
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)
        # float32 linspace as official (cpu: also under a meta-device context); block 0: 0 -> Identity
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, rates[i], norm_layer)
            for i in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-2.0, b=2.0)
        nn.init.trunc_normal_(self.cls_token, std=0.02, a=-2.0, b=2.0)
        # Linear and LayerNorm only: the patch-embed Conv2d keeps PyTorch's default init, as official.
        self.apply(_init_weights)

    def interpolate_pos_encoding(self, x: Tensor, w: int, h: int) -> Tensor:
        """Position table for tokens ``x`` (B, n+1, D) of an image with ``w`` rows and ``h`` columns.

        Official numerics: the stored table is returned unchanged when the patch count matches and
        the image is square; otherwise the patch grid is resized bicubically with
        ``scale_factor = ((w // p + 0.1) / sqrt(N), (h // p + 0.1) / sqrt(N))``. The +0.1 only
        guards the floor of the output size, but ``scale_factor`` also sets the sampling
        coordinates, so this is not the same as ``size=(w // p, h // p)`` (differences up to
        ~0.02 on a table of std 0.02). Returns (1, n+1, D).
        """
        npatch = x.shape[1] - 1
        n = self.pos_embed.shape[1] - 1
        if npatch == n and w == h:
            return self.pos_embed
        class_pos = self.pos_embed[:, :1]
        side = int(math.sqrt(n))
        grid = rearrange(self.pos_embed[:, 1:], "1 (gh gw) d -> 1 d gh gw", gh=side, gw=side)
        w0 = w // self.patch_size + 0.1
        h0 = h // self.patch_size + 0.1
        grid = F.interpolate(grid, scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")
        if grid.shape[-2:] != (int(w0), int(h0)):
            raise RuntimeError(
                f"position interpolation gave a {tuple(grid.shape[-2:])} grid, expected {(int(w0), int(h0))}"
            )
        return torch.cat((class_pos, rearrange(grid, "1 d gh gw -> 1 (gh gw) d")), dim=1)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x is a {type(x).__name__}, expected a (B, C, H, W) tensor")
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected (B, {self.in_chans}, H, W)")
        if not x.is_floating_point():
            raise TypeError(f"x has dtype {x.dtype}, expected floating-point images (normalised floats)")
        if min(x.shape[-2:]) < self.patch_size:
            raise ValueError(f"x has spatial size {tuple(x.shape[-2:])}, smaller than patch_size={self.patch_size}")

    def prepare_tokens(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N+1, D): patch embeddings, CLS first, plus positions."""
        self._check_input(x)
        _, _, w, h = x.shape
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.pos_drop(x + self.interpolate_pos_encoding(x, w, h))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, D) CLS token after the final norm (through ``head``)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])

    def get_last_selfattention(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, heads, N+1, N+1) attention probabilities of the last block."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1](x, return_attention=True)

    def get_intermediate_layers(self, x: Tensor, n: int = 1) -> list[Tensor]:
        """(B, C, H, W) -> the final-normed tokens (B, N+1, D) of each of the last ``n`` blocks."""
        n = check_positive_int("n", n)
        if n > len(self.blocks):
            raise ValueError(f"n={n!r}, expected an int in [1, depth={len(self.blocks)}]")
        x = self.prepare_tokens(x)
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= len(self.blocks) - n:
                out.append(self.norm(x))
        return out


def _vit(width: int, heads: int, patch_size: int, **kwargs: Any) -> VisionTransformer:
    # Presets are defaults: any of them can be overridden (e.g. depth=2 for a test model).
    options: dict[str, Any] = dict(
        embed_dim=width, num_heads=heads, depth=12, mlp_ratio=4.0, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )
    options.update(kwargs)
    return VisionTransformer(patch_size=patch_size, **options)


def vit_tiny(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-Ti: D 192, 3 heads, depth 12, qkv bias, LayerNorm eps 1e-6 (5.5M params at /16)."""
    return _vit(192, 3, patch_size, **kwargs)


def vit_small(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-S: D 384, 6 heads, depth 12, qkv bias, LayerNorm eps 1e-6 (21.67M params at /16)."""
    return _vit(384, 6, patch_size, **kwargs)


def vit_base(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
    """ViT-B: D 768, 12 heads, depth 12, qkv bias, LayerNorm eps 1e-6 (85.8M params at /16)."""
    return _vit(768, 12, patch_size, **kwargs)
