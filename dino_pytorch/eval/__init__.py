"""Evaluation of frozen features: weighted k-NN and the linear probe (official DINO protocols)."""
from .knn import extract_features, knn_classifier, knn_eval, nearest_neighbours
from .linear import LinearClassifier, train_linear_probe, vit_linear_features

__all__ = [
    "LinearClassifier",
    "extract_features",
    "knn_classifier",
    "knn_eval",
    "nearest_neighbours",
    "train_linear_probe",
    "vit_linear_features",
]
