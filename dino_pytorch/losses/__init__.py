"""The losses: teacher targets (:mod:`.targets`) and a cross-entropy over an engine (:mod:`dino_pytorch.ops`)."""
from .dino import DINOLoss
from .ibot import IBOTPatchLoss
from .targets import TeacherTargets, sinkhorn_knopp

__all__ = ["DINOLoss", "IBOTPatchLoss", "TeacherTargets", "sinkhorn_knopp"]
