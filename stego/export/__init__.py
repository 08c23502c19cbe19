"""``stego export``: a segment result (named or not) in the formats other tools read.

Every format reads the result through :mod:`stego.results` (class ids = the class map applied
to the cluster ids, the rule of ``stego name`` and ``stego view``) and writes atomically: a
file appears whole or not at all, a folder of masks is built aside and then swapped in.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from stego.errors import StegoError

__all__ = ["FORMATS", "export_results"]

# format -> (what it writes, module with write(results, out, **options) -> list[Path])
FORMATS: dict[str, tuple[str, str]] = {
    "coco": ("COCO-style semantic annotations, one RLE per class per image (a .json file, "
             "read back by pycocotools)", "stego.export.coco"),
    "masks": ("one binary PNG per class per image (a folder) and classes.csv",
              "stego.export.masks"),
    "areas": ("a CSV of each image's pixel share per class, and a per-class summary CSV beside it",
              "stego.export.areas"),
    "label-studio": ("Label Studio tasks with brush pre-annotations (a .json file) and the "
                     "labelling config beside it", "stego.export.label_studio"),
}  # fmt: skip


def export_results(results: str | Path, fmt: str, out: str | Path, *,
                   image_url: str | None = None, progress: bool = True) -> list[Path]:  # fmt: skip
    """Write ``results`` (a RESULTS folder) as ``fmt`` to ``out``; returns the files written."""
    from stego.results import open_results

    if fmt not in FORMATS:
        raise StegoError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    opened = open_results(results)
    out = Path(out).expanduser()
    if out.resolve() == opened.root.resolve() or opened.root.resolve() in out.resolve().parents:
        raise StegoError(f"--out {out} is inside the results {opened.root}: write it elsewhere")
    module = importlib.import_module(FORMATS[fmt][1])
    return module.write(opened, out, image_url=image_url, progress=progress)
