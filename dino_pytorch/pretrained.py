"""Starting from weights: an official DINO, DINOv2, torchvision, timm or dino-pytorch file, into a DINO or a backbone.

:func:`load_pretrained` reads the file safely (``weights_only`` and the official allowlist,
:mod:`dino_pytorch.safe_load`), then tries every *reading* of it against every *target* and loads
the first pair that fits:

- readings: a DINO training checkpoint's ``checkpoint_key`` entry (``teacher``), with ``backbone.`` /
  ``head.`` / ``patch_head.`` keys under any ``module.`` prefix: dino-train's files (heads too) and
  the official ``main_dino.py`` ones; a plain state dict (official released backbones, torchvision,
  timm, an exported backbone; ``module.`` stripped, ``backbone.`` / ``head.`` split); DINOv2's
  layouts (released, training checkpoints with ``teacher.`` / ``student.`` roles and block chunks,
  ``teacher_checkpoint.pth``; :func:`~dino_pytorch.models.dinov2_backbone_state_dict`);
- targets: the backbone as DINO holds it (a feature wrapper's keys, as dino-train saves them), then
  the model inside it: timm's (``TimmFeatures.model``), a bypassed classifier's
  (``BypassClassifier.model``), a :class:`~dino_pytorch.models.MaskedViT`'s plain ViT (``.vit``).

A pair fits when every tensor of the target's ``state_dict`` is in the file with the target's shape
(BatchNorm's ``num_batches_tracked`` may be absent), after two adaptations:

- channels: a 3-channel input-conv weight for an N-channel model becomes N-channel by
  :func:`~dino_pytorch.models.adapt_channels.adapt_rgb_weight`, the rule of
  :func:`~dino_pytorch.models.adapt_input_channels` (exact on grey images for N = 1, on images whose
  bands repeat the RGB bands for N a multiple of 3, an initialisation otherwise);
- positions: a ViT position table of another grid is resampled to the model's grid by the model's
  own ``interpolate_pos_encoding``, so at its ``img_size`` the model computes exactly what the
  file's model computes at that size (at other sizes, an initialisation).

A file's classifier (``fc.``, ``head.``, ``heads.``, ``classifier.``), which DINO bypasses, is left out and
reported; any other file tensor the target has no place for (a layer-scale, say) means no fit.
Nothing is loaded unless a pair fits; otherwise a :class:`~dino_pytorch.checkpoint.CheckpointError`
names the file and the closest pair's missing, mismatched and unexpected keys.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .dino import DINO
from .features import CLASSIFIER_NAMES, BypassClassifier, TimmFeatures
from .models.adapt_channels import RGB, adapt_rgb_weight, input_conv_name
from .models.dinov2_vit import DinoVisionTransformer
from .models.dinov2_weights import _hints as dinov2_hints
from .models.dinov2_weights import dinov2_backbone_state_dict
from .models.masked_vit import MaskedViT
from .safe_load import CheckpointError, check_fit, load_official_weights, read_checkpoint, strip_prefixes
from .validate import check_bool

__all__ = ["PretrainedReport", "WeightsDoNotFit", "load_pretrained"]

PathLike = Union[str, "os.PathLike[str]"]
_OPTIONAL_KEYS = ("num_batches_tracked",)  # a counter, not a weight: older files lack it
_SHOWN = 8  # keys named per kind in messages


class WeightsDoNotFit(CheckpointError):
    """The file was read, but no reading of it fits the backbone (or, with ``heads=True``, the heads)."""


@dataclass(frozen=True)
class PretrainedReport:
    """What :func:`load_pretrained` loaded.

    Attributes:
        source: the file's path, or ``"the given state dict"``.
        layout: the reading that fitted (``"dino-pytorch checkpoint"``, ``"official DINO checkpoint"``,
            ``"state dict"``, ``"DINOv2 checkpoint"``).
        target: the module loaded, e.g. ``"VisionTransformer"`` or ``"TimmFeatures.model (VisionTransformer)"``.
        loaded: the number of backbone tensors loaded.
        unexpected: the file's classifier keys, which the backbone has no use for (left out).
        missing: backbone keys the file lacks and that were left as they were (``num_batches_tracked`` only).
        adapted: the tensors adapted on the way, each ``"key: what"`` (channels, position grid).
        heads_loaded: whether the DINO heads (and their centres) came from the file.
        heads_note: why not, when they did not (empty when they did, or for a backbone target).
    """

    source: str
    layout: str
    target: str
    loaded: int
    unexpected: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    adapted: tuple[str, ...] = ()
    heads_loaded: bool = False
    heads_note: str = ""

    def summary(self) -> str:
        """One line for a log: what was loaded from where, what was adapted or left out."""
        parts = [f"loaded {self.loaded} backbone tensors from {self.source} ({self.layout}) into {self.target}"]
        if self.adapted:
            parts.append("adapted " + ", ".join(self.adapted))
        if self.unexpected:
            parts.append(f"left out the file's classifier ({_shown(self.unexpected)})")
        if self.heads_loaded:
            parts.append("heads loaded")
        elif self.heads_note:
            parts.append(f"fresh heads ({self.heads_note})")
        return "; ".join(parts)


@dataclass
class _Reading:
    """One way of reading the file: a backbone state dict, and the heads and centres beside it."""

    layout: str
    backbone: dict[str, Tensor]
    heads: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    centres: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Fit:
    """A reading against a target: the tensors to load and what keeps it from fitting."""

    tensors: dict[str, Tensor]
    missing: list[str]
    mismatched: list[str]
    unexpected: list[str]
    adapted: list[str]

    @property
    def fits(self) -> bool:
        # Only a classifier may be left out: any other tensor (layer-scale, say) would change the features.
        return not self.missing and not self.mismatched and all(_is_classifier(k) for k in self.unexpected)


def _is_classifier(key: str) -> bool:
    return key.split(".", 1)[0] in CLASSIFIER_NAMES


def _shown(keys: Any) -> str:
    keys = list(keys)
    return ", ".join(keys[:_SHOWN]) + (f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


# ------------------------------------------------------------------------------------- readings

def _readings(raw: Mapping[str, Any], source: str, checkpoint_key: str) -> list[_Reading]:
    """The ways ``raw`` can hold a backbone, DINO checkpoints first (they carry heads)."""
    readings: list[_Reading] = []
    with contextlib.suppress(CheckpointError):
        backbone, head = load_official_weights(source, checkpoint_key=checkpoint_key, checkpoint=raw)
        entry = raw.get(checkpoint_key)
        full = isinstance(entry, Mapping)
        layout = "state dict"
        if full:
            ours = "model_config" in raw or "step" in raw
            layout = "dino-pytorch checkpoint" if ours else "official DINO checkpoint"
        keys = strip_prefixes(entry if isinstance(entry, Mapping) else raw, ("module.",))
        heads = {"head": head, "patch_head": {k[len("patch_head."):]: v for k, v in keys.items()
                                              if k.startswith("patch_head.")}}
        centres = {name: raw.get(name) for name in ("dino_loss", "ibot_loss")} if full else {}
        readings.append(_Reading(layout, backbone, {k: v for k, v in heads.items() if v}, centres))
    with contextlib.suppress(CheckpointError, ValueError):
        state = dinov2_backbone_state_dict(raw, which=checkpoint_key)
        if all(state.keys() != r.backbone.keys() for r in readings):
            readings.append(_Reading("DINOv2 checkpoint", state))
    return readings


def _targets(backbone: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``backbone``, then the models our wrappers hold inside it, each with a name for messages."""
    name, module = type(backbone).__name__, backbone
    while True:
        yield name, module
        inner = module.vit if isinstance(module, MaskedViT) else (
            module.model if isinstance(module, (TimmFeatures, BypassClassifier)) else None)
        if not isinstance(inner, nn.Module):
            return
        name, module = f"{name}.{'vit' if isinstance(module, MaskedViT) else 'model'} ({type(inner).__name__})", inner


# -------------------------------------------------------------------------------------- fitting

def _resized_positions(target: nn.Module, table: Tensor, own: Tensor) -> Optional[Tensor]:
    """The file's (1, 1 + N', D) position table on the target's (1, 1 + N, D) grid by the target's own
    ``interpolate_pos_encoding`` (ours and DINOv2's ViTs); None where that does not apply."""
    method, patch = getattr(target, "interpolate_pos_encoding", None), getattr(target, "patch_size", None)
    if (not callable(method) or not isinstance(patch, int) or table.ndim != 3 or table.shape[0] != 1
            or table.shape[2] != own.shape[2] or own.ndim != 3):
        return None
    side, file_side = math.isqrt(own.shape[1] - 1), math.isqrt(table.shape[1] - 1)
    if side * side != own.shape[1] - 1 or file_side * file_side != table.shape[1] - 1:
        return None
    param = target.pos_embed
    if not isinstance(param, Tensor):
        return None
    # The model's method reads its own table: it holds the file's for the call, then its own again.
    kept = param.data
    try:
        param.data = table.to(kept.device, kept.dtype)
        with torch.no_grad():
            resized = method(kept.new_zeros(1, own.shape[1], own.shape[2]), side * patch, side * patch)
    finally:
        param.data = kept
    return resized.detach().clone()


def _adapted(target: nn.Module, key: str, conv_key: Optional[str], have: Tensor,
             want: Tensor) -> Optional[tuple[Tensor, str]]:
    """``have`` made to fit ``want`` by one of the two adaptations, with what was done; else None."""
    same_filters = have.shape[:1] + have.shape[2:] == want.shape[:1] + want.shape[2:]
    if key == conv_key and have.ndim == 4 and have.shape[1] == RGB and same_filters:
        return adapt_rgb_weight(have, want.shape[1]), f"{key}: {RGB} -> {want.shape[1]} input channels"
    if key == "pos_embed":
        resized = _resized_positions(target, have, want)
        if resized is not None and resized.shape == want.shape:
            grid = lambda n: f"{math.isqrt(n - 1)}x{math.isqrt(n - 1)}"  # noqa: E731
            return resized, f"pos_embed: {grid(have.shape[1])} -> {grid(want.shape[1])} position grid"
    return None


def _fit(target: nn.Module, state: Mapping[str, Tensor]) -> _Fit:
    expected = target.state_dict()
    conv = input_conv_name(target)
    conv_key = f"{conv}.weight" if conv else None
    fit = _Fit({}, [], [], [k for k in state if k not in expected], [])
    for key, want in expected.items():
        if key not in state:
            if not key.endswith(_OPTIONAL_KEYS):
                fit.missing.append(key)
            continue
        have = state[key]
        if have.shape != want.shape:
            adapted = _adapted(target, key, conv_key, have, want)
            if adapted is None:
                fit.mismatched.append(f"{key}: file {tuple(have.shape)} vs model {tuple(want.shape)}")
                continue
            have = adapted[0]
            fit.adapted.append(adapted[1])
        fit.tensors[key] = have
    return fit


def _no_fit_error(source: str, backbone: nn.Module,
                  tried: list[tuple[_Reading, str, nn.Module, _Fit]]) -> CheckpointError:
    """The error naming the file and the closest (reading, target) pair's problems."""
    if not tried:
        return CheckpointError(f"{source}: no backbone weights found: expected a state dict of tensors, a DINO "
                               "checkpoint ('student' / 'teacher' entries) or a DINOv2 checkpoint")
    reading, name, target, fit = min(tried, key=lambda t: len(t[3].missing) + len(t[3].mismatched) + sum(
        not _is_classifier(k) for k in t[3].unexpected))
    problems = "; ".join(f"{kind}: {_shown(keys)}" for kind, keys in (
        ("missing", fit.missing), ("shape mismatch", fit.mismatched), ("unexpected", fit.unexpected)) if keys)
    hint = dinov2_hints(target, reading.backbone) if isinstance(target, DinoVisionTransformer) else ""
    layouts = sorted({r.layout for r, *_ in tried})
    return WeightsDoNotFit(f"{source} does not fit the backbone ({type(backbone).__name__}): read as "
                           f"{' / '.join(layouts)}; closest: the {reading.layout} into {name}: {problems}{hint}")


# ----------------------------------------------------------------------------------------- heads

def _load_heads(dino: DINO, reading: _Reading, source: str, heads: Optional[bool]) -> str:
    """Load the DINO's heads (and centres) from ``reading`` when they all fit; returns why not, or ''."""
    if heads is False:
        return "heads=False"
    wanted: dict[str, nn.Module] = {"head": dino.student.head}
    if getattr(dino.student, "patch_head", None) is not None:
        wanted["patch_head"] = dino.student.patch_head
    reason = ""
    if not reading.heads:
        reason = f"the {reading.layout} holds no heads"
    elif reading.heads.keys() != wanted.keys():
        reason = f"the file has {sorted(reading.heads)}, the DINO {sorted(wanted)}"
    else:
        with contextlib.suppress(CheckpointError):
            for name, module in wanted.items():
                reason = f"its {name} does not fit"
                check_fit(module, reading.heads[name], name, source)
            reason = ""
    if reason:
        if heads:
            raise WeightsDoNotFit(f"{source}: heads=True, but {reason}")
        return reason
    for name, module in wanted.items():
        module.load_state_dict(reading.heads[name], strict=True)
    losses = {"dino_loss": dino.criterion, "ibot_loss": getattr(dino, "ibot_loss", None)}
    for name, loss in losses.items():
        saved = reading.centres.get(name)
        # The centres belong to the heads' outputs; one that does not fit leaves the fresh zeros.
        if loss is not None and isinstance(saved, Mapping) and _same_shapes(loss.state_dict(), saved):
            loss.load_state_dict(saved)
    return ""


def _same_shapes(ours: Mapping[str, Tensor], saved: Mapping[str, Any]) -> bool:
    return ours.keys() == saved.keys() and all(
        isinstance(saved[k], Tensor) and saved[k].shape == v.shape for k, v in ours.items())


# ------------------------------------------------------------------------------------------- API

def load_pretrained(
    target: nn.Module,
    source: Union[PathLike, Mapping[str, Any]],
    *,
    checkpoint_key: str = "teacher",
    heads: Optional[bool] = None,
    trusted: bool = False,
) -> PretrainedReport:
    """Initialise a DINO (student and teacher) or a backbone from pretrained weights.

    See the module docstring for the layouts read and the adaptations made. With a :class:`DINO`,
    the student's backbone is loaded, the heads as ``heads`` says, and then the teacher becomes an
    exact copy of the student (backbone and heads), as at construction.

    Args:
        target: a :class:`~dino_pytorch.DINO`, or any backbone ``nn.Module``.
        source: a file path, or a checkpoint / state dict already in memory.
        checkpoint_key: the entry of a DINO training checkpoint to read (``"teacher"``, the model
            the official code releases, or ``"student"``); a DINOv2 checkpoint's role.
        heads: with a DINO target: None loads the heads (iBOT's patch head too, and the centres
            saved with them) when the file is a DINO checkpoint whose heads all fit, else keeps the
            fresh ones (the report says why); True requires them (error otherwise); False never
            loads them (fresh heads, e.g. with a head warm-up on new data).
        trusted: see :func:`~dino_pytorch.checkpoint.read_checkpoint` (files you made yourself only).

    Returns:
        A :class:`PretrainedReport`; ``report.summary()`` is one line for a log.

    Raises:
        TypeError: ``target`` is not an ``nn.Module``, ``source`` neither a path nor a mapping, or
            ``heads`` not None or a bool.
        CheckpointError: the file is unreadable or unsafe; :class:`WeightsDoNotFit` (a
            CheckpointError): no reading of it fits (the message names the file and the closest
            reading's missing, mismatched and unexpected keys), or ``heads=True`` and the heads do
            not fit. Nothing is loaded then.
    """
    if not isinstance(target, nn.Module):
        raise TypeError(f"target is a {type(target).__name__}, expected a DINO or a backbone nn.Module")
    if heads is not None:
        check_bool("heads", heads)
    if isinstance(source, Mapping):
        raw, name = dict(source), "the given state dict"
    elif isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        raw = read_checkpoint(name, trusted=trusted)
    else:
        raise TypeError(f"source is a {type(source).__name__}, expected a file path or a state dict")
    backbone = target.student.backbone if isinstance(target, DINO) else target
    tried = []
    for reading in _readings(raw, name, checkpoint_key):
        for target_name, module in _targets(backbone):
            fit = _fit(module, reading.backbone)
            tried.append((reading, target_name, module, fit))
            if fit.fits:
                return _load(target, module, target_name, reading, fit, name, heads)
    raise _no_fit_error(name, backbone, tried)


def _load(target: nn.Module, module: nn.Module, target_name: str, reading: _Reading, fit: _Fit, source: str,
          heads: Optional[bool]) -> PretrainedReport:
    """Load a fitting pair; with a DINO, the heads as asked, then the teacher as a copy of the student."""
    note = ""
    if isinstance(target, DINO):
        note = _load_heads(target, reading, source, heads)  # first: heads=True may still refuse
    module.load_state_dict(fit.tensors, strict=False)
    if isinstance(target, DINO):
        target.teacher.module.load_state_dict(target.student.state_dict())
    missing = tuple(k for k in module.state_dict() if k not in fit.tensors)
    return PretrainedReport(source, reading.layout, target_name, len(fit.tensors), tuple(fit.unexpected), missing,
                            tuple(fit.adapted), heads_loaded=isinstance(target, DINO) and not note, heads_note=note)
