"""How much of each image each class covers: ``OUT`` (one row per image, one column per class)
and ``OUT-summary.csv`` beside it (one row per class). Shares are fractions of the image's
pixels (0 to 1); both tables come from the pixel counts ``stego view`` shows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stego.atomic import atomic_write
from stego.export.common import csv_text, hex_colour
from stego.results import Results, cluster_counts

__all__ = ["write", "summary_path"]


def summary_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}-summary{out.suffix or '.csv'}")


def write(results: Results, out: Path, *, progress: bool = True, **_: Any) -> list[Path]:
    counts = cluster_counts(results, progress=progress)
    pixels = results.class_pixels(counts)  # (N, C)
    area = counts.sizes.prod(1)  # (N,)
    shares = pixels / np.maximum(area, 1)[:, None]
    names = results.classes.names
    rows: list[list[Any]] = [["image", "width", "height", *names]]
    for i in range(len(results.rels)):
        rows.append([results.image_name(i), int(counts.sizes[i, 1]), int(counts.sizes[i, 0]),
                     *(f"{s:.6f}" for s in shares[i])])  # fmt: skip
    summary: list[list[Any]] = [["class", "color", "pixel_share", "images", "mean_image_share"]]
    total = max(int(area.sum()), 1)
    for k, name in enumerate(names):
        colour = hex_colour(results.classes.colors[k])
        summary.append([name, colour, f"{pixels[:, k].sum() / total:.6f}",
                        int((pixels[:, k] > 0).sum()), f"{shares[:, k].mean():.6f}"])  # fmt: skip
    second = summary_path(out)
    for path, table in ((out, rows), (second, summary)):
        with atomic_write(path, "w") as handle:
            handle.write(csv_text(table))
    return [out, second]
