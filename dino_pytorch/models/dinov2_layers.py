"""The layers of DINOv2's ViT that the v1 ViT lacks: layer-scale and its block.

One block (pre-norm), with ``ls`` a learned per-channel gain (CaiT's layer-scale)::

    x <- x + ls1 * attn(norm1(x))
    x <- x + ls2 * mlp(norm2(x))

Attention, the MLP and DropPath are the v1 modules of :mod:`.vision_transformer`: their maths and
parameter names are DINOv2's too; a bias DINOv2 can switch off is removed from them here.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .vision_transformer import Attention, DropPath, Mlp

# DINOv2 runs stochastic depth on a batch subset above this rate (it only pays off there).
SUBSET_DROP_PATH_ABOVE = 0.1


class LayerScale(nn.Module):
    """A learned per-channel gain ``x * gamma`` (CaiT's layer-scale), ``gamma`` (D,) starting at ``init_values``.

    Shapes: (..., D) -> (..., D).
    """

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def subset_residual(x: Tensor, branch: Callable[[Tensor], Tensor], rate: float) -> Tensor:
    """``x + (B / k) * branch(x[kept])`` on ``k = max(int(B * (1 - rate)), 1)`` random samples.

    DINOv2's stochastic depth above a rate of 0.1: the residual branch runs on the kept samples
    only (a rate of 0.4 saves ~40% of a block's compute), and the B / k gain keeps the expected
    residual that of every sample. Rows not kept are returned unchanged. Shapes: (B, ...) -> (B, ...).
    """
    b = x.shape[0]
    keep = max(int(b * (1.0 - rate)), 1)
    kept = torch.randperm(b, device=x.device)[:keep]
    return torch.index_add(x, 0, kept, branch(x[kept]).to(x.dtype), alpha=b / keep)


def _drop_bias(linear: nn.Linear) -> nn.Linear:
    """``linear`` without its bias (DINOv2's ``qkv_bias`` / ``proj_bias`` / ``ffn_bias=False``)."""
    linear.register_parameter("bias", None)
    return linear


class LayerScaleBlock(nn.Module):
    """Pre-norm block with layer-scale: ``x + ls1 * attn(norm1 x)``, then ``x + ls2 * mlp(norm2 x)``.

    ``ls1`` / ``ls2`` are :class:`LayerScale` when ``init_values`` is truthy, else Identity (no
    ``gamma`` keys, DINOv2's ``None`` or ``0``). In training, stochastic depth at ``drop_path``
    drops whole samples' residuals: per sample (:class:`DropPath`) up to a rate of 0.1, on a
    batch subset (:func:`subset_residual`) above, as DINOv2.

    Shapes: (B, T, D) -> (B, T, D).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        init_values: Optional[float] = None,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6),
    ) -> None:
        super().__init__()
        # Registration order = DINOv2's state_dict order.
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        if not proj_bias:
            _drop_bias(self.attn.proj)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if not ffn_bias:
            _drop_bias(self.mlp.fc1)
            _drop_bias(self.mlp.fc2)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.drop_path_rate = drop_path

    def attention_branch(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D): ``ls1 * attn(norm1 x)``, the first residual."""
        return self.ls1(self.attn(self.norm1(x)))

    def mlp_branch(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D): ``ls2 * mlp(norm2 x)``, the second residual."""
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.drop_path_rate > SUBSET_DROP_PATH_ABOVE:
            x = subset_residual(x, self.attention_branch, self.drop_path_rate)
            return subset_residual(x, self.mlp_branch, self.drop_path_rate)
        # drop_path1/2 are Identity at rate 0 and DropPath is a no-op in eval mode.
        x = x + self.drop_path1(self.attention_branch(x))
        return x + self.drop_path2(self.mlp_branch(x))

    def attention_probabilities(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, heads, T, T): this block's attention probabilities (post-softmax)."""
        return self.attn(self.norm1(x), return_attention=True)[1]
