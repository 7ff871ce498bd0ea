"""Backbones shipped with the library."""
from .convnet import ConvNet

__all__ = ["ConvNet"]
