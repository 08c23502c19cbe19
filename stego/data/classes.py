"""Class names and display palettes of each dataset.

A palette is an ``(n_classes, 3)`` uint8 array of RGB colours, row ``k`` = colour of class ``k``.
Cityscapes and CamVid use their official colours; the COCO-Stuff variants use the PASCAL VOC
colour generator (as the original code does); Potsdam uses the ISPRS colours of the merged
classes.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "COCO27_CLASSES",
    "COCO15_CLASSES",
    "COCO3_CLASSES",
    "CITYSCAPES27_CLASSES",
    "POTSDAM3_CLASSES",
    "CAMVID11_CLASSES",
    "pascal_palette",
    "CITYSCAPES27_PALETTE",
    "POTSDAM3_PALETTE",
    "CAMVID11_PALETTE",
    "generic_class_names",
]

COCO27_CLASSES: tuple[str, ...] = (
    "electronic", "appliance", "food (thing)", "furniture (thing)", "indoor", "kitchen",
    "accessory", "animal", "outdoor", "person", "sports", "vehicle",
    "ceiling", "floor", "food (stuff)", "furniture (stuff)", "raw material", "textile", "wall",
    "window", "building", "ground", "plant", "sky", "solid", "structural", "water",
)  # fmt: skip

COCO15_CLASSES: tuple[str, ...] = COCO27_CLASSES[12:]
COCO3_CLASSES: tuple[str, ...] = ("sky", "plant", "ground")

CITYSCAPES27_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail",
    "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train",
    "motorcycle", "bicycle",
)  # fmt: skip

POTSDAM3_CLASSES: tuple[str, ...] = (
    "roads and cars",
    "buildings and clutter",
    "vegetation and trees",
)

CAMVID11_CLASSES: tuple[str, ...] = (
    "sky", "building", "pole", "road", "sidewalk", "tree", "sign_symbol", "fence", "car",
    "pedestrian", "bicyclist",
)  # fmt: skip


def pascal_palette(n: int) -> np.ndarray:
    """The PASCAL VOC colour map: bits of the class index spread over R, G, B. Shape (n, 3)."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for k in range(n):
        value, r, g, b = k, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((value >> 0) & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[k] = (r, g, b)
    return palette


CITYSCAPES27_PALETTE = np.array(
    [
        (128, 64, 128), (244, 35, 232), (250, 170, 160), (230, 150, 140), (70, 70, 70),
        (102, 102, 156), (190, 153, 153), (180, 165, 180), (150, 100, 100), (150, 120, 90),
        (153, 153, 153), (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35),
        (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
        (0, 60, 100), (0, 0, 90), (0, 0, 110), (0, 80, 100), (0, 0, 230), (119, 11, 32),
    ],
    dtype=np.uint8,
)  # fmt: skip

POTSDAM3_PALETTE = np.array([(255, 255, 255), (0, 0, 255), (0, 255, 0)], dtype=np.uint8)

CAMVID11_PALETTE = np.array(
    [
        (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
        (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
    ],
    dtype=np.uint8,
)  # fmt: skip


def generic_class_names(n: int) -> tuple[str, ...]:
    """``("class 0", ..., "class n-1")`` for datasets whose classes the user did not name."""
    return tuple(f"class {k}" for k in range(n))
