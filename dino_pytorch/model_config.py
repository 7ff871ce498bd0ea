"""Self-describing checkpoints: the configuration that rebuilds the network a checkpoint holds.

A checkpoint written by the training program carries, under ``"model_config"``::

    {"schema_version": 1,
     "arch": "vit_tiny",                                   # a dino_pytorch.models.create_model name
     "backbone_kwargs": {"patch_size": 4, "depth": 4, "embed_dim": 96, "in_chans": 1, "img_size": 28, ...},
     "head": {"in_dim": 96, "out_dim": 4096, "use_bn": True, "norm_last_layer": True, "nlayers": 3,
              "hidden_dim": 512, "bottleneck_dim": 128},
     "data": {"dataset": "fashion_mnist", "in_chans": 1, "image_size": 28, "mean": [...], "std": [...],
              "value_range": None, "statistics": "default"}}

so every program rebuilds the backbone from the file alone (``create_model(arch, **backbone_kwargs)``)
and feeds it images prepared as in training: ``mean`` / ``std`` are what the run normalised with
(``statistics``: ``"default"``, ``"given"`` or ``"auto (N images, seed S)"``, docs/own-data.md), and
``value_range`` the per-band ``[low, high]`` that mapped band files to ``[0, 1]`` (None: photos, or
integer bands by their dtype's range). Files without it (official checkpoints, ours before
0.2, checkpoints of a user's own backbone, which no name can rebuild) still load, given the
architecture flags or through the Python API. A ``schema_version`` newer than this code knows is
refused rather than half-read.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

from torch import nn

from .checkpoint import CheckpointError
from .validate import check_positive_int

SCHEMA_VERSION = 1
KEY = "model_config"


def make_model_config(
    arch: str,
    backbone_kwargs: Mapping[str, Any],
    *,
    head: Optional[Mapping[str, Any]] = None,
    data: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """The ``"model_config"`` entry of a checkpoint (plain types only, so ``weights_only`` loads it).

    Args:
        arch: a name :func:`dino_pytorch.models.create_model` knows.
        backbone_kwargs: the keyword arguments that built the backbone (``create_model(arch, **kw)``).
        head: the :class:`~dino_pytorch.DINOHead` keyword arguments (``in_dim``, ``out_dim``, ...).
        data: how inputs were prepared: ``dataset``, ``in_chans``, ``image_size``, ``mean``, ``std``
            (and, from dino-train, ``value_range`` and ``statistics``).
    """
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"arch={arch!r}, expected a model name (str)")
    return {
        "schema_version": SCHEMA_VERSION,
        "arch": arch,
        "backbone_kwargs": _plain(backbone_kwargs),
        "head": _plain(head or {}),
        "data": _plain(data or {}),
    }


def _plain(mapping: Mapping[str, Any]) -> dict[str, Any]:
    # Tuples become lists so the entry survives any serialisation; values must be plain.
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, tuple):
            value = list(value)
        if not (value is None or isinstance(value, (bool, int, float, str, list))):
            raise TypeError(f"model config entry {key}={value!r}: expected a plain value (number, str, list, None)")
        out[str(key)] = value
    return out


def read_model_config(checkpoint: Mapping[str, Any], path: str = "checkpoint") -> Optional[dict[str, Any]]:
    """The stored configuration of a checkpoint dict, or None when it has none.

    Raises:
        CheckpointError: the entry exists but is malformed, or has a newer schema than this code.
    """
    config = checkpoint.get(KEY) if isinstance(checkpoint, Mapping) else None
    if config is None:
        return None
    if not isinstance(config, Mapping) or not isinstance(config.get("arch"), str):
        raise CheckpointError(f"{path}: its {KEY!r} entry is malformed (expected a dict with an 'arch' name)")
    version = config.get("schema_version")
    try:
        version = check_positive_int(f"{KEY}.schema_version", version)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    if version > SCHEMA_VERSION:
        raise CheckpointError(
            f"{path}: {KEY} schema_version={version} was written by a newer dino-pytorch (this one reads "
            f"up to {SCHEMA_VERSION}); upgrade dino-pytorch"
        )
    return {
        "schema_version": version,
        "arch": config["arch"],
        "backbone_kwargs": dict(config.get("backbone_kwargs") or {}),
        "head": dict(config.get("head") or {}),
        "data": dict(config.get("data") or {}),
    }


def build_backbone(config: Mapping[str, Any]) -> nn.Module:
    """The backbone a model configuration describes, freshly initialised (load weights after)."""
    from .models import create_model

    return create_model(config["arch"], **config["backbone_kwargs"])


def is_vit(config: Mapping[str, Any]) -> bool:
    """Whether the configuration describes one of the package's ViTs, v1 (``vit_*``) or DINOv2's
    (``dinov2_vit_*``): attention maps need one."""
    return str(config["arch"]).startswith(("vit_", "dinov2_vit_"))
