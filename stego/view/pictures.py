"""The pictures the page shows, each made once and kept in the cache folder.

- thumbnails of the images (JPEG) and of their cluster ids (8-bit PNG, the same size, nearest
  resampled): the page colours the ids itself, so a rename recolours without new pictures;
- the full-size image (JPEG) for the large view (its cluster ids are the label map itself);
- crops of where a cluster is, for the cluster rows.

A cached file is remade when a file it was made from is newer.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from stego.atomic import atomic_write
from stego.results import ClusterCounts, Results

__all__ = ["THUMB_SIDE", "thumbnail", "id_thumbnail", "large_image", "crop", "crop_images"]

THUMB_SIDE = 256  # longest side of a grid thumbnail, in pixels
CROP_HEIGHT = 96
CROPS_PER_CLUSTER = 6
DIM_OUTSIDE = 0.3  # brightness of the pixels around a cluster in its crops


def _cached(path: Path, made_from: list[Path | None], make: Callable[[], Image.Image],
            fmt: str) -> Path:  # fmt: skip
    newest = max(
        (p.stat().st_mtime_ns for p in made_from if p is not None and p.is_file()), default=0
    )
    if path.is_file() and path.stat().st_mtime_ns >= newest:
        return path
    buffer = io.BytesIO()
    make().save(buffer, format=fmt, **({"quality": 88} if fmt == "JPEG" else {}))
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())
    return path


def _thumb_size(height: int, width: int) -> tuple[int, int]:
    scale = min(1.0, THUMB_SIDE / max(height, width))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _made_from(results: Results, index: int) -> list[Path | None]:
    return [results.source(index), results.cluster_path(index)]


def thumbnail(results: Results, index: int, cache: Path) -> Path:
    """JPEG thumbnail of image ``index``, at the size of :func:`id_thumbnail`."""

    def make() -> Image.Image:
        rgb = results.image_rgb(index)
        return Image.fromarray(rgb).resize(_thumb_size(*rgb.shape[:2]), Image.Resampling.BILINEAR)

    return _cached(cache / "thumbs" / f"{index}.jpg", _made_from(results, index), make, "JPEG")


def id_thumbnail(results: Results, index: int, cache: Path) -> Path:
    """8-bit PNG of image ``index``'s cluster ids at thumbnail size (nearest: ids stay ids)."""

    def make() -> Image.Image:
        ids = results.cluster_ids(index).astype(np.uint8)
        return Image.fromarray(ids).resize(_thumb_size(*ids.shape), Image.Resampling.NEAREST)

    return _cached(cache / "ids" / f"{index}.png", _made_from(results, index), make, "PNG")


def large_image(results: Results, index: int, cache: Path) -> Path:
    """The image itself as a JPEG any browser shows (sources may be TIFF, 16-bit, CMYK...)."""
    return _cached(cache / "large" / f"{index}.jpg", _made_from(results, index),
                   lambda: Image.fromarray(results.image_rgb(index)), "JPEG")  # fmt: skip


def crop_images(counts: ClusterCounts, cluster: int) -> list[int]:
    """The images holding the most pixels of ``cluster`` (at most ``CROPS_PER_CLUSTER``)."""
    column = counts.pixels[:, cluster]
    order = np.argsort(-column, kind="stable")[:CROPS_PER_CLUSTER]
    return [int(i) for i in order if column[i] > 0]


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) around the largest connected part of ``mask``, padded."""
    from scipy import ndimage

    parts, count = ndimage.label(mask)
    if count > 1:
        sizes = np.bincount(parts.ravel())[1:]
        mask = parts == 1 + int(np.argmax(sizes))
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    pad = max(4, (bottom - top) // 4, (right - left) // 4)
    height, width = mask.shape
    return max(0, top - pad), max(0, left - pad), min(height, bottom + pad), min(width, right + pad)


def crop(results: Results, cluster: int, index: int, cache: Path) -> Path:
    """JPEG of where ``cluster`` is in image ``index``: its largest part, the rest dimmed."""

    def make() -> Image.Image:
        mask = results.cluster_ids(index) == cluster
        rgb = results.image_rgb(index).astype(np.float32)
        rgb[~mask] *= DIM_OUTSIDE
        top, left, bottom, right = _box(mask)
        part = Image.fromarray(rgb[top:bottom, left:right].astype(np.uint8))
        width = max(1, min(2 * CROP_HEIGHT, round(part.width * CROP_HEIGHT / part.height)))
        return part.resize((width, CROP_HEIGHT), Image.Resampling.BILINEAR)

    path = cache / "crops" / str(cluster) / f"{index}.jpg"
    return _cached(path, _made_from(results, index), make, "JPEG")
