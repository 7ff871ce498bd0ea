"""DINOv2 weights both ways: released backbones, training checkpoints, and our DINOv2 ViT.

The layouts of a DINOv2 backbone's weights:

- released files (``dinov2_vits14_pretrain.pth`` & co.): a flat state dict, ``cls_token``,
  ``blocks.{i}.ls1.gamma`` ...;
- training checkpoints (``model_*.pth``): ``{"model": {...}, "optimizer": ..., "iteration": ...}``
  with ``teacher.backbone.blocks.{c}.{i}...``, ``student.backbone...``, ``teacher.dino_head...``;
- eval checkpoints (``teacher_checkpoint.pth``): ``{"teacher": {...}}`` with
  ``backbone.blocks.{c}.{i}...`` and ``dino_head...``.

``blocks.{c}.{i}`` is DINOv2's ``block_chunks > 0`` layout: chunk c holds blocks with their global
index i (its first slots are empty Identities). :class:`~dino_pytorch.models.DinoVisionTransformer`
has the released layout, so a released file loads with ``model.load_state_dict`` as it is;
:func:`load_dinov2_state_dict` reads every layout, and :func:`to_dinov2_state_dict` writes the
released one (or the chunked one, with a prefix, for DINOv2's training code).
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, Union

from torch import Tensor, nn

from ..safe_load import CheckpointError, check_fit, read_checkpoint, strip_prefixes
from ..validate import check_choice, check_int

RELEASED_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"
_SIZE_LETTER = {"small": "s", "base": "b", "large": "l", "giant": "g"}
# Wrapper prefixes in front of a whole model's keys: DDP / FSDP and torch.compile.
_WRAPPERS = ("module.", "_orig_mod.")
_CHUNKED = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")
_FLAT = re.compile(r"^blocks\.(\d+)\.(.+)$")


def dinov2_weights_url(size: str, num_register_tokens: int = 0, patch_size: int = 14) -> str:
    """The official download address of a released DINOv2 backbone.

    Args:
        size: ``"small"``, ``"base"``, ``"large"`` or ``"giant"``.
        num_register_tokens: 0, or 4 for the ``_reg`` models.
        patch_size: 14 (the only released patch size).

    Returns:
        e.g. ``https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth``.
    """
    letter = _SIZE_LETTER[check_choice("size", size, tuple(_SIZE_LETTER))]
    base = f"dinov2_vit{letter}{check_int('patch_size', patch_size, 1)}"
    registers = check_int("num_register_tokens", num_register_tokens, 0)
    name = base + (f"_reg{registers}" if registers else "")
    return f"{RELEASED_BASE_URL}/{base}/{name}_pretrain.pth"


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _model_entry(checkpoint: Mapping[str, Any], which: str) -> Mapping[str, Any]:
    """The {name: tensor} dict inside a checkpoint: itself, its ``model`` or its ``which`` entry."""
    if _is_state_dict(checkpoint):
        return checkpoint
    for entry in ("model", which):
        if _is_state_dict(checkpoint.get(entry)):
            return checkpoint[entry]
    entries = sorted(str(k) for k, v in checkpoint.items() if isinstance(v, Mapping))
    raise CheckpointError(f"no DINOv2 weights found: expected a state dict, or one under 'model' or {which!r}; "
                          f"the dict entries are {entries}")


def _only(state: Mapping[str, Any], prefix: str, what: str) -> dict[str, Any]:
    """The keys of ``state`` under ``prefix``, without it (DINOv2 stores teacher, student and heads together)."""
    picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not picked:
        raise CheckpointError(f"no {what} weights (keys starting with {prefix!r}); the keys start with "
                              f"{sorted({k.split('.')[0] for k in state})}")
    return picked


def _unchunk(state: Mapping[str, Any]) -> dict[str, Any]:
    """``blocks.{c}.{i}.rest`` -> ``blocks.{i}.rest``: the chunk index is redundant (i is global)."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        match = _CHUNKED.match(key)
        flat = f"blocks.{match.group(2)}.{match.group(3)}" if match else key
        if flat in out:
            raise CheckpointError(f"two keys become {flat!r} once the block chunks are removed")
        out[flat] = value
    return out


def dinov2_backbone_state_dict(checkpoint: Mapping[str, Any], *, which: str = "teacher") -> dict[str, Tensor]:
    """The backbone weights of any DINOv2 weight dict, in the released layout.

    Args:
        checkpoint: a released state dict, a training checkpoint (its ``model`` entry, with
            ``teacher.`` / ``student.`` roles), an eval ``teacher_checkpoint.pth`` (``teacher``
            entry), or any of these with ``module.`` / ``_orig_mod.`` wrapper prefixes.
        which: the role to take where teacher and student are both stored: ``"teacher"`` (the
            EMA weights DINOv2 evaluates and releases) or ``"student"``.

    Returns:
        ``{name: tensor}`` with flat ``blocks.{i}.`` keys and no prefix; heads (``dino_head``,
        ``ibot_head``) are left out.

    Raises:
        CheckpointError: no weights of the role or of a backbone found, or two keys collide.
    """
    check_choice("which", which, ("teacher", "student"))
    state: Mapping[str, Any] = strip_prefixes(_model_entry(checkpoint, which), _WRAPPERS)
    if any(k.startswith(("teacher.", "student.")) for k in state):
        state = _only(state, which + ".", which)
    if any(k.startswith("backbone.") for k in state):
        state = _only(state, "backbone.", "backbone")
    return _unchunk(state)


def _hints(model: nn.Module, state: Mapping[str, Tensor]) -> str:
    """Which constructor arguments would make ``model`` fit ``state`` (the common mismatches)."""
    ours = model.state_dict()
    hints = []
    if ("blocks.0.ls1.gamma" in state) != ("blocks.0.ls1.gamma" in ours):
        hints.append("init_values=1.0 (the file has layer-scale)" if "blocks.0.ls1.gamma" in state
                     else "init_values=None (the file has no layer-scale)")
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    if registers != getattr(model, "num_register_tokens", registers):
        hints.append(f"num_register_tokens={registers}")
    depth = 1 + max((int(m.group(1)) for m in map(_FLAT.match, state) if m), default=-1)
    if depth != getattr(model, "depth", depth):
        hints.append(f"depth={depth}")
    conv = state.get("patch_embed.proj.weight")
    if conv is not None and conv.shape[-1] != getattr(model, "patch_size", conv.shape[-1]):
        hints.append(f"patch_size={conv.shape[-1]}")
    return f"; build the model with {', '.join(hints)}" if hints else ""


def load_dinov2_state_dict(
    model: nn.Module,
    checkpoint: Union[Mapping[str, Any], str, os.PathLike[str]],
    *,
    which: str = "teacher",
    strict: bool = True,
) -> None:
    """Load DINOv2 weights (any layout of :func:`dinov2_backbone_state_dict`) into ``model``.

    Args:
        model: a :class:`~dino_pytorch.models.DinoVisionTransformer` of the file's architecture.
        checkpoint: the weight dict, or the path of a file (read with ``weights_only=True``).
        which: ``"teacher"`` or ``"student"``, where a training checkpoint holds both.
        strict: every key must match in name and shape (else nothing is loaded); ``False`` is
            ``load_state_dict(strict=False)``.

    Raises:
        CheckpointError: the weights do not fit the model (missing, unexpected and mismatched keys
            listed, with the constructor arguments that would fit, e.g. ``init_values=1.0``), or no
            DINOv2 weights were found.
    """
    source = "the given state dict"
    if isinstance(checkpoint, (str, os.PathLike)):
        source = os.fspath(checkpoint)
        checkpoint = read_checkpoint(source)
    state = dinov2_backbone_state_dict(checkpoint, which=which)
    if strict:
        try:
            check_fit(model, state, "DINOv2 backbone", source)
        except CheckpointError as err:
            raise CheckpointError(f"{err}{_hints(model, state)}") from None
    model.load_state_dict(state, strict=strict)


def to_dinov2_state_dict(model: nn.Module, *, block_chunks: int = 0, prefix: str = "") -> dict[str, Tensor]:
    """``model``'s weights in DINOv2's layout: the released one by default.

    Args:
        model: a :class:`~dino_pytorch.models.DinoVisionTransformer`.
        block_chunks: 0 for flat ``blocks.{i}.`` keys (released files, ``block_chunks=0`` models);
            n > 0 for DINOv2's chunked ``blocks.{c}.{i}.`` keys of a ``block_chunks=n`` model
            (chunk ``c = i // (depth // n)``, DINOv2's split).
        prefix: put in front of every key, e.g. ``"teacher.backbone."`` for a training checkpoint's
            ``model`` entry.

    Returns:
        ``{name: tensor}`` in the model's (= DINOv2's) order; the tensors are the model's own
        (detached, not copies), as ``state_dict()`` gives them.
    """
    state = model.state_dict()
    depth = 1 + max((int(m.group(1)) for m in map(_FLAT.match, state) if m), default=-1)
    block_chunks = check_int("block_chunks", block_chunks, 0)
    if block_chunks > max(depth, 1):
        raise ValueError(f"block_chunks={block_chunks}, expected at most depth={depth}")
    chunk_size = depth // block_chunks if block_chunks else 0
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        match = _FLAT.match(key) if chunk_size else None
        if match:
            key = f"blocks.{int(match.group(1)) // chunk_size}.{match.group(1)}.{match.group(2)}"
        out[prefix + key] = value
    return out
