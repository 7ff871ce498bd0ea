"""Deprecated: renamed :mod:`dino_pytorch.features` (``backbones`` read like the models package)."""
import warnings

from .features import *  # noqa: F401,F403
from .features import (  # noqa: F401
    CLASSIFIER_NAMES,
    BypassClassifier,
    TimmFeatures,
    as_feature_extractor,
    feature_dim_hint,
    find_classifier,
    infer_feature_dim,
)

warnings.warn(
    "dino_pytorch.backbones is deprecated and will be removed in 0.3: import from dino_pytorch.features",
    DeprecationWarning,
    stacklevel=2,
)
