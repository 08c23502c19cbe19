"""Label Studio pre-annotations: one task per image, one brush region per class.

``OUT`` is a JSON list of tasks to import into a Label Studio project (``Import``, or the API's
``/api/projects/ID/import``)::

    {"data": {"image": URL}, "predictions": [{"model_version": "stego", "result": [
        {"type": "brushlabels", "from_name": "label", "to_name": "image",
         "original_width": W, "original_height": H, "image_rotation": 0,
         "value": {"format": "rle", "rle": [...], "brushlabels": ["road"]}}, ...]}]}

``OUT-config.xml`` beside it is the labelling config those names refer to (an ``Image`` named
``image`` and ``BrushLabels`` named ``label`` with one ``Label`` per class, in its colour).

The ``rle`` list is Label Studio's brush encoding: the RGBA pixels of the mask (each pixel's
value four times) packed by the run-length scheme of the ``@thi.ng/rle-pack`` package that Label
Studio's brush tool decodes. Bits, most significant first: a 32-bit value count, the word size
minus 1 (5 bits: 7, bytes), the four run-length field widths minus 1 (4 bits each: 3, 4, 8, 16
bits); then chunks of ``1`` (a repeated run), a 2-bit field-width choice, the run length minus 1
in that many bits and the 8-bit value; zero bits pad the last byte. The tests decode it with the
reader of Label Studio's own converter package (``label_studio_converter.brush.decode_rle``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

import numpy as np

from stego.atomic import atomic_write
from stego.export.common import each_image, hex_colour
from stego.results import Results

__all__ = ["write", "brush_rle", "config_path", "labelling_config"]

RUN_BITS = np.array([3, 4, 8, 16])  # the widths a run length can be stored in
HEADER = [(32, None), (5, 7), (4, 2), (4, 3), (4, 7), (4, 15)]  # (bits, value); None: count
FROM_NAME, TO_NAME = "label", "image"


def _bits(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Each value written in its width of bits, most significant first, one after another."""
    total = int(widths.sum())
    starts = np.repeat(np.cumsum(widths) - widths, widths)  # where each bit's field starts
    shift = np.repeat(widths, widths) - 1 - (np.arange(total) - starts)
    return ((np.repeat(values, widths) >> shift) & 1).astype(np.uint8)


def brush_rle(mask: np.ndarray) -> list[int]:
    """Label Studio's brush RLE (a list of byte values) of an (H, W) bool mask."""
    flat = np.asarray(mask, dtype=bool).ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate([[0], change])
    lengths = 4 * np.diff(np.concatenate([starts, [flat.size]]))  # 4 channels per pixel
    values = np.where(flat[starts], 255, 0)
    # runs longer than the widest field are stored as several chunks
    longest = 1 << int(RUN_BITS[-1])
    pieces = -(-lengths // longest)
    run = np.repeat(np.arange(len(lengths)), pieces)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    counts = np.minimum(lengths[run] - (np.arange(len(run)) - first) * longest, longest)
    choice = np.searchsorted((1 << RUN_BITS) - 1, counts - 1)  # narrowest field that fits
    fields = np.stack([np.ones_like(counts), choice, counts - 1, values[run]], 1)
    widths = np.stack([np.ones_like(counts), np.full_like(counts, 2), RUN_BITS[choice],
                       np.full_like(counts, 8)], 1)  # fmt: skip
    head_values = [4 * flat.size if v is None else v for _, v in HEADER]
    all_values = np.concatenate([head_values, fields.ravel()]).astype(np.int64)
    all_widths = np.concatenate([[b for b, _ in HEADER], widths.ravel()]).astype(np.int64)
    return np.packbits(_bits(all_values, all_widths)).tolist()


def config_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}-config.xml")


def labelling_config(names: list[str], colours: list[list[int]]) -> str:
    labels = "\n".join(
        f"    <Label value={quoteattr(n)} background={quoteattr(hex_colour(c))}/>"
        for n, c in zip(names, colours, strict=True)
    )
    return (f'<View>\n  <Image name="{TO_NAME}" value="$image" zoom="true"/>\n'
            f'  <BrushLabels name="{FROM_NAME}" toName="{TO_NAME}">\n{labels}\n'
            "  </BrushLabels>\n</View>\n")  # fmt: skip


def _image_url(results: Results, index: int, prefix: str | None) -> str:
    if prefix is not None:
        return prefix + quote(results.image_name(index))
    source = results.source(index)
    path = (
        source.resolve() if source is not None else results.root / "overlays" / results.rels[index]
    )
    return "/data/local-files/?d=" + quote(str(path).lstrip("/"))


def write(results: Results, out: Path, *, image_url: str | None = None, progress: bool = True,
          **_: Any) -> list[Path]:  # fmt: skip
    names = results.classes.names
    tasks = []
    for index, ids in each_image(results, progress, "Label Studio tasks"):
        height, width = ids.shape
        regions = [
            {"id": f"{index}-{k}", "type": "brushlabels", "from_name": FROM_NAME,
             "to_name": TO_NAME, "original_width": width, "original_height": height,
             "image_rotation": 0, "origin": "prediction",
             "value": {"format": "rle", "rle": brush_rle(ids == k), "brushlabels": [names[k]]}}
            for k in np.unique(ids).tolist()
        ]  # fmt: skip
        tasks.append({"data": {"image": _image_url(results, index, image_url)},
                      "predictions": [{"model_version": "stego", "result": regions}]})  # fmt: skip
    with atomic_write(out, "w") as handle:
        json.dump(tasks, handle)
    config = config_path(out)
    with atomic_write(config, "w") as handle:
        handle.write(labelling_config(names, results.classes.colors))
    return [out, config]
