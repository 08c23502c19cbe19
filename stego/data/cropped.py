"""On-disk layout of five-crop datasets, and the dataset that reads them.

One layout serves both the original STEGO code's crops and ours::

    <crop_root>/<dataset>_five_crop_0.5/
        img/<split>/<i>.jpg | <i>.png     crop i = source_index * 5 + k, k = 0..4 in the order
                                          top-left, top-right, bottom-left, bottom-right, centre
        label/<split>/<i>.png             uint8, class id + 1 (0 = ignore), as the original stores
        <split>.manifest.json             ours only: written last, atomically (see below)
        <split>.progress.jsonl            ours only: per-image journal while writing

``crop_root`` defaults to ``<data root>/cropped`` (the original's place). The original names
its folders ``cocostuff27_five_crop_0.5`` and ``cityscapes_five_crop_0.5``; both are found.

The manifest records, for every source image, its file, size, group (= its index in the source
split) and each crop's box ``[top, left, height, width]`` and files. A folder with a manifest is
read through it (only files it lists, so stray temporary files are never opened); a folder with
a journal but no manifest is an unfinished run and is refused; a folder with neither is read the
original way (``img/<split>/<i>.jpg``, ``i = 0..N-1``). Paths in a manifest must stay inside the
crop folder: absolute paths and ``..`` are refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from stego.data.datasets import Sample, SegmentationDataset, Transform
from stego.data.label_maps import IGNORE, INVALID, LabelMap
from stego.errors import StegoError

__all__ = [
    "CROP_RATIO",
    "MANIFEST_FORMAT",
    "ORIGINAL_NAMES",
    "FiveCropDataset",
    "crop_folder",
    "find_crop_folder",
    "manifest_path",
    "journal_path",
    "safe_join",
    "shifted_label_map",
]

CROP_RATIO = 0.5
MANIFEST_FORMAT = "stego-five-crop/1"

ORIGINAL_NAMES: dict[str, str] = {"cityscapes27": "cityscapes"}
"""Our dataset name -> the folder prefix the original code used, where they differ."""


def crop_folder(crop_root: str | Path, dataset: str) -> Path:
    """``<crop_root>/<dataset>_five_crop_0.5``: where :func:`write_five_crops` writes."""
    return Path(crop_root) / f"{dataset}_five_crop_{CROP_RATIO}"


def find_crop_folder(crop_root: str | Path, dataset: str) -> Path:
    """Our folder for ``dataset`` if present, else the original code's name for it."""
    ours = crop_folder(crop_root, dataset)
    if ours.is_dir() or dataset not in ORIGINAL_NAMES:
        return ours
    theirs = crop_folder(crop_root, ORIGINAL_NAMES[dataset])
    return theirs if theirs.is_dir() else ours


def manifest_path(folder: Path, split: str) -> Path:
    return folder / f"{split}.manifest.json"


def journal_path(folder: Path, split: str) -> Path:
    return folder / f"{split}.progress.jsonl"


def safe_join(base: Path, rel: str, source: Path) -> Path:
    """``base / rel`` for a relative POSIX path that stays inside ``base``; else StegoError."""
    pure = PurePosixPath(rel)
    if not rel or pure.is_absolute() or "\\" in rel or any(p in ("..", "") for p in pure.parts):
        raise StegoError(
            f"{source} lists the path {rel!r}, which leaves the crop folder {base}; the file was "
            "edited or corrupted. Delete it and rerun `stego crop`."
        )
    path = base.joinpath(*pure.parts)
    if not path.resolve().is_relative_to(base.resolve()):
        raise StegoError(f"{source} lists {rel!r}, which resolves outside {base}; refusing it.")
    return path


def shifted_label_map(n_classes: int) -> LabelMap:
    """Stored crop labels (class + 1, 0 = ignore) -> class ids; larger values are invalid."""
    table = np.full(256, INVALID, dtype=np.int64)
    table[0] = IGNORE
    table[1 : n_classes + 1] = np.arange(n_classes)
    return LabelMap(table, n_classes)


def _read_manifest(path: Path, split: str) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StegoError(
            f"five-crop manifest {path} is unreadable ({exc}); delete it and rerun `stego crop`."
        ) from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise StegoError(
            f"{path} is not a stego five-crop manifest ({MANIFEST_FORMAT}); rerun `stego crop`."
        )
    if manifest.get("split") != split:
        raise StegoError(f"{path} describes split {manifest.get('split')!r}, not {split!r}.")
    return manifest


def _numbered(folder: Path, suffix: str) -> list[int]:
    pattern = re.compile(rf"(\d+){re.escape(suffix)}")
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := pattern.fullmatch(p.name)))


class FiveCropDataset(SegmentationDataset):
    """Five-crop images (and labels) of one split, from our layout or the original's.

    Attributes:
        groups: ``groups[i]`` = index of the source image crop ``i`` was cut from (the five
            crops of one photo share a group; use it to keep them out of each other's
            neighbour lists).
        folder: the crop folder read.
    """

    def __init__(
        self,
        crop_root: str | Path,
        dataset: str,
        split: str,
        n_classes: int,
        *,
        transform: Transform | None = None,
    ) -> None:
        folder = find_crop_folder(crop_root, dataset)
        if not folder.is_dir():
            raise StegoError(
                f"no five-crop data for {dataset} at {folder}; create it with "
                f"`stego crop --dataset {dataset} --split {split} --data-root ...` "
                "(or pass the folder holding <dataset>_five_crop_0.5/)."
            )
        manifest = manifest_path(folder, split)
        if manifest.is_file():
            samples, groups = self._from_manifest(folder, split, manifest)
            stored = _read_manifest(manifest, split).get("n_classes")
            if any(s.label for s in samples) and stored not in (None, n_classes):
                raise StegoError(
                    f"{manifest} was written for {stored} classes, not {n_classes}; "
                    "recreate the crops with `stego crop` or pass the matching dataset."
                )
        elif journal_path(folder, split).is_file():
            raise StegoError(
                f"five-crop data in {folder} for split {split!r} is unfinished "
                f"({journal_path(folder, split).name} present, no manifest); rerun the same "
                "`stego crop` command to finish it."
            )
        else:
            samples, groups = self._from_original(folder, split)
        label_map = shifted_label_map(n_classes) if any(s.label for s in samples) else None
        super().__init__(
            samples, label_map=label_map, transform=transform, name=f"{dataset} five-crop"
        )
        self.groups = groups
        self.folder = folder

    @staticmethod
    def _from_manifest(folder: Path, split: str, path: Path) -> tuple[list[Sample], list[int]]:
        manifest = _read_manifest(path, split)
        samples: list[Sample] = []
        groups: list[int] = []
        try:
            for record in manifest["images"]:
                for crop in record["crops"]:
                    if crop["index"] != len(samples):
                        raise StegoError(
                            f"{path} lists crop {crop['index']} out of order; rerun `stego crop`."
                        )
                    label = crop.get("label")
                    samples.append(
                        Sample(
                            safe_join(folder, crop["image"], path),
                            None if label is None else safe_join(folder, label, path),
                        )
                    )
                    groups.append(int(record["group"]))
        except (KeyError, TypeError) as exc:
            raise StegoError(
                f"five-crop manifest {path} is malformed ({exc!r}); "
                "delete it and rerun `stego crop`."
            ) from exc
        if not samples:
            raise StegoError(f"five-crop manifest {path} lists no crops; rerun `stego crop`.")
        return samples, groups

    @staticmethod
    def _from_original(folder: Path, split: str) -> tuple[list[Sample], list[int]]:
        img_dir = folder / "img" / split
        label_dir = folder / "label" / split
        if not img_dir.is_dir():
            raise StegoError(
                f"expected five-crop images at {img_dir} (split {split!r}); "
                "run `stego crop` for it."
            )
        found = {".jpg": _numbered(img_dir, ".jpg"), ".png": _numbered(img_dir, ".png")}
        suffix = ".jpg" if found[".jpg"] else ".png"
        numbers = found[suffix]
        if not numbers:
            raise StegoError(f"split {split!r} is empty: no <i>.jpg or <i>.png crops in {img_dir}.")
        if numbers != list(range(len(numbers))):
            missing = sorted(set(range(numbers[-1] + 1)) - set(numbers))[:5]
            raise StegoError(
                f"crops in {img_dir} are not numbered 0..N-1 (missing {missing}); re-create them."
            )
        labelled = label_dir.is_dir() and bool(_numbered(label_dir, ".png"))
        if labelled and _numbered(label_dir, ".png") != numbers:
            raise StegoError(
                f"{label_dir} does not hold one <i>.png label per crop in {img_dir}; "
                "re-create the crops."
            )
        samples = [
            Sample(img_dir / f"{i}{suffix}", label_dir / f"{i}.png" if labelled else None)
            for i in numbers
        ]
        return samples, [i // 5 for i in numbers]
