"""Datasets, label maps, paired transforms and five-crop preprocessing.

Items are dicts ``{"image": (3,H,W) float [0,1], "label": (H,W) int64, "index": int,
"path": str}``; label pixels that belong to no class are :data:`IGNORE` (-1).
"""

from __future__ import annotations

from stego.data.cropped import FiveCropDataset
from stego.data.datasets import SegmentationDataset
from stego.data.five_crop import FiveCropResult, five_crop_boxes, write_five_crops
from stego.data.folder import FolderDataset
from stego.data.label_maps import IGNORE, LabelMap
from stego.data.registry import DATASETS, DatasetInfo, build_dataset, dataset_info
from stego.data.transforms import Padded, PairOutput, PairTransform, pad_to_multiple

__all__ = [
    "IGNORE",
    "LabelMap",
    "PairTransform",
    "PairOutput",
    "Padded",
    "pad_to_multiple",
    "SegmentationDataset",
    "FolderDataset",
    "FiveCropDataset",
    "DATASETS",
    "DatasetInfo",
    "build_dataset",
    "dataset_info",
    "FiveCropResult",
    "five_crop_boxes",
    "write_five_crops",
]
