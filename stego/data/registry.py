"""Dataset registry: names, classes, palettes, splits, and :func:`build_dataset`.

=============  =========  ========================================  ==========================
name           classes    labels                                    splits
=============  =========  ========================================  ==========================
cocostuff27    27         stuffthingmaps fine ids -> 27 coarse      train (full list), val (_7)
cocostuff15    15         stuff classes only, things ignored        train, val (_7 list)
cocostuff3     3          sky, plant, ground                        train, val (Few_Stuff_6)
cityscapes27   27         labelId - 7                               train, val
potsdam3       3          6 ISPRS classes merged to 3               train, val, train+val,
                                                                    unlabelled_train, all
potsdamraw     3          as potsdam3, full tiles                   all
camvid         11         ids 0..10, 255 void                       train, val, test
folder         user       ids 0..n_classes-1, 255 void              all
=============  =========  ========================================  ==========================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stego.data import classes as C
from stego.data import label_maps as M
from stego.data.cropped import FiveCropDataset
from stego.data.datasets import (
    COCO_LISTS,
    POTSDAM_LISTS,
    PotsdamDataset,
    Sample,
    SegmentationDataset,
    Transform,
    camvid_samples,
    cityscapes_samples,
    coco_samples,
    potsdam_samples,
    potsdamraw_samples,
)
from stego.data.folder import FolderDataset
from stego.errors import StegoError

__all__ = ["DatasetInfo", "DATASETS", "ALIASES", "build_dataset", "dataset_info"]


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is: its classes (names, palette) and splits. ``n_classes`` is ``None``
    for ``folder``, whose classes the user gives."""

    name: str
    n_classes: int | None
    class_names: tuple[str, ...]
    palette: np.ndarray = field(repr=False)  # (n_classes, 3) uint8 RGB
    splits: tuple[str, ...]


DATASETS: dict[str, DatasetInfo] = {
    "cocostuff27": DatasetInfo(
        "cocostuff27", 27, C.COCO27_CLASSES, C.pascal_palette(27), ("train", "val")
    ),
    "cocostuff15": DatasetInfo(
        "cocostuff15", 15, C.COCO15_CLASSES, C.pascal_palette(27)[12:], ("train", "val")
    ),
    "cocostuff3": DatasetInfo(
        "cocostuff3", 3, C.COCO3_CLASSES, C.pascal_palette(27)[[23, 22, 21]], ("train", "val")
    ),
    "cityscapes27": DatasetInfo(
        "cityscapes27", 27, C.CITYSCAPES27_CLASSES, C.CITYSCAPES27_PALETTE, ("train", "val")
    ),
    "potsdam3": DatasetInfo(
        "potsdam3", 3, C.POTSDAM3_CLASSES, C.POTSDAM3_PALETTE, tuple(POTSDAM_LISTS)
    ),
    "potsdamraw": DatasetInfo("potsdamraw", 3, C.POTSDAM3_CLASSES, C.POTSDAM3_PALETTE, ("all",)),
    "camvid": DatasetInfo(
        "camvid", 11, C.CAMVID11_CLASSES, C.CAMVID11_PALETTE, ("train", "val", "test")
    ),
    "folder": DatasetInfo("folder", None, (), np.zeros((0, 3), np.uint8), ("all",)),
}
"""Every dataset :func:`build_dataset` knows, by name."""

ALIASES: dict[str, str] = {
    "cocostuff": "cocostuff27",
    "cityscapes": "cityscapes27",
    "potsdam": "potsdam3",
    "camvid11": "camvid",
}
"""Other accepted spellings (the original code's names)."""

_LIST_OF: dict[tuple[str, str], str] = {
    ("cocostuff27", "train"): COCO_LISTS["full"],
    ("cocostuff27", "val"): COCO_LISTS["curated7"],
    ("cocostuff15", "train"): COCO_LISTS["curated7"],
    ("cocostuff15", "val"): COCO_LISTS["curated7"],
    ("cocostuff3", "train"): COCO_LISTS["few6"],
    ("cocostuff3", "val"): COCO_LISTS["few6"],
}

_MAPS: dict[str, Callable[[], M.LabelMap]] = {
    "cocostuff27": M.coco27_map,
    "cocostuff15": M.coco15_map,
    "cocostuff3": M.coco3_map,
    "cityscapes27": M.cityscapes27_map,
    "potsdam3": M.potsdam3_map,
    "potsdamraw": M.potsdam3_map,
    "camvid": M.camvid11_map,
}


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name`` (aliases accepted); unknown names list valid ones."""
    key = ALIASES.get(name, name)
    if key not in DATASETS:
        raise StegoError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}.")
    return DATASETS[key]


def _samples(name: str, root: Path, split: str, image_list: str | None) -> list[Sample]:
    if name.startswith("cocostuff"):
        return coco_samples(root, split, image_list or _LIST_OF[(name, split)])
    if name == "cityscapes27":
        return cityscapes_samples(root, split)
    if name == "potsdam3":
        return potsdam_samples(root, split)
    if name == "potsdamraw":
        return potsdamraw_samples(root, split)
    return camvid_samples(root, split)


def build_dataset(
    name: str,
    root: str | Path,
    split: str | None = None,
    *,
    transform: Transform | None = None,
    crop_type: str | None = None,
    crop_dir: str | Path | None = None,
    **kwargs: Any,
) -> SegmentationDataset:
    """Build dataset ``name`` from ``root`` for ``split``.

    Args:
        name: a key of :data:`DATASETS` (or an alias such as ``cityscapes``).
        root: the data root (``--data-root``); for ``folder``, the image folder.
        split: one of the dataset's splits (``folder``: ``None`` or ``"all"``).
        transform: a :class:`~stego.data.PairTransform` (``None``: full resolution).
        crop_type: ``None`` (or ``"none"``) for the full images, ``"five"`` for the five-crop
            images written by ``stego crop`` (or by the original code).
        crop_dir: where the crops are; default ``<root>/cropped``.
        **kwargs: ``image_list`` (COCO: a curated list file name); for ``folder``:
            ``label_dir``, ``n_classes``, ``ignore_value``, ``skip_bad``.

    Items are dicts ``{"image": (3,H,W) float [0,1], "label": (H,W) int64 (IGNORE=-1),
    "index": int, "path": str}``, ``label`` absent without labels.
    """
    info = dataset_info(name)
    split = "all" if (info.name == "folder" and split is None) else split
    if split not in info.splits:
        raise StegoError(
            f"unknown split {split!r} for {info.name}; choose one of: {', '.join(info.splits)}."
        )
    crop_type = None if crop_type == "none" else crop_type
    if crop_type not in (None, "five"):
        raise StegoError(f"unknown crop_type {crop_type!r}; choose None (full images) or 'five'.")
    allowed = (
        {"label_dir", "n_classes", "ignore_value", "skip_bad"}
        if info.name == "folder"
        else {"image_list"}
    )
    unknown = set(kwargs) - allowed
    if unknown:
        raise StegoError(
            f"unknown option(s) {', '.join(sorted(unknown))} for {info.name}; "
            f"accepted: {', '.join(sorted(allowed))}."
        )
    root = Path(root).expanduser()
    if crop_type == "five":
        n_classes = info.n_classes if info.n_classes is not None else kwargs.get("n_classes") or 254
        if crop_dir is None and info.name == "folder":
            raise StegoError(
                "crop_type='five' on a folder needs crop_dir (the --out of stego crop)."
            )
        crops = root / "cropped" if crop_dir is None else Path(crop_dir)
        return FiveCropDataset(crops, info.name, split, n_classes, transform=transform)
    if info.name == "folder":
        return FolderDataset(root, transform=transform, **kwargs)
    samples = _samples(info.name, root, split, kwargs.get("image_list"))
    cls = PotsdamDataset if info.name.startswith("potsdam") else SegmentationDataset
    return cls(
        samples, label_map=_MAPS[info.name](), transform=transform, name=f"{info.name}/{split}"
    )
