"""Numerical kernels of the DINO loss, each with a pure-PyTorch reference.

This package is the one place where a fast path is chosen; callers (``DINOLoss``) never pick one.
"""
from .cross_entropy import multiview_cross_entropy
from .teacher import centered_teacher_softmax, sinkhorn_knopp

__all__ = ["multiview_cross_entropy", "centered_teacher_softmax", "sinkhorn_knopp"]
