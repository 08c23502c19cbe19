"""One binary PNG per class per image: ``OUT/<image path without suffix>/<id>_<name>.png``
(8-bit, 255 where the class is, 0 elsewhere), for the classes the image holds (a missing file:
the class is absent), and ``OUT/classes.csv`` (id, name, colour).

The folder is built beside ``OUT`` and swapped in only when complete, so an interrupted export
leaves the previous one (or nothing), never a half-written folder.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stego.errors import StegoError
from stego.export.common import csv_text, each_image, slug
from stego.results import Results

__all__ = ["write", "mask_name"]

INDEX = "classes.csv"


def mask_name(class_id: int, name: str) -> str:
    return f"{class_id:02d}_{slug(name)}.png"


@contextlib.contextmanager
def folder_swap(out: Path) -> Iterator[Path]:
    """A new empty folder that replaces ``out`` when the block ends without error."""
    if out.exists() and any(out.iterdir()) and not (out / INDEX).is_file():
        raise StegoError(
            f"{out} exists and is not a masks export (no {INDEX}): pass a new --out folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield new
        old = out.with_name(f".{out.name}.old-{new.name.rsplit('-', 1)[-1]}")
        if out.exists():
            out.rename(old)
        new.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(new, ignore_errors=True)


def write(results: Results, out: Path, *, progress: bool = True, **_: Any) -> list[Path]:
    names, colours = results.classes.names, results.classes.colors
    with folder_swap(out) as folder:
        for index, ids in each_image(results, progress, "masks"):
            target = folder / Path(results.image_name(index)).with_suffix("")
            target.mkdir(parents=True, exist_ok=True)
            for k in np.unique(ids).tolist():
                buffer = io.BytesIO()
                Image.fromarray(((ids == k) * 255).astype(np.uint8)).save(buffer, format="PNG")
                (target / mask_name(k, names[k])).write_bytes(buffer.getvalue())
        rows: list[list[Any]] = [["id", "name", "file", "red", "green", "blue"]]
        rows += [[k, n, mask_name(k, n), *colours[k]] for k, n in enumerate(names)]
        (folder / INDEX).write_text(csv_text(rows))
    return [out]
