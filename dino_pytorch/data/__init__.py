"""Own data: any folder of images or a file list (:class:`ImageFiles`), band files (``.npy``, TIFF)
mapped to ``[0, 1]``, per-channel statistics from a sample (:func:`sample_statistics`), and the
evaluation sets and transform of such data. Fashion-MNIST lives in :mod:`dino_pytorch.datasets`.
"""
from .bands import DecodeError, check_value_range, dtype_range, read_npy, read_tiff, to_chw, to_unit_range
from .eval_sets import EvalTransform, eval_statistics, has_split_folders, is_labelled, own_eval_sets
from .files import (
    BAND_EXTENSIONS,
    IMAGE_EXTENSIONS,
    PHOTO_EXTENSIONS,
    ImageFiles,
    ValueRangeNeeded,
    find_images,
    read_file_list,
    read_raw,
    replacement_index,
)
from .statistics import STATISTICS_SAMPLE, DataStatistics, band_range, sample_indices, sample_statistics, unit_values

__all__ = [
    "BAND_EXTENSIONS", "DataStatistics", "DecodeError", "EvalTransform", "IMAGE_EXTENSIONS", "ImageFiles",
    "PHOTO_EXTENSIONS", "STATISTICS_SAMPLE", "ValueRangeNeeded", "band_range", "check_value_range", "dtype_range",
    "eval_statistics", "find_images", "has_split_folders", "is_labelled", "own_eval_sets", "read_file_list",
    "read_npy", "read_raw", "read_tiff", "replacement_index", "sample_indices", "sample_statistics", "to_chw",
    "to_unit_range", "unit_values",
]
