"""Instance (and user-supplied class) images that survive real-world input: see prepare.py."""
from __future__ import annotations

from .prepare import (ALPHA_BACKGROUND, CAPTION_EXTS, CROPS, IMAGE_EXTS, MAX_PIXELS, NEAR_DUPLICATE_BITS,
                      NEAR_DUPLICATE_COLOUR, DatasetError, FileReport, PreparedDataset, TrainImage, bucket_sizes,
                      fill_caption, prepare_dataset)

__all__ = [
    "ALPHA_BACKGROUND", "CAPTION_EXTS", "CROPS", "DatasetError", "FileReport", "IMAGE_EXTS", "MAX_PIXELS",
    "NEAR_DUPLICATE_BITS", "NEAR_DUPLICATE_COLOUR", "PreparedDataset", "TrainImage", "bucket_sizes",
    "fill_caption", "prepare_dataset",
]
