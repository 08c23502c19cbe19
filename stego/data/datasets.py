"""The paper's datasets (COCO-Stuff, Cityscapes, Potsdam) and CamVid, read from their own layouts.

Every dataset is a list of (image file, label file) pairs plus a :class:`LabelMap` and an
optional :class:`~stego.data.transforms.PairTransform`. An item is a dict::

    {"image": (3, H, W) float32 in [0, 1], "label": (H, W) int64 with IGNORE = -1,
     "index": int, "path": str}

``label`` is absent when the split has no labels. Without a transform, images and labels come
at full resolution. Images of a labelled dataset are read as stored, without applying their
EXIF orientation tag (the labels were drawn on the stored pixels, and the original code read
them so); images without labels are turned upright by the tag. Potsdam tiles whose
``gt/<id>.mat`` is absent are unlabelled (every pixel IGNORE), as in the original code; every
other dataset refuses a missing label file. Expected layouts (``root`` is ``--data-root``; the
dataset folder itself is accepted too):

- COCO-Stuff: ``root/cocostuff/images/{train2017,val2017}/<id>.jpg``,
  ``root/cocostuff/annotations/{train2017,val2017}/<id>.png`` (stuffthingmaps fine ids), image
  lists ``root/cocostuff/curated/{train2017,val2017}/<list>.txt`` (one id per line).
- Cityscapes: ``root/cityscapes/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` and
  ``root/cityscapes/gtFine/<split>/<city>/*_gtFine_labelIds.png``.
- Potsdam: ``root/potsdam/imgs/<id>.mat`` (key ``img``, H x W x 4, RGB + IR),
  ``root/potsdam/gt/<id>.mat`` (key ``gt``), split lists ``root/potsdam/<list>.txt``.
- Potsdam raw: ``root/potsdamraw/processed/{imgs,gt}/<im>_<ih>_<iw>.mat``.
- CamVid: ``root/images/<split>/<name>.png`` and ``root/labels/<split>/<name>.png``
  (``root/camvid/...`` also accepted).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from stego.data.label_maps import IGNORE, LabelMap
from stego.data.readers import read_image, read_label, read_mat_array
from stego.data.transforms import PairTransform
from stego.errors import StegoError

__all__ = [
    "Sample",
    "SegmentationDataset",
    "PotsdamDataset",
    "locate",
    "coco_samples",
    "cityscapes_samples",
    "camvid_samples",
    "potsdam_samples",
    "potsdamraw_samples",
    "COCO_LISTS",
    "POTSDAM_LISTS",
]

Transform = Callable[..., Any]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One image file and its label file (``None`` when unlabelled)."""

    image: Path
    label: Path | None = None


def locate(root: str | Path, folder: str, marker: str) -> Path:
    """``root/folder`` if it exists, else ``root`` itself when it contains ``marker``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise StegoError(f"data root {root} does not exist; pass the folder holding {folder}/.")
    if (root / folder).is_dir():
        return root / folder
    if (root / marker).exists():
        return root
    raise StegoError(
        f"expected the {folder} dataset at {root / folder} (with {marker}/ inside), not found. "
        f"Point --data-root at the folder that contains {folder}/."
    )


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise StegoError(f"{what}: expected the folder {path}, which does not exist.")
    return path


def _nonempty(samples: list[Sample], where: Path, split: str) -> list[Sample]:
    if not samples:
        raise StegoError(f"split {split!r} is empty: no images found under {where}.")
    return samples


def _check_labels_exist(samples: Sequence[Sample]) -> None:
    missing = [s.label for s in samples if s.label is not None and not s.label.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        raise StegoError(
            f"{len(missing)} label files are missing, e.g. {shown}; "
            "check that the label folder is complete and matches the images."
        )


COCO_LISTS: dict[str, str] = {
    "full": "Coco164kFull_Stuff_Coarse.txt",
    "curated7": "Coco164kFull_Stuff_Coarse_7.txt",
    "few6": "Coco164kFew_Stuff_6.txt",
}
"""Curated COCO-Stuff image lists (from IIC), by short name."""


def coco_samples(root: str | Path, split: str, image_list: str) -> list[Sample]:
    """COCO-Stuff pairs of ``split`` (train/val) listed in ``curated/<split>2017/<image_list>``."""
    base = locate(root, "cocostuff", "curated")
    sub = {"train": "train2017", "val": "val2017"}[split]
    list_file = base / "curated" / sub / image_list
    if not list_file.is_file():
        raise StegoError(
            f"COCO-Stuff image list {list_file} not found; download the curated lists (IIC) "
            f"into {list_file.parent}/."
        )
    ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    img_dir = _require_dir(base / "images" / sub, "COCO-Stuff images")
    ann_dir = _require_dir(base / "annotations" / sub, "COCO-Stuff stuffthingmaps")
    samples = [Sample(img_dir / f"{i}.jpg", ann_dir / f"{i}.png") for i in ids]
    missing = [s.image for s in samples if not s.image.is_file()]
    if missing:
        raise StegoError(
            f"{len(missing)} images of {list_file} are missing, e.g. {missing[0]}; "
            "check the COCO 2017 image download."
        )
    _check_labels_exist(samples)
    return _nonempty(samples, list_file, split)


def cityscapes_samples(root: str | Path, split: str) -> list[Sample]:
    """Cityscapes pairs of ``split``, sorted by city then file name."""
    base = locate(root, "cityscapes", "leftImg8bit")
    img_dir = _require_dir(base / "leftImg8bit" / split, "Cityscapes images")
    gt_dir = _require_dir(base / "gtFine" / split, "Cityscapes gtFine labels")
    samples = []
    for image in sorted(img_dir.glob("*/*_leftImg8bit.png")):
        name = image.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
        samples.append(Sample(image, gt_dir / image.parent.name / name))
    _check_labels_exist(samples)
    return _nonempty(samples, img_dir, split)


def camvid_samples(root: str | Path, split: str) -> list[Sample]:
    """CamVid pairs of ``split``, sorted by file name."""
    base = locate(root, "camvid", "images")
    img_dir = _require_dir(base / "images" / split, "CamVid images")
    label_dir = base / "labels" / split
    images = sorted(p for p in img_dir.glob("*.png") if not p.name.startswith("."))
    labelled = label_dir.is_dir()
    samples = [Sample(p, label_dir / p.name if labelled else None) for p in images]
    _check_labels_exist(samples)
    return _nonempty(samples, img_dir, split)


POTSDAM_LISTS: dict[str, tuple[str, ...]] = {
    "train": ("labelled_train.txt",),
    "val": ("labelled_test.txt",),
    "train+val": ("labelled_train.txt", "labelled_test.txt"),
    "unlabelled_train": ("unlabelled_train.txt",),
    "all": ("all.txt",),
}
"""Potsdam split name -> split list files (as in the original code)."""


def _with_optional_labels(samples: list[Sample]) -> list[Sample]:
    """Drop the label paths when no label exists (an unlabelled split); else keep them all,
    the missing ones included (:class:`PotsdamDataset` reads those as unlabelled)."""
    if any(s.label is not None and s.label.is_file() for s in samples):
        return samples
    return [Sample(s.image) for s in samples]


def potsdam_samples(root: str | Path, split: str) -> list[Sample]:
    """Potsdam tiles of ``split``; labels when the split's ``gt/*.mat`` exist."""
    base = locate(root, "potsdam", "imgs")
    ids: list[str] = []
    for name in POTSDAM_LISTS[split]:
        list_file = base / name
        if not list_file.is_file():
            raise StegoError(
                f"Potsdam split list {list_file} not found (needed for split {split!r})."
            )
        ids += [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    img_dir = _require_dir(base / "imgs", "Potsdam images")
    samples = [Sample(img_dir / f"{i}.mat", base / "gt" / f"{i}.mat") for i in ids]
    missing = [s.image for s in samples if not s.image.is_file()]
    if missing:
        raise StegoError(f"{len(missing)} Potsdam images are missing, e.g. {missing[0]}.")
    return _nonempty(_with_optional_labels(samples), base / POTSDAM_LISTS[split][0], split)


def _tile_key(path: Path) -> tuple[int | str, ...]:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[_]", path.stem))


def potsdamraw_samples(root: str | Path, split: str) -> list[Sample]:
    """Full-size Potsdam tiles ``<im>_<ih>_<iw>.mat``, in numeric (im, ih, iw) order."""
    base = locate(root, "potsdamraw", "processed")
    base = base / "processed" if (base / "processed").is_dir() else base
    img_dir = _require_dir(base / "imgs", "Potsdam raw images")
    images = sorted(img_dir.glob("*.mat"), key=_tile_key)
    samples = [Sample(p, base / "gt" / p.name) for p in images]
    return _nonempty(_with_optional_labels(samples), img_dir, split)


class SegmentationDataset(Dataset):
    """Images and optional labels from a list of files; see the module docstring for items.

    Args:
        samples: (image, label) files, in dataset order.
        label_map: raw label values -> class ids (``None``: no labels read).
        transform: applied as ``transform(image, label)``; a :class:`PairTransform` or any
            callable returning (image tensor, label tensor or None). ``None``: full resolution.
        name: dataset name, used in messages.
        exif: apply the images' EXIF orientation; ``None`` = only when there are no labels.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        label_map: LabelMap | None,
        transform: Transform | None = None,
        name: str = "dataset",
        exif: bool | None = None,
    ) -> None:
        self.samples = list(samples)
        self.label_map = label_map
        self.transform = transform
        self.name = name
        self.exif = label_map is None if exif is None else exif

    @property
    def has_labels(self) -> bool:
        return self.label_map is not None and any(s.label is not None for s in self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        kind = type(self).__name__
        return f"{kind}({self.name!r}, {len(self)} images, transform={self.transform!r})"

    def load(self, index: int) -> tuple[Image.Image | Tensor, np.ndarray | None]:
        """Full-resolution image (PIL RGB or (3, H, W) tensor) and mapped label (H, W) int64."""
        sample = self.samples[index]
        image = read_image(sample.image, exif=self.exif)
        if sample.label is None or self.label_map is None:
            return image, None
        raw = read_label(sample.label)
        _check_size((image.height, image.width), raw.shape, sample)
        return image, self.label_map(raw, sample.label)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index = index % len(self)
        image, label = self.load(index)
        if self.transform is None:
            out = PairTransform(None, crop="none")(image, label)
        else:
            out = self.transform(image, label)
        item: dict[str, Any] = {
            "image": out[0],
            "index": index,
            "path": str(self.samples[index].image),
        }
        if out[1] is not None:
            item["label"] = out[1]
        return item


def _check_size(image_hw: tuple[int, ...], label_hw: tuple[int, ...], sample: Sample) -> None:
    if tuple(image_hw) != tuple(label_hw):
        raise StegoError(
            f"label {sample.label} is {label_hw[0]}x{label_hw[1]} but image {sample.image} is "
            f"{image_hw[0]}x{image_hw[1]} (H x W); they must match (labelled images are read "
            "as stored, their EXIF rotation not applied)."
        )


def potsdam_image(arr: np.ndarray, path: Path) -> Tensor:
    """(H, W, C>=3) ``.mat`` image -> (3, H, W) float in [0, 1] from its first three channels.

    uint8 is divided by 255 and uint16 by 65535; float with maximum <= 1 is kept, float with
    maximum <= 255 is divided by 255; anything else is refused.
    """
    if arr.ndim != 3 or arr.shape[-1] < 3:
        raise StegoError(f"Potsdam image {path} has shape {arr.shape}; expected (H, W, 4) RGB+IR.")
    rgb = arr[..., :3]
    if rgb.dtype == np.uint8:
        scaled = rgb.astype(np.float32) / 255.0
    elif rgb.dtype == np.uint16:
        scaled = rgb.astype(np.float32) / 65535.0
    else:
        rgb = rgb.astype(np.float32)
        lo, hi = (float(rgb.min()), float(rgb.max())) if rgb.size else (0.0, 0.0)
        if not np.isfinite([lo, hi]).all() or lo < 0 or hi > 255:
            raise StegoError(
                f"Potsdam image {path} has values in [{lo}, {hi}]; expected [0, 1] or [0, 255]."
            )
        scaled = rgb if hi <= 1.0 else rgb / 255.0
    return torch.from_numpy(np.ascontiguousarray(scaled)).permute(2, 0, 1).contiguous()


class PotsdamDataset(SegmentationDataset):
    """Potsdam ``.mat`` tiles: image key ``img`` (first 3 of 4 channels), label key ``gt``.

    A tile whose ``gt`` file is absent is unlabelled (label all IGNORE), as the original code
    read it; :attr:`unlabelled` counts them (logged as a warning when the dataset is built).
    """

    def __init__(self, samples: Sequence[Sample], **kwargs: Any) -> None:
        super().__init__(samples, **kwargs)
        missing = [s for s in self.samples if s.label is not None and not s.label.is_file()]
        self.unlabelled = len(missing)
        if missing:
            log.warning(
                "%s: %d of %d tiles have no gt file (e.g. %s); they are read as unlabelled "
                "(every pixel ignored), as the original code did.",
                self.name,
                len(missing),
                len(self.samples),
                missing[0].label,
            )

    def load(self, index: int) -> tuple[Image.Image | Tensor, np.ndarray | None]:
        sample = self.samples[index]
        image = potsdam_image(read_mat_array(sample.image, "img"), sample.image)
        if sample.label is None or self.label_map is None:
            return image, None
        if not sample.label.is_file():
            return image, np.full(tuple(image.shape[1:]), IGNORE, dtype=np.int64)
        raw = read_mat_array(sample.label, "gt")
        if raw.ndim == 3 and raw.shape[-1] == 1:
            raw = raw[..., 0]
        if raw.dtype.kind == "f":
            if not np.array_equal(raw, np.round(raw)):
                raise StegoError(
                    f"Potsdam label {sample.label} holds fractional values; expected ids."
                )
            raw = raw.astype(np.int64)
        _check_size(tuple(image.shape[1:]), raw.shape, sample)
        return image, self.label_map(raw, sample.label)
