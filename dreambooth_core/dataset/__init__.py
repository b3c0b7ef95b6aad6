"""Instance (and user-supplied class) images that survive real-world input.

DreamBooth learns from 3-30 photos, so every one counts and every one is a chance for a
surprise: phone photos stored sideways with an EXIF flag, CMYK or 16-bit exports, transparent
PNGs, GIFs, truncated downloads, files with the wrong extension, decompression bombs, the same
photo twice. Each file is validated, fixed where the fix is unambiguous, and otherwise skipped
with a reason, so the user learns what happened to each file instead of getting a traceback or,
worse, silently training on a black square. Everything here is host-independent: the trainer,
the CLI and the ComfyUI/WebUI adapters all call `prepare_dataset`.

One module per job; the flow runs one way, into `prepare`:
  sources     what a folder, a list of files or in-memory images holds (the candidates)
  decode      one candidate to an upright RGB image, or a reason to skip it
  colour      colour modes, 16-bit and transparency to 8-bit RGB
  masks       subject masks for a masked loss (alpha channels, a host's masks)
  captions    caller's captions, sidecar files, the template
  duplicates  exact and near duplicates
  crops       aspect-ratio buckets, training sizes, cover-and-crop
  report      per-file status and notes; DatasetError
  prepare     prepare_dataset and the PreparedDataset it returns
  concepts    several subjects in one run: the concept list, its checks, their photos combined
"""
from __future__ import annotations

from .captions import CAPTION_EXTS, fill_caption
from .colour import ALPHA_BACKGROUND
from .crops import CROPS, bucket_sizes
from .decode import MAX_PIXELS
from .duplicates import NEAR_DUPLICATE_BITS, NEAR_DUPLICATE_COLOUR
from .concepts import Concept, combine, parse_concepts, read_concepts_file
from .prepare import PreparedDataset, TrainImage, prepare_dataset
from .report import DatasetError, FileReport
from .sources import IMAGE_EXTS

__all__ = [
    "ALPHA_BACKGROUND", "CAPTION_EXTS", "CROPS", "Concept", "DatasetError", "FileReport", "IMAGE_EXTS", "MAX_PIXELS",
    "NEAR_DUPLICATE_BITS", "NEAR_DUPLICATE_COLOUR", "PreparedDataset", "TrainImage", "bucket_sizes",
    "combine", "fill_caption", "parse_concepts", "prepare_dataset", "read_concepts_file",
]
