"""Distillation from a frozen teacher (DINOv3): the ``teacher=`` option of :class:`~dino_pytorch.DINO`.

``DINO(student_backbone, teacher=trained)`` trains a student of any architecture and size against a
trained network that never changes: the teacher's own heads give the targets (centred or
Sinkhorn-Knopp as ``DINO`` is configured), the student gets the DINO loss on every view, with iBOT
the patch loss at mask-selected positions of its *unmasked* global crops (as DINOv3's distillation:
the masks choose the patches, the student still sees them), and KoLeo when asked. ``dino.teacher``
is then an EMA of the student, the network evaluation and saving use, as DINOv3's ``model_ema``.

The teacher is a deep copy, frozen: no gradient, never an EMA step, and always in eval mode (as
DINOv3's ``train()`` keeps its teacher), so its BatchNorm layers use their running statistics and its
outputs are a pure function of the images. The copy is part of ``DINO.state_dict()``, so a resume
needs nothing else. Its cost is one more network in memory.
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Union, cast

import torch
from torch import Tensor, nn

from .head import DINOHead
from .ibot import IBOTConfig, MaskedMultiCropWrapper
from .model_config import build_backbone, read_model_config
from .safe_load import CheckpointError, check_fit, read_checkpoint
from .teacher import EMATeacher
from .wrapper import MultiCropWrapper

PathLike = Union[str, Path]


class FrozenTeacher(nn.Module):
    """A trained multi-crop network (backbone and heads) that gives targets and is never trained.

    Args:
        module: a :class:`~dino_pytorch.MultiCropWrapper` (DINO head) or an iBOT
            :class:`~dino_pytorch.ibot.MaskedMultiCropWrapper` (DINO head and patch head); taken as
            it is (see :func:`distillation_teacher` for the copy).

    Shapes: the wrapped module's. Called with the global views alone, a masked wrapper returns its
    (T*B, K) DINO logits only, so a student without the patch loss can use an iBOT-trained teacher.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if not isinstance(module, (MultiCropWrapper, MaskedMultiCropWrapper)):
            raise TypeError(f"teacher is a {type(module).__name__}, expected a trained DINO, a MultiCropWrapper or "
                            "a MaskedMultiCropWrapper (a backbone with its heads)")
        self.module = module.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        super().train(mode)
        self.module.eval()  # the targets must not depend on the mode of the DINO around it
        return self

    @property
    def out_dim(self) -> int:
        """K of the teacher's DINO head."""
        return cast(DINOHead, self.module.head).out_dim

    @property
    def patch_out_dim(self) -> Optional[int]:
        """Prototypes of the teacher's patch logits (its patch head, or the shared DINO head); None
        for a teacher without the iBOT part."""
        if not isinstance(self.module, MaskedMultiCropWrapper):
            return None
        head = self.module.head if self.module.patch_head is None else self.module.patch_head
        return cast(DINOHead, head).out_dim

    def fingerprint(self) -> str:
        """A SHA-256 of the teacher's names, shapes, dtypes and values (buffers included): what a
        resume compares to be sure the targets come from the same network. Computed once (the
        teacher never changes); hashing reads every parameter, a second per ~GB."""
        cached: Optional[str] = getattr(self, "_fingerprint", None)
        if cached is None:
            digest = hashlib.sha256()
            for name, value in self.module.state_dict().items():
                value = value.detach().cpu().contiguous()
                digest.update(f"{name}:{tuple(value.shape)}:{value.dtype};".encode())
                digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
            cached = self._fingerprint = digest.hexdigest()
        return cached

    def forward(self, views: list[Tensor], *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            if isinstance(self.module, MaskedMultiCropWrapper) and not args and not kwargs:
                no_patches = torch.zeros(0, dtype=torch.long, device=views[0].device)
                return self.module(views, len(views), no_patches)[0]
            return self.module(views, *args, **kwargs)


def distillation_teacher(teacher: Any) -> FrozenTeacher:
    """``DINO(teacher=)``'s value as a :class:`FrozenTeacher` of a deep copy.

    Args:
        teacher: a trained :class:`~dino_pytorch.DINO` (its EMA teacher network with the heads is
            taken), a :class:`FrozenTeacher`, or a multi-crop wrapper of a backbone with its heads
            (e.g. :func:`teacher_from_checkpoint`'s).
    """
    if isinstance(teacher, FrozenTeacher):
        return FrozenTeacher(copy.deepcopy(teacher.module))
    ema = getattr(teacher, "teacher", None)
    if isinstance(teacher, nn.Module) and isinstance(ema, EMATeacher):
        teacher = ema.module
    return FrozenTeacher(copy.deepcopy(teacher))


def check_student(teacher: FrozenTeacher, out_dim: Optional[int], ibot: Optional[IBOTConfig],
                  student_patch_size: Optional[int]) -> tuple[int, Optional[IBOTConfig]]:
    """The student's DINO ``out_dim`` and iBOT config for ``teacher``: its prototype counts, or one
    line naming the student's argument that disagrees with them."""
    if out_dim is not None and out_dim != teacher.out_dim:
        raise ValueError(f"out_dim={out_dim} with a teacher of {teacher.out_dim} prototypes: the student's head "
                         f"must match the teacher's; expected out_dim={teacher.out_dim} or None")
    if ibot is None:
        return teacher.out_dim, None
    patch_dim = teacher.patch_out_dim
    if patch_dim is None:
        raise ValueError("ibot= with a teacher that has no patch head (trained without iBOT): it gives no patch "
                         "targets; expected ibot=None, or a teacher trained with ibot=")
    if ibot.head == "shared" and patch_dim != teacher.out_dim:
        raise ValueError(f"ibot.head='shared' with a teacher whose patch head has {patch_dim} prototypes and DINO "
                         f"head {teacher.out_dim}: a shared student head cannot match both; expected "
                         "IBOTConfig(head='separate')")
    if ibot.head == "separate":
        if ibot.out_dim not in (None, patch_dim):
            raise ValueError(f"ibot.out_dim={ibot.out_dim} with a teacher patch head of {patch_dim} prototypes: "
                             f"expected {patch_dim} or None")
        ibot = replace(ibot, out_dim=patch_dim)
    teacher_patch = getattr(teacher.module.backbone, "patch_size", None)
    if teacher_patch != student_patch_size:
        raise ValueError(f"the student's patch_size {student_patch_size} differs from the teacher's "
                         f"{teacher_patch}: the patch loss pairs the two grids' patches one to one; expected "
                         "equal patch sizes (as DINOv3 asserts)")
    return teacher.out_dim, ibot


def _patch_head_of(state: dict[str, Tensor], head_config: dict[str, Any]) -> Optional[DINOHead]:
    """The iBOT patch head a teacher state holds, sized from its tensors (the DINO head's other options)."""
    keys = sorted((k for k in state if k.startswith("patch_head.mlp.") and k.endswith(".weight")
                   and state[k].dim() == 2), key=lambda k: int(k.split(".")[2]) if k.count(".") == 3 else 0)
    if not keys:
        return None
    first, last = state[keys[0]], state[keys[-1]]
    # ours (parametrizations.weight.original0/1) or the official names (weight_g/_v): (K, 1) and (K, bottleneck)
    out_dim = next(v.shape[0] for k, v in state.items() if k.startswith("patch_head.last_layer.") and v.dim() == 2)
    options = {**head_config, "out_dim": int(out_dim), "bottleneck_dim": int(last.shape[0]),
               "hidden_dim": int(first.shape[0]) if len(keys) > 1 else head_config.get("hidden_dim", 2048)}
    return DINOHead(**options)


def teacher_from_checkpoint(path: PathLike, *, trusted: bool = False) -> FrozenTeacher:
    """The teacher network of a ``dino-train`` checkpoint (its EMA teacher: backbone, DINO head and,
    when trained with iBOT, patch head), rebuilt from the file's stored model configuration and frozen.

    Raises:
        CheckpointError: the file stores no model configuration (official files, custom backbones:
            build the network yourself, load it, and pass it to ``DINO(teacher=)``), or its weights
            do not fit.
    """
    raw = read_checkpoint(path, trusted=trusted)
    config = read_model_config(raw, str(path))
    if config is None or not config["head"] or not isinstance(raw.get("teacher"), dict):
        raise CheckpointError(f"{path}: no stored model configuration with a head and no 'teacher' entry; "
                              "expected a dino-train checkpoint (or build the teacher and pass it to DINO(teacher=))")
    state: dict[str, Tensor] = raw["teacher"]
    backbone = build_backbone(config)
    head = DINOHead(**config["head"])
    patch_head = _patch_head_of(state, {k: v for k, v in config["head"].items() if k != "out_dim"})
    if patch_head is not None or any(k.startswith("patch_head.") for k in state):
        module: nn.Module = MaskedMultiCropWrapper(backbone, head, patch_head)
    else:
        module = MultiCropWrapper(backbone, head, in_chans=config["data"].get("in_chans"))
    check_fit(module, state, "teacher", str(path))
    module.load_state_dict(state)
    return FrozenTeacher(module)
