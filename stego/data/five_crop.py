"""Cut every image of a split into five half-size crops, once, resumably.

For an image of size H x W the crops are ``h = int(H * 0.5)`` by ``w = int(W * 0.5)``, in the
order top-left, top-right, bottom-left, bottom-right, centre (torchvision's ``five_crop``
order, centre offset ``round((H - h) / 2)``), cut from the full-resolution image and its mapped
label alike. Crop ``i`` of source image ``n`` is file ``n * 5 + i``; see
:mod:`stego.data.cropped` for the layout and the reader.

Crash safety: every crop goes through :func:`stego.atomic.atomic_write`, so a file with its
final name is always complete. After the five crops (and labels) of one image exist, one JSON
line recording them is appended to ``<split>.progress.jsonl`` and fsynced. A rerun trusts a
journal line only if it parses, matches the same source file and format, and every file it
names exists; anything else is redone. Stray ``*.tmp-*`` files from a killed run are deleted.
When all images are done the manifest is written atomically and the journal removed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from stego.atomic import atomic_write, file_lock
from stego.data.cropped import (
    CROP_RATIO,
    MANIFEST_FORMAT,
    crop_folder,
    journal_path,
    manifest_path,
    safe_join,
)
from stego.data.label_maps import IGNORE
from stego.errors import StegoError
from stego.parallel import thread_map

__all__ = ["CropBox", "FiveCropResult", "five_crop_boxes", "write_five_crops"]


class CropBox(NamedTuple):
    top: int
    left: int
    height: int
    width: int


class FiveCropResult(NamedTuple):
    folder: Path  # <out>/<dataset>_five_crop_0.5
    n_images: int  # source images in the split
    n_crops: int  # = 5 * n_images
    n_written: int  # source images cut in this run (the rest were already done)


def five_crop_boxes(height: int, width: int, ratio: float = CROP_RATIO) -> list[CropBox]:
    """The five boxes of an H x W image: TL, TR, BL, BR, centre; int(H*ratio) x int(W*ratio)."""
    h, w = int(height * ratio), int(width * ratio)
    if h < 1 or w < 1:
        raise StegoError(f"an image of {height}x{width} is too small to five-crop.")
    top_c, left_c = int(round((height - h) / 2.0)), int(round((width - w) / 2.0))
    return [
        CropBox(0, 0, h, w),
        CropBox(0, width - w, h, w),
        CropBox(height - h, 0, h, w),
        CropBox(height - h, width - w, h, w),
        CropBox(top_c, left_c, h, w),
    ]


def _as_uint8(image: Image.Image | Tensor) -> np.ndarray:
    """(H, W, 3) uint8 from a PIL RGB image or a (3, H, W) float [0, 1] tensor."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = image.detach().cpu().float().mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return arr.permute(1, 2, 0).numpy()


def _save(path: Path, array: np.ndarray, fmt: str) -> None:
    buffer = io.BytesIO()
    if fmt == "jpg":
        Image.fromarray(array).save(buffer, format="JPEG")
    else:
        # the same pixels as zlib's default level 6, ~3x faster to write and ~8 % larger:
        # writing crops was most of `stego segment`'s first stage (docs/benchmarks.md)
        Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())


def _remove_stray_temps(*folders: Path) -> int:
    removed = 0
    for folder in folders:
        if folder.is_dir():
            for path in folder.glob(".*.tmp-*"):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
    return removed


def _load_journal(
    folder: Path, split: str, sources: list[str], fmt: str
) -> dict[int, dict[str, Any]]:
    """Trusted per-image records of an interrupted run, by group (source index)."""
    path = journal_path(folder, split)
    done: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return done
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            group = int(record["group"])
            ok = (
                0 <= group < len(sources)
                and record["source"] == sources[group]
                and record["format"] == fmt
                and len(record["crops"]) == 5
            )
            files = [
                safe_join(folder, c[k], path)
                for c in record["crops"]
                for k in ("image", "label")
                if c.get(k)
            ]
        except (ValueError, KeyError, TypeError, StegoError):
            continue  # a torn last line, or a path leaving the folder: redo that image
        if ok and all(f.is_file() for f in files):
            done[group] = record
    return done


def _rewrite_journal(path: Path, records: dict[int, dict[str, Any]]) -> None:
    with atomic_write(path, "w") as handle:
        for group in sorted(records):
            handle.write(json.dumps(records[group]) + "\n")


def write_five_crops(
    dataset_name: str,
    root: str | Path,
    split: str,
    out_dir: str | Path | None = None,
    *,
    fmt: Literal["png", "jpg"] = "png",
    progress: bool = True,
    **dataset_kwargs: Any,
) -> FiveCropResult:
    """Write the five crops of every image (and label) of ``split`` under ``out_dir``.

    Args:
        dataset_name: a name from :data:`stego.data.DATASETS`.
        root: the dataset's data root (as for :func:`stego.data.build_dataset`).
        split: split to crop.
        out_dir: crop root; default ``<root>/cropped``. Files go to
            ``<out_dir>/<dataset_name>_five_crop_0.5/``.
        fmt: image format: lossless ``"png"`` (default) or ``"jpg"`` (Pillow's default quality,
            as the original). Labels are always PNG.
        progress: show a tqdm progress bar.
        **dataset_kwargs: passed to :func:`build_dataset` (e.g. ``label_dir``, ``n_classes``).

    Rerunning after an interruption continues where it stopped; rerunning a finished split does
    nothing. Returns a :class:`FiveCropResult`.
    """
    from stego.data.registry import build_dataset

    if fmt not in ("png", "jpg"):
        raise StegoError(f"unknown crop format {fmt!r}; choose png or jpg.")
    dataset = build_dataset(dataset_name, root, split, **dataset_kwargs)
    n_classes = getattr(dataset.label_map, "n_classes", 0)
    if n_classes > 254:
        raise StegoError(
            f"{dataset_name} has {n_classes} classes; crop labels (uint8, id + 1) hold at most 254."
        )
    if out_dir is None and dataset_name == "folder":
        raise StegoError(
            f"pass an output folder for the crops of {root}: the default, inside the image "
            "folder, would mix crops into the images (--out DIR)."
        )
    folder = crop_folder(Path(root) / "cropped" if out_dir is None else out_dir, dataset_name)
    img_dir, label_dir = folder / "img" / split, folder / "label" / split
    sources = [str(s.image) for s in dataset.samples]
    manifest = manifest_path(folder, split)
    with file_lock(folder / f".{split}.lock"):
        if manifest.is_file():
            try:
                existing = json.loads(manifest.read_text())
            except ValueError:
                existing = {}
            if existing.get("format") == MANIFEST_FORMAT and existing.get(
                "sources_digest"
            ) == _digest(sources):
                if existing.get("image_format") != fmt:
                    raise StegoError(
                        f"{folder} already holds split {split!r} as "
                        f"{existing.get('image_format')}; "
                        f"delete {manifest} to recreate it as {fmt}."
                    )
                return FiveCropResult(folder, len(sources), 5 * len(sources), 0)
            manifest.unlink()  # a different source list: start over (old crops get overwritten)
        _remove_stray_temps(folder, img_dir, label_dir)
        journal = journal_path(folder, split)
        done = _load_journal(folder, split, sources, fmt)
        _rewrite_journal(journal, done)  # drop torn or untrusted lines before appending
        written = 0
        bar = tqdm(
            total=len(sources),
            initial=len(done),
            disable=not progress,
            unit="img",
            desc=f"five-crop {dataset_name}/{split}",
        )
        with bar, open(journal, "a") as log:
            todo = [g for g in range(len(sources)) if g not in done]
            # threads: Pillow releases the GIL while it decodes and encodes, the bulk of the work
            workers = min(8, os.cpu_count() or 1)
            records = thread_map(lambda g: _crop_one(dataset, g, folder, split, fmt), todo, workers)
            for group, record in zip(todo, records, strict=True):
                done[group] = record
                log.write(json.dumps(done[group]) + "\n")
                log.flush()
                os.fsync(log.fileno())
                written += 1
                bar.update(1)
        record = {
            "format": MANIFEST_FORMAT,
            "dataset": dataset_name,
            "split": split,
            "crop_ratio": CROP_RATIO,
            "image_format": fmt,
            "label_encoding": "uint8 PNG, class id + 1, 0 = ignore",
            "n_classes": n_classes,
            "n_images": len(sources),
            "n_crops": 5 * len(sources),
            "sources_digest": _digest(sources),
            "images": [done[g] for g in range(len(sources))],
        }
        with atomic_write(manifest, "w") as handle:
            json.dump(record, handle)
        journal.unlink()
    return FiveCropResult(folder, len(sources), 5 * len(sources), written)


def _digest(sources: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(sources).encode()).hexdigest()[:16]


def _crop_one(dataset: Any, group: int, folder: Path, split: str, fmt: str) -> dict[str, Any]:
    """Cut and write the five crops of source image ``group``; return its journal record."""
    image, label = dataset.load(group)
    pixels = _as_uint8(image)  # (H, W, 3)
    height, width = pixels.shape[:2]
    stored = None
    if label is not None:
        stored = (np.where(label == IGNORE, -1, label) + 1).astype(np.uint8)  # (H, W) class + 1
    crops = []
    for k, box in enumerate(five_crop_boxes(height, width)):
        index = group * 5 + k
        rows, cols = slice(box.top, box.top + box.height), slice(box.left, box.left + box.width)
        image_rel = f"img/{split}/{index}.{fmt}"
        _save(folder / image_rel, np.ascontiguousarray(pixels[rows, cols]), fmt)
        entry: dict[str, Any] = {
            "index": index,
            "box": list(box),
            "image": image_rel,
            "label": None,
        }
        if stored is not None:
            entry["label"] = f"label/{split}/{index}.png"
            _save(folder / entry["label"], np.ascontiguousarray(stored[rows, cols]), "png")
        crops.append(entry)
    sample = dataset.samples[group]
    return {
        "group": group,
        "source": str(sample.image),
        "label_source": None if sample.label is None else str(sample.label),
        "size": [height, width],
        "format": fmt,
        "crops": crops,
    }
