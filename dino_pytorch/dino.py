"""DINO: the three-line path. Glue over the five modules; it holds no logic they don't."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Literal, Optional, cast

import torch
from torch import Tensor, nn

from . import distributed
from .diagnostics import collapse_metrics
from .dino_steps import DINOSteps
from .distill import check_student, distillation_teacher
from .features import as_feature_extractor, check_input_size, feature_dim_hint, infer_feature_dim
from .gram_anchor import GramAnchor, GramTeacher, check_gram_option
from .head import DINOHead
from .ibot import IBOTConfig, MaskedMultiCropWrapper, check_ibot_config, check_masked_backbone, step_masks
from .koleo import KoLeoLoss
from .losses import DINOLoss, IBOTPatchLoss
from .schedules import DINOSchedules
from .teacher import EMATeacher
from .validate import check_bool, check_float, check_int, check_positive_int
from .wrapper import MultiCropWrapper


def _check_one_momentum_source(schedules: Optional[DINOSchedules], **scalars: Optional[float]) -> None:
    """``schedules`` or the momentum scalars, never both: one would be ignored silently."""
    if schedules is not None and not isinstance(schedules, DINOSchedules):
        raise TypeError(f"schedules is a {type(schedules).__name__}, expected a DINOSchedules or None")
    given = {name: value for name, value in scalars.items() if value is not None}
    if schedules is not None and given:
        named = ", ".join(f"{name}={value!r}" for name, value in given.items())
        raise ValueError(f"{named} given with schedules=: the schedules set the teacher momentum of every step; "
                         "expected one or the other (DINOSchedules.official(..., momentum_teacher=...))")


class DINO(DINOSteps, nn.Module):
    """DINO self-distillation around any backbone.

    >>> dino = DINO(backbone, out_dim=65536)                      # build
    >>> loss = dino(views)                                          # in the loop: views = [g1, g2, l1, ...]
    >>> dino.update_teacher()                                       # after optimizer.step()

    ``dino(views)`` runs the teacher on the first ``num_global_views`` views and the student on all
    of them and returns the DINO loss. ``update_teacher()`` does the EMA (official per-step cosine
    momentum when ``total_steps`` or ``schedules`` is given) and applies the centre statistics
    gathered since the last call, so gradient accumulation is handled by calling it once per
    optimizer step.

    The rest of the official recipe is a helper each, for any training loop (the reference program
    ``dino-train`` is these helpers plus a loop): :meth:`param_groups`, :meth:`apply_schedules`
    (lr / weight decay of the step), :meth:`clip_gradients_` (per parameter),
    :meth:`cancel_last_layer_gradients_` (first-epoch freeze), :meth:`distribute` and
    :meth:`no_sync` (DDP, gradient accumulation), :meth:`compile_forwards`, :meth:`optimizer_step`
    and :meth:`nonfinite_report` (a non-finite step updates nothing), and the resume state:
    ``state_dict()`` (student, teacher, centre, step) or the official file layout
    (:meth:`official_checkpoint` / :meth:`load_official_checkpoint`). Mixed precision wraps the
    call: ``with dino_pytorch.precision.autocast("bf16", device): loss = dino(views)``.

    The parameters of ``dino`` that require grad are exactly the student's trainable ones:
    ``AdamW(p for p in dino.parameters() if p.requires_grad)`` is right.

    Args:
        backbone: any ``nn.Module`` mapping (B, C, H, W) images to features; a trailing classifier
            (``fc``/``head``/``heads``/``classifier``; timm's head) is bypassed, never edited.
        out_dim: K, the number of prototypes (None: 65536, or the ``teacher``'s).
        embed_dim: the backbone's feature width; inferred with a dummy forward when None.
        input_size: (C, H, W) of that dummy forward (default: (C, 224, 224) with C the model's
            ``in_chans``, else its first conv's input channels, else 3); also the channel count
            every view must have.
        num_global_views: views the teacher sees (official: 2).
        use_bn: :class:`DINOHead` option: BatchNorm after each hidden linear of the MLP.
        norm_last_layer: :class:`DINOHead` option: freeze the weight-norm gain of the prototypes.
        nlayers: :class:`DINOHead` option: linear layers in the MLP.
        hidden_dim: :class:`DINOHead` option: width of the MLP's hidden layers.
        bottleneck_dim: :class:`DINOHead` option: width before the L2 normalisation.
        teacher_temp: :class:`DINOLoss` option: teacher temperature after the warm-up.
        warmup_teacher_temp: :class:`DINOLoss` option: teacher temperature at epoch 0 (default:
            ``teacher_temp``, no warm-up).
        warmup_teacher_temp_epochs: :class:`DINOLoss` option: length of the temperature warm-up.
        nepochs: :class:`DINOLoss` option: length of the temperature schedule.
        student_temp: :class:`DINOLoss` option: student temperature.
        center_momentum: :class:`DINOLoss` option: EMA momentum of the centre.
        centering: :class:`DINOLoss` option: ``"centering"`` or ``"sinkhorn_knopp"``.
        momentum_teacher: :class:`EMATeacher` option ``momentum``: base EMA momentum (default
            0.996). Not with ``schedules``, which gives the momentum per step.
        final_momentum: :class:`EMATeacher` option: momentum at the end of the cosine schedule
            (default 1.0). Not with ``schedules``.
        total_steps: :class:`EMATeacher` option: schedule length in optimizer steps. Not with
            ``schedules``.
        teacher_buffers: :class:`EMATeacher` option ``buffers``: ``"keep"``, ``"copy"`` or ``"ema"``.
        schedules: per-step lr, weight decay and teacher momentum (:class:`DINOSchedules`); when
            given, :meth:`update_teacher` takes the momentum from it, and giving ``momentum_teacher``,
            ``final_momentum`` or ``total_steps`` too is an error (one source of the momentum).
        koleo_weight: weight of DINOv2's :class:`~dino_pytorch.KoLeoLoss` on the student backbone's
            features of each global view (0: off, official DINO; DINOv2 uses 0.1).
        on_nonfinite: :class:`DINOLoss` option: ``"warn"`` or ``"raise"`` at once on a non-finite
            loss. Either way nothing is updated from such a step (:meth:`optimizer_step`,
            :meth:`update_teacher`); :meth:`nonfinite_report` says what was non-finite.
        fused_head_loss: apply the head's last layer inside the loss, block by block
            (:func:`~dino_pytorch.ops.fused_last_layer_cross_entropy`): the (V*B, K) student logits
            never exist at once (about 0.16x the peak memory of head + loss at K = 65 536), for the
            same loss and gradients up to rounding. Needs the :class:`DINOHead` built here.
        ibot: DINOv2's masked-patch loss (:class:`~dino_pytorch.ibot.IBOTConfig`): the student sees
            block-masked global crops, a patch head maps the masked patch tokens, and
            ``ibot.weight`` times :class:`~dino_pytorch.IBOTPatchLoss` joins the loss (the same
            teacher temperature, ``centering`` and momentum of the centre). Needs a ViT with DINOv2's
            ``forward_features(x, masks)`` (e.g. :func:`~dino_pytorch.models.dinov2_vit_small`).
        head_warmup_steps: while ``step < N`` the student backbone is frozen (no backward through
            it, bit-identical, its teacher too) and the heads learn: fresh heads on pretrained
            weights (:mod:`~dino_pytorch.pretrained`); see :meth:`backbone_frozen`.
        backbone_lr_scale: the backbone's lr is the scheduled lr times this (:meth:`param_groups`).
        gram: DINOv3's Gram anchoring (:class:`~dino_pytorch.GramAnchor`): from ``gram.start_step`` the
            student's global-crop patch tokens are anchored to a frozen, periodically refreshed
            snapshot of the EMA teacher's backbone (``self.gram_teacher``; :mod:`~dino_pytorch.gram_anchor`).
            Needs a ViT with DINOv2's ``forward_features(x, masks)``; with or without ``ibot``.
        teacher: distillation (DINOv3): a trained :class:`DINO`, or a backbone with its heads
            (:func:`~dino_pytorch.distill.teacher_from_checkpoint`), frozen, gives the targets, and
            ``self.teacher`` becomes the EMA of the student (:mod:`~dino_pytorch.distill`).

    Attributes:
        student: :class:`MultiCropWrapper` (backbone features + head), trained by the optimizer.
        teacher: :class:`EMATeacher` of the student (the network to evaluate and export).
        distill_teacher: the frozen :class:`~dino_pytorch.distill.FrozenTeacher` (None: DINO itself).
        criterion: :class:`DINOLoss`.
        gram_teacher: with ``gram``, the :class:`~dino_pytorch.gram_anchor.GramTeacher` (the frozen snapshot
            and its refresh count), else None.
    """

    def __init__(
        self,
        backbone: nn.Module,
        out_dim: Optional[int] = None,
        *,
        embed_dim: Optional[int] = None,
        input_size: Optional[Sequence[int]] = None,
        num_global_views: int = 2,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: Optional[float] = None,
        warmup_teacher_temp_epochs: int = 0,
        nepochs: Optional[int] = None,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        centering: Literal["centering", "sinkhorn_knopp"] = "centering",
        momentum_teacher: Optional[float] = None,
        final_momentum: Optional[float] = None,
        total_steps: Optional[int] = None,
        teacher_buffers: Literal["keep", "copy", "ema"] = "keep",
        schedules: Optional[DINOSchedules] = None,
        koleo_weight: float = 0.0,
        on_nonfinite: Literal["warn", "raise"] = "warn",
        fused_head_loss: bool = False,
        ibot: Optional[IBOTConfig] = None,
        head_warmup_steps: int = 0,
        backbone_lr_scale: float = 1.0,
        teacher: Optional[Any] = None,
        gram: Optional[GramAnchor] = None,
    ) -> None:
        super().__init__()
        check_positive_int("num_global_views", num_global_views)
        _check_one_momentum_source(schedules, momentum_teacher=momentum_teacher, final_momentum=final_momentum,
                                   total_steps=total_steps)
        self.fused_head_loss = check_bool("fused_head_loss", fused_head_loss)
        out_dim = self._set_options(backbone, out_dim, ibot, gram, teacher)
        features = as_feature_extractor(backbone)
        size = check_input_size("input_size", input_size)
        embed_dim = self._feature_dim(backbone, features, embed_dim, size)
        head_options = dict(out_dim=out_dim, use_bn=use_bn, norm_last_layer=norm_last_layer, nlayers=nlayers,
                            hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim)
        self.num_global_views = num_global_views
        # Input channels, read after the dummy forward (which materialises lazy convs): the wrapper
        # names a mismatch before the backbone's first conv fails on it.
        in_chans = size[0] if size is not None and len(size) == 3 else None
        self.student: Any = self._student_wrapper(backbone, features, embed_dim, head_options, in_chans)
        self.teacher = EMATeacher(
            self.student, momentum=0.996 if momentum_teacher is None else momentum_teacher,
            final_momentum=1.0 if final_momentum is None else final_momentum, total_steps=total_steps,
            buffers=teacher_buffers,
        )
        self.gram_teacher = None if gram is None else GramTeacher(gram, self.teacher.module.backbone)
        # The same teacher side for both losses; centres applied once per optimizer step.
        loss_options: dict[str, Any] = dict(
            warmup_teacher_temp=teacher_temp if warmup_teacher_temp is None else warmup_teacher_temp,
            teacher_temp=teacher_temp, warmup_teacher_temp_epochs=warmup_teacher_temp_epochs, nepochs=nepochs,
            student_temp=student_temp, center_momentum=center_momentum, centering=centering,
            center_update="manual", on_nonfinite=on_nonfinite)
        self.criterion = DINOLoss(out_dim, **loss_options)
        if ibot is not None:
            patch_head = cast(Optional[DINOHead], self.student.patch_head)
            self.ibot_loss = IBOTPatchLoss(out_dim if patch_head is None else patch_head.out_dim, **loss_options)
        self._micro_batch = 0  # forwards since the last update_teacher: the masks' key with the step
        self.loss_parts: dict[str, Tensor] = {}
        self.schedules = schedules
        self.koleo_weight = check_float("koleo_weight", koleo_weight, low=0.0)
        self.koleo = KoLeoLoss()
        self.head_warmup_steps = check_int("head_warmup_steps", head_warmup_steps, 0)
        self.backbone_lr_scale = check_float("backbone_lr_scale", backbone_lr_scale, low=0.0)
        # The callables the forward runs: the modules themselves, or their DDP / compiled wrappers.
        # Not submodules, so the state_dict keeps one copy of every weight under its plain name.
        object.__setattr__(self, "_student_forward", self.student)
        targets = self.teacher if self.distill_teacher is None else self.distill_teacher
        object.__setattr__(self, "_teacher_forward", targets)
        self._last_teacher: Optional[tuple[Tensor, float]] = None
        self._last_loss: Optional[Tensor] = None

    _student_forward: Callable[..., Any]
    _teacher_forward: Callable[..., Any]

    def _set_options(self, backbone: nn.Module, out_dim: Optional[int], ibot: Optional[IBOTConfig],
                     gram: Optional[GramAnchor], teacher: Optional[Any]) -> int:
        """The iBOT, Gram and distillation options checked and set; returns the DINO head's ``out_dim``
        (65536 by default; a distillation teacher's prototype count)."""
        self.ibot = check_ibot_config(ibot, self.fused_head_loss)
        self.gram = check_gram_option(gram, ibot, self.fused_head_loss, teacher is not None)
        masked = "ibot=" if ibot is not None else "gram=" if gram is not None else None
        self.patch_size = check_masked_backbone(backbone, masked) if masked is not None else None
        self.distill_teacher = None if teacher is None else distillation_teacher(teacher)
        if self.distill_teacher is not None:  # the student's prototype counts are the teacher's
            out_dim, self.ibot = check_student(self.distill_teacher, out_dim, self.ibot, self.patch_size)
        return 65536 if out_dim is None else out_dim

    def _student_wrapper(self, backbone: nn.Module, features: nn.Module, embed_dim: int,
                         head_options: dict[str, Any], in_chans: Optional[int]) -> nn.Module:
        """The student: backbone features and the DINO head, with iBOT also a patch head (or the DINO
        head shared) over the raw backbone's masked patch tokens."""
        head = DINOHead(embed_dim, **head_options)
        if self.ibot is None and self.gram is None:
            return MultiCropWrapper(features, head, in_chans=in_chans)
        if self.ibot is None or self.ibot.head == "shared":  # Gram alone: the patch tokens, no patch head
            return MaskedMultiCropWrapper(backbone, head)
        sizes = {"out_dim": self.ibot.out_dim, "hidden_dim": self.ibot.hidden_dim,
                 "bottleneck_dim": self.ibot.bottleneck_dim}
        patch_options = {**head_options, **{k: v for k, v in sizes.items() if v is not None}}
        return MaskedMultiCropWrapper(backbone, head, DINOHead(embed_dim, **patch_options))

    @staticmethod
    def _feature_dim(backbone: nn.Module, features: nn.Module, embed_dim: Optional[int],
                     size: Optional[tuple[int, ...]]) -> int:
        """``embed_dim`` checked, or the width a dummy forward gives; without an ``input_size`` a
        failed forward falls back to the backbone's own width attribute (``embed_dim``, ...)."""
        if embed_dim is not None:
            return check_positive_int("embed_dim", embed_dim)
        try:
            return infer_feature_dim(features, size)
        except ValueError:
            hint = feature_dim_hint(backbone)
            if hint is None or size is not None:  # an explicit input_size that fails is the user's to fix
                raise
            return hint

    @property
    def in_chans(self) -> Optional[int]:
        """The channel count the views must have (None: not checked), from ``input_size`` or the backbone."""
        return self.student.in_chans

    @property
    def backbone(self) -> nn.Module:
        """The student's feature extractor (shares its parameters with the backbone you gave)."""
        return self.student.backbone

    @property
    def teacher_backbone(self) -> nn.Module:
        """The teacher's feature extractor: the usual network to evaluate or export."""
        return cast(MultiCropWrapper, self.teacher.module).backbone

    def forward(
        self, views: Sequence[Tensor], epoch: Optional[int] = None, *, teacher_temp: Optional[float] = None,
        masks: Optional[Tensor] = None, gram_views: Optional[Sequence[Tensor]] = None,
    ) -> Tensor:
        """DINO loss of ``views``.

        Args:
            views: list of (B, C, H_v, W_v) tensors, the ``num_global_views`` global views first.
            epoch: teacher temperature schedule index (needed only with a warm-up).
            teacher_temp: a temperature for this call instead of the schedule.
            masks: with ``ibot``: (T*B, N) bool masks of the global crops (crop-major, True = masked),
                best on the CPU; None draws them (:func:`~dino_pytorch.ibot.step_masks`).
            gram_views: with ``gram``: the Gram teacher's T crops (B, C, H', W'), at ``gram.teacher_scale``
                times the global size (the augmenters' ``gram_teacher_scale``); None: the global views.

        Returns:
            0-dim float32 loss; its parts (detached) are in ``self.loss_parts``.
        """
        if not isinstance(views, (list, tuple)):
            raise TypeError(f"views is a {type(views).__name__}, expected a list of (B, C, H, W) tensors")
        if len(views) < self.num_global_views:
            raise ValueError(
                f"views has {len(views)} tensors, expected at least num_global_views={self.num_global_views}"
            )
        temp = teacher_temp if teacher_temp is not None else self.criterion.teacher_temp_at(epoch)
        with self.warmup_frozen_backbone():  # the head warm-up: no graph through the backbone
            if gram_views is not None and self.gram is None:
                raise ValueError("gram_views given to a DINO built without gram=; expected gram=GramAnchor(...)")
            if self.ibot is not None or self.gram is not None:
                loss, teacher_out, features = self._dino_and_ibot(list(views), epoch, temp, masks, gram_views)
            else:
                teacher_out = self._teacher_forward(list(views[: self.num_global_views]))
                loss, features = self._dino_loss(list(views), teacher_out, epoch, teacher_temp)
        # Kept (detached: no graph, no copy) for collapse_metrics at the caller's log points.
        self._last_teacher = (teacher_out.detach(), temp)
        if self.koleo_weight > 0:
            # As DINOv2: on each global view's student backbone features separately, averaged (both
            # views in one set would make each image's neighbour its own other view).
            per_view = features[: self.num_global_views * views[0].shape[0]].chunk(self.num_global_views)
            koleo = torch.stack([self.koleo(f) for f in per_view]).mean()
            self.loss_parts["koleo_loss"] = koleo.detach()
            loss = loss + self.koleo_weight * koleo
        self._last_loss = self.loss_parts["dino_loss"]  # collapse_metrics' KL and loss / ln K: the DINO part
        return loss

    def _dino_loss(self, views: list[Tensor], teacher_out: Tensor, epoch: Optional[int],
                   teacher_temp: Optional[float]) -> tuple[Tensor, Tensor]:
        """The DINO loss of the views against the teacher's logits, and the student's backbone features."""
        if self.fused_head_loss:
            bottleneck, features = self._student_forward(views, return_backbone_feats=True, bottleneck=True)
            v, g = cast(DINOHead, self.student.head).last_layer_weights()
            loss = self.criterion.forward_fused_head(bottleneck, v, g, teacher_out, epoch, teacher_temp=teacher_temp,
                                                     num_teacher_views=self.num_global_views)
        else:
            student_out, features = self._student_forward(views, return_backbone_feats=True)
            # The concatenated (V*B, K) / (T*B, K) outputs go in as they are: no per-view copies.
            loss = self.criterion(student_out, teacher_out, epoch, teacher_temp=teacher_temp,
                                  num_teacher_views=self.num_global_views)
        self.loss_parts = {"dino_loss": loss.detach()}
        return loss, features

    def _dino_and_ibot(self, views: list[Tensor], epoch: Optional[int], temp: float, masks: Optional[Tensor],
                       gram_views: Optional[Sequence[Tensor]] = None) -> tuple[Tensor, Tensor, Tensor]:
        """DINO + weight * iBOT (when on) + weight * Gram (when on): ``(loss, teacher logits, student CLS
        features)``."""
        num_global = self.num_global_views
        index, masks = self._ibot_masks(views, masks)
        teacher_out, teacher_patch = self._teacher_forward(views[:num_global], num_global, index)
        student_out, student_patch, features, tokens = self._student_forward(  # distilled: the crops whole, as DINOv3
            views, num_global, index, masks=masks if self.distill_teacher is None else None, return_backbone_feats=True,
            return_patch_tokens=True)
        loss = self.criterion(student_out, teacher_out, epoch, teacher_temp=temp, num_teacher_views=num_global)
        self.loss_parts = {"dino_loss": loss.detach()}
        if self.ibot is not None:
            ibot = self.ibot_loss(student_patch, teacher_patch, masks, epoch, teacher_temp=temp)
            self.loss_parts["ibot_loss"] = ibot.detach()
            loss = loss + self.ibot.weight * ibot
        if self.gram_teacher is not None:
            gram, parts = self.gram_teacher.loss_term(self.step, self.teacher_backbone, tokens, views[:num_global],
                                                      gram_views, cast(int, self.patch_size), masks)
            self.loss_parts.update(parts)
            loss = loss + gram
        return loss, teacher_out, features

    def _ibot_masks(self, views: list[Tensor], masks: Optional[Tensor]) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """iBOT's ``(masked-patch index (M,), masks (T*B, N))`` on the views' device; (None, None) without iBOT."""
        if self.ibot is None:
            return None, None
        config, num_global, batch = self.ibot, self.num_global_views, views[0].shape[0]
        if masks is None:
            grid = (views[0].shape[-2] // cast(int, self.patch_size), views[0].shape[-1] // cast(int, self.patch_size))
            masks = step_masks(config, grid, batch, num_global, self.step, self._micro_batch,
                               distributed.get_rank(), distributed.get_world_size())
        self._micro_batch += 1
        # The masked patches' indices from CPU masks: no device sync (CUDA masks would sync here).
        index = masks.cpu().flatten().nonzero().squeeze(1).to(views[0].device, non_blocking=True)
        return index, masks.to(views[0].device, non_blocking=True)

    def collapse_metrics(self) -> dict[str, Tensor]:
        """Health of the teacher targets of the last forward (0-dim tensors: read them at log points).

        See :func:`dino_pytorch.diagnostics.collapse_metrics`; uses the current centre.
        """
        if self._last_teacher is None:
            raise RuntimeError("collapse_metrics() needs a forward first: call dino(views)")
        logits, temp = self._last_teacher
        with torch.no_grad():
            probs = self.criterion.teacher_probs(list(logits.float().chunk(self.num_global_views)), temp)
            return collapse_metrics(torch.cat(probs), self.criterion.center, self._last_loss)
