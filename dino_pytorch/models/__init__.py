"""Backbones shipped with the library: the official-compatible ViT family and a small ConvNet."""
from .convnet import ConvNet
from .registry import create_model, list_models
from .vision_transformer import VisionTransformer, vit_base, vit_small, vit_tiny

__all__ = ["ConvNet", "VisionTransformer", "create_model", "list_models", "vit_base", "vit_small", "vit_tiny"]
