"""Backbones shipped with the library: the official-compatible ViT family, DINOv2's ViT, a small ConvNet, and
the adapter that gives other ViTs (ours, timm's) DINOv2's masked features call."""
from .adapt_channels import adapt_input_channels
from .convnet import ConvNet
from .dinov2_vit import DinoVisionTransformer, dinov2_vit_base, dinov2_vit_large, dinov2_vit_small
from .dinov2_weights import dinov2_backbone_state_dict, load_dinov2_state_dict, to_dinov2_state_dict
from .masked_vit import MaskedViT, as_masked_vit, strip_masked_vit
from .registry import create_model, list_models
from .vision_transformer import VisionTransformer, vit_base, vit_small, vit_tiny

__all__ = [
    "ConvNet", "DinoVisionTransformer", "MaskedViT", "VisionTransformer", "adapt_input_channels", "as_masked_vit",
    "create_model",
    "dinov2_backbone_state_dict", "dinov2_vit_base", "dinov2_vit_large", "dinov2_vit_small", "list_models",
    "load_dinov2_state_dict", "strip_masked_vit", "to_dinov2_state_dict", "vit_base", "vit_small", "vit_tiny",
]
