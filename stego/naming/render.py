"""Re-render a ``stego segment`` RESULTS folder with class ids, then swap it in.

Everything new is written into ``RESULTS/.naming-new/`` first; only when all of it is there are
the folders swapped in by renames (``labels/`` -> the class ids, the cluster ids kept in
``clusters/``), so a naming that fails on the way (a bad label, a missing image) leaves RESULTS
as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stego.atomic import atomic_write
from stego.errors import StegoError
from stego.models.class_map import ClassMap, write_class_map
from stego.parallel import thread_map

__all__ = ["ResultsLayout", "named_summary", "render_results"]

STAGE = ".naming-new"
TRASH = ".naming-old"
SHEET_IMAGES = 24  # thumbnails on the contact sheet, as `stego segment` draws it


@dataclass
class ResultsLayout:
    """Where a RESULTS folder keeps what naming reads."""

    root: Path
    clusters_dir: Path  # cluster id PNGs: clusters/ once named, labels/ before
    model_dir: Path
    rels: list[Path]  # relative paths of the cluster PNGs (as of the images, ".png")
    sources: dict[Path, Path]  # rel -> the segmented image file
    n_clusters: int
    summary: dict[str, Any]


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as handle:
        # zlib level 1, as prediction writes them: 3x faster to encode for a few % more bytes
        Image.fromarray(array).save(handle, format="PNG", compress_level=1)


def _render_one(
    layout: ResultsLayout, rel: Path, class_map: ClassMap, stage: Path, colours: np.ndarray
) -> np.ndarray:
    """Write stage/labels/<rel> (class ids) and stage/overlays/<rel> (with a legend of the classes
    in the image); returns the image's pixel count per class (C,)."""
    from stego.infer.predict import read_image_rgb
    from stego.viz import overlay, with_legend

    with Image.open(layout.clusters_dir / rel) as im:
        clusters = np.asarray(im)  # (H, W) cluster ids
    classes = np.asarray(class_map.mapping, dtype=np.uint8)[clusters]  # (H, W) class ids
    source = layout.sources.get(rel)
    if source is None or not source.is_file():
        raise StegoError(
            f"the image of {layout.clusters_dir / rel} is not in {layout.summary.get('input')} "
            "any more (needed for the overlays): put the folder back where it was segmented"
        )
    image = read_image_rgb(source)
    if image.shape[:2] != classes.shape:
        raise StegoError(
            f"{source} is not the size of its segmentation {layout.clusters_dir / rel}"
        )
    count = np.bincount(classes.ravel(), minlength=class_map.n_classes)
    present = np.flatnonzero(count)
    entries = [(class_map.names[k], class_map.colors[k]) for k in present]
    _write_png(stage / "labels" / rel, classes)
    _write_png(stage / "overlays" / rel, with_legend(overlay(image, classes, colours), entries))
    return count


def named_summary(
    summary: dict[str, Any], class_map: ClassMap, counts: np.ndarray, root: Path, model_dir: Path
) -> dict[str, Any]:
    """``summary`` (of a ``stego segment`` output in ``root``) with the classes: their names,
    pixel shares (``counts``: (C,) pixels per class), how they were fit, where the outputs are."""
    total = max(int(counts.sum()), 1)
    summary = dict(summary)
    summary["classes"] = list(class_map.names)
    summary["class_pixel_fraction"] = {
        name: round(float(c) / total, 4) for name, c in zip(class_map.names, counts, strict=True)
    }
    summary["naming"] = dict(class_map.fit)
    outputs = dict(summary.get("outputs") or {})
    outputs["labels"] = str(root / "labels")
    outputs["clusters"] = str(root / "clusters")
    outputs["classes"] = str(model_dir / "classes.json")
    summary["outputs"] = outputs
    return summary


def render_results(layout: ResultsLayout, class_map: ClassMap, *, progress: bool = True) -> None:
    """Rewrite RESULTS for ``class_map``: ``labels/`` class ids, ``clusters/`` cluster ids,
    overlays with a legend of names, the contact sheet, ``summary.json`` (classes and their
    pixel shares) and ``model/classes.json``; built aside, then swapped in."""
    root = layout.root
    stage = root / STAGE
    shutil.rmtree(stage, ignore_errors=True)  # left by a naming that was killed
    try:
        _render_all(layout, class_map, stage, progress)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)  # RESULTS stays as it was
        raise
    _swap(root, stage, layout.clusters_dir)
    write_class_map(layout.model_dir, class_map)


def _render_all(layout: ResultsLayout, class_map: ClassMap, stage: Path, progress: bool) -> None:
    """Write every output of naming into ``stage``, the images by one thread a core."""
    from stego.viz import contact_sheet

    colours = np.asarray(class_map.colors, dtype=np.uint8).reshape(-1, 3)
    counts = np.zeros(class_map.n_classes, dtype=np.int64)
    # threads: PNG decoding and encoding (zlib) and numpy release the GIL, so every core works
    rendered = thread_map(
        lambda rel: _render_one(layout, rel, class_map, stage, colours),
        layout.rels,
        os.cpu_count() or 1,
    )
    for i, shown in enumerate(rendered):  # a failed image's error is raised here
        counts += shown
        if progress:
            print(f"\rname: {i + 1}/{len(layout.rels)} images", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    legend = [
        (n, c) for n, c, k in zip(class_map.names, class_map.colors, counts, strict=True) if k
    ]
    sheet = contact_sheet(
        sorted((stage / "overlays").rglob("*.png"))[:SHEET_IMAGES], entries=legend
    )
    if sheet is not None:
        _write_png(stage / "contact_sheet.png", sheet)
    with atomic_write(stage / "summary.json", "w") as handle:
        summary = named_summary(layout.summary, class_map, counts, layout.root, layout.model_dir)
        json.dump(summary, handle, indent=2)


def _swap(root: Path, stage: Path, clusters_dir: Path) -> None:
    """Move the staged outputs into ``root``: the unnamed ``labels/`` becomes ``clusters/``
    (kept as the source of any later renaming), older outputs go to a trash folder that is
    deleted last."""
    trash = root / TRASH
    shutil.rmtree(trash, ignore_errors=True)
    trash.mkdir()
    if clusters_dir == root / "labels":
        os.replace(root / "labels", root / "clusters")
    for name in ("labels", "overlays", "contact_sheet.png", "summary.json"):
        if (root / name).exists():
            os.replace(root / name, trash / name)
        if (stage / name).exists():
            os.replace(stage / name, root / name)
    shutil.rmtree(trash)
    shutil.rmtree(stage)


def relative_pngs(folder: Path) -> Sequence[Path]:
    """The PNG files under ``folder``, relative to it, sorted."""
    return sorted(p.relative_to(folder) for p in folder.rglob("*.png"))
