"""The losses: teacher targets (:mod:`.targets`) and a cross-entropy over an engine (:mod:`dino_pytorch.ops`)."""
from .dino import DINOLoss
from .gram import GramLoss, resize_patch_grid
from .ibot import IBOTPatchLoss
from .targets import TeacherTargets, sinkhorn_knopp

__all__ = ["DINOLoss", "GramLoss", "IBOTPatchLoss", "TeacherTargets", "resize_patch_grid", "sinkhorn_knopp"]
