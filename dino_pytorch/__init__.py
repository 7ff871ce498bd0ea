"""dino-pytorch: DINO self-supervised learning, composable and numerically official."""
from ._version import __version__
from .augment import BatchedMultiCrop, MultiCropRecipe, MultiCropTransform
from .data import ImageFiles, sample_statistics
from .dino import DINO
from .gram_anchor import GramAnchor
from .head import DINOHead
from .ibot import IBOTConfig
from .koleo import KoLeoLoss
from .losses import DINOLoss, GramLoss, IBOTPatchLoss, resize_patch_grid
from .masking import BlockMasking
from .pretrained import PretrainedReport, load_pretrained
from .schedules import cosine_scheduler
from .teacher import EMATeacher
from .wrapper import MultiCropWrapper

__all__ = [
    "__version__",
    "BatchedMultiCrop",
    "BlockMasking",
    "DINO",
    "DINOHead",
    "DINOLoss",
    "EMATeacher",
    "GramAnchor",
    "GramLoss",
    "IBOTConfig",
    "IBOTPatchLoss",
    "ImageFiles",
    "KoLeoLoss",
    "MultiCropRecipe",
    "MultiCropTransform",
    "MultiCropWrapper",
    "PretrainedReport",
    "cosine_scheduler",
    "load_pretrained",
    "resize_patch_grid",
    "sample_statistics",
]
