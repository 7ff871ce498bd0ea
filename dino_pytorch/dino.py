"""DINO: the three-line path. Glue over the five modules; it holds no logic they don't."""
from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

from torch import Tensor, nn

from .backbones import as_feature_extractor, feature_dim_hint, infer_feature_dim
from .head import DINOHead
from .loss import DINOLoss
from .teacher import EMATeacher
from .wrapper import MultiCropWrapper


class DINO(nn.Module):
    """DINO self-distillation around any backbone.

    >>> dino = DINO(backbone, out_dim=65536)                      # build
    >>> loss = dino(views)                                          # in the loop: views = [g1, g2, l1, ...]
    >>> dino.update_teacher()                                       # after optimizer.step()

    ``dino(views)`` runs the teacher on the first ``num_global_views`` views and the student on all
    of them and returns the DINO loss. ``update_teacher()`` does the EMA (official per-step cosine
    momentum when ``total_steps`` is given) and applies the centre statistics gathered since the
    last call, so gradient accumulation is handled by calling it once per optimizer step.

    The parameters of ``dino`` that require grad are exactly the student's trainable ones:
    ``AdamW(p for p in dino.parameters() if p.requires_grad)`` is right.

    Args:
        backbone: any ``nn.Module`` mapping (B, C, H, W) images to features; a trailing classifier
            (``fc``/``head``/``heads``/``classifier``; timm's head) is bypassed, never edited.
        out_dim: K, the number of prototypes.
        embed_dim: the backbone's feature width; inferred with a dummy forward when None.
        input_size: (C, H, W) of that dummy forward (default: (C of the first conv, 224, 224)).
        num_global_views: views the teacher sees (official: 2).
        use_bn, norm_last_layer, nlayers, hidden_dim, bottleneck_dim: :class:`DINOHead` options.
        teacher_temp, warmup_teacher_temp, warmup_teacher_temp_epochs, nepochs, student_temp,
            center_momentum, centering: :class:`DINOLoss` options.
        momentum_teacher, final_momentum, total_steps, teacher_buffers: :class:`EMATeacher` options.

    Attributes:
        student: :class:`MultiCropWrapper` (backbone features + head), trained by the optimizer.
        teacher: :class:`EMATeacher` of the student.
        criterion: :class:`DINOLoss`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        out_dim: int = 65536,
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
        momentum_teacher: float = 0.996,
        final_momentum: float = 1.0,
        total_steps: Optional[int] = None,
        teacher_buffers: Literal["keep", "copy", "ema"] = "keep",
    ) -> None:
        super().__init__()
        if isinstance(num_global_views, bool) or not isinstance(num_global_views, int) or num_global_views < 1:
            raise ValueError(f"num_global_views={num_global_views!r}, expected a positive int")
        features = as_feature_extractor(backbone)
        if embed_dim is None:
            try:
                embed_dim = infer_feature_dim(features, input_size)
            except ValueError:
                embed_dim = feature_dim_hint(backbone)
                if embed_dim is None:
                    raise
        head = DINOHead(embed_dim, out_dim, use_bn=use_bn, norm_last_layer=norm_last_layer,
                        nlayers=nlayers, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim)
        self.num_global_views = num_global_views
        self.student = MultiCropWrapper(features, head)
        self.teacher = EMATeacher(self.student, momentum=momentum_teacher, final_momentum=final_momentum,
                                  total_steps=total_steps, buffers=teacher_buffers)
        self.criterion = DINOLoss(
            out_dim,
            warmup_teacher_temp=teacher_temp if warmup_teacher_temp is None else warmup_teacher_temp,
            teacher_temp=teacher_temp,
            warmup_teacher_temp_epochs=warmup_teacher_temp_epochs,
            nepochs=nepochs,
            student_temp=student_temp,
            center_momentum=center_momentum,
            centering=centering,
            center_update="manual",
        )

    @property
    def backbone(self) -> nn.Module:
        """The student's feature extractor (shares its parameters with the backbone you gave)."""
        return self.student.backbone

    @property
    def teacher_backbone(self) -> nn.Module:
        """The teacher's feature extractor: the usual network to evaluate or export."""
        return self.teacher.module.backbone

    def forward(
        self, views: Sequence[Tensor], epoch: Optional[int] = None, *, teacher_temp: Optional[float] = None
    ) -> Tensor:
        """DINO loss of ``views``.

        Args:
            views: list of (B, C, H_v, W_v) tensors, the ``num_global_views`` global views first.
            epoch: teacher temperature schedule index (needed only with a warm-up).
            teacher_temp: a temperature for this call instead of the schedule.

        Returns:
            0-dim float32 loss.
        """
        if not isinstance(views, (list, tuple)):
            raise TypeError(f"views is a {type(views).__name__}, expected a list of (B, C, H, W) tensors")
        if len(views) < self.num_global_views:
            raise ValueError(
                f"views has {len(views)} tensors, expected at least num_global_views={self.num_global_views}"
            )
        teacher_out = self.teacher(list(views[: self.num_global_views]))
        student_out = self.student(list(views))
        # The concatenated (V*B, K) / (T*B, K) outputs go in as they are: no per-view copies.
        return self.criterion(
            student_out, teacher_out, epoch, teacher_temp=teacher_temp, num_teacher_views=self.num_global_views
        )

    def update_teacher(self, momentum: Optional[float] = None) -> float:
        """Once per optimizer step: EMA of the teacher and the centre update. Returns the momentum."""
        self.criterion.update_center()
        return self.teacher.update(self.student, momentum=momentum)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The student's prototype parameters, to freeze in the first epoch (official trick)."""
        head: Any = self.student.head
        return head.last_layer_parameters()
