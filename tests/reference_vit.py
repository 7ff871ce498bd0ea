"""A naive float64 re-implementation of the official DINO ViT forward, from a state_dict.

Written from ../shared/reference/official-dino.md (sections 7.2-7.4), loop-based on purpose:
patches are embedded one by one, attention is computed head by head with an explicit softmax,
LayerNorm and GELU are spelled out. The library's ViT is checked against it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _layer_norm(x, weight, bias, eps):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased, as LayerNorm
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _softmax(x):
    e = torch.exp(x - x.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def _linear(x, state, name):
    out = x @ state[f"{name}.weight"].t()
    bias = state.get(f"{name}.bias")
    return out if bias is None else out + bias


def reference_pos_embed(pos_embed, rows, cols, height, width):
    """Official interpolate_pos_encoding for a rows x cols patch grid of a height x width image."""
    n = pos_embed.shape[1] - 1
    if rows * cols == n and height == width:
        return pos_embed
    side = int(math.sqrt(n))
    dim = pos_embed.shape[-1]
    grid = pos_embed[0, 1:].reshape(side, side, dim).permute(2, 0, 1).unsqueeze(0)
    scale = ((rows + 0.1) / math.sqrt(n), (cols + 0.1) / math.sqrt(n))
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic")
    assert grid.shape[-2:] == (rows, cols)
    patches = grid[0].permute(1, 2, 0).reshape(1, rows * cols, dim)
    return torch.cat([pos_embed[:, :1], patches], dim=1)


def reference_vit(state, x, patch_size, num_heads, eps=1e-6, qk_scale=None):
    """Official ViT forward in float64.

    Args:
        state: a backbone state_dict in the official key names.
        x: (B, C, H, W) images.

    Returns a dict: ``cls`` (B, D) final-normed CLS token; ``blocks`` list of the final-normed
    token maps (B, N+1, D) after every block; ``last_attention`` (B, heads, N+1, N+1).
    """
    state = {k: v.double() for k, v in state.items()}
    x = x.double()
    batch, _, height, width = x.shape
    p = patch_size
    rows, cols = height // p, width // p
    conv_w = state["patch_embed.proj.weight"]
    dim = conv_w.shape[0]
    kernel = conv_w.reshape(dim, -1)

    patches = []
    for r in range(rows):  # row-major patch order, as Conv2d + flatten(2)
        for c in range(cols):
            patch = x[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p].reshape(batch, -1)
            patches.append(patch @ kernel.t() + state["patch_embed.proj.bias"])
    tokens = torch.stack(patches, dim=1)
    tokens = torch.cat([state["cls_token"].expand(batch, 1, dim), tokens], dim=1)
    tokens = tokens + reference_pos_embed(state["pos_embed"], rows, cols, height, width)

    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    head_dim = dim // num_heads
    scale = qk_scale or head_dim ** -0.5
    normed, last_attention = [], None
    for i in range(depth):
        b = f"blocks.{i}"
        h = _layer_norm(tokens, state[f"{b}.norm1.weight"], state[f"{b}.norm1.bias"], eps)
        qkv = _linear(h, state, f"{b}.attn.qkv")
        q, k, v = qkv[..., :dim], qkv[..., dim:2 * dim], qkv[..., 2 * dim:]
        heads_out, probs_all = [], []
        for j in range(num_heads):
            sl = slice(j * head_dim, (j + 1) * head_dim)
            probs = _softmax((q[..., sl] @ k[..., sl].transpose(1, 2)) * scale)
            probs_all.append(probs)
            heads_out.append(probs @ v[..., sl])
        last_attention = torch.stack(probs_all, dim=1)
        tokens = tokens + _linear(torch.cat(heads_out, dim=-1), state, f"{b}.attn.proj")
        h = _layer_norm(tokens, state[f"{b}.norm2.weight"], state[f"{b}.norm2.bias"], eps)
        tokens = tokens + _linear(_gelu(_linear(h, state, f"{b}.mlp.fc1")), state, f"{b}.mlp.fc2")
        normed.append(_layer_norm(tokens, state["norm.weight"], state["norm.bias"], eps))
    return {"cls": normed[-1][:, 0], "blocks": normed, "last_attention": last_attention}
