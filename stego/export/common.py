"""What every export format needs: the class ids of each image, file names, CSV text."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator

import numpy as np

from stego.results import Results

__all__ = ["each_image", "slug", "csv_text", "hex_colour"]


def each_image(results: Results, progress: bool, what: str) -> Iterator[tuple[int, np.ndarray]]:
    """(index, (H, W) int64 class ids) of every image, in order, with a progress bar."""
    from tqdm import tqdm

    for index in tqdm(range(len(results.rels)), desc=what, disable=not progress, leave=False):
        yield index, results.class_ids(index)


def slug(name: str) -> str:
    """A class name as a file-name part: letters, digits, ``.-_``; the rest becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("._") or "class"


def hex_colour(rgb: list[int]) -> str:
    """``[255, 64, 0]`` -> ``"#ff4000"``."""
    return "#" + "".join(f"{int(v):02x}" for v in rgb)


def csv_text(rows: list[list[object]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()
