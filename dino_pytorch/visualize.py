"""Deprecated: split into :mod:`dino_pytorch.attention` (attention maps) and
:mod:`dino_pytorch.curves` (training curves); the program is :mod:`dino_pytorch.cli.visualize_attention`."""
import warnings

from .attention import (  # noqa: F401
    attention_maps,
    crop_to_patches,
    save_attention_pngs,
    save_dataset_attention_maps,
    threshold_masks,
    upsample,
)
from .augment import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401
from .curves import plot_curves, read_log  # noqa: F401

warnings.warn(
    "dino_pytorch.visualize is deprecated and will be removed in 0.3: import from dino_pytorch.attention "
    "or dino_pytorch.curves",
    DeprecationWarning,
    stacklevel=2,
)
