"""Deprecated: the programs' shared set-up moved to :mod:`dino_pytorch.cli._setup` (the library's
evaluation functions stay in :mod:`dino_pytorch.eval`)."""
import warnings

from ..cli._setup import bool_flag as str2bool  # noqa: F401
from ..cli._setup import eval_datasets, resolve_device  # noqa: F401

warnings.warn(
    "dino_pytorch.eval.common is deprecated and will be removed in 0.3: the programs' set-up lives in "
    "dino_pytorch.cli._setup",
    DeprecationWarning,
    stacklevel=2,
)
