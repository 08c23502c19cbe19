"""COCO-style semantic annotations: one RLE mask per class per image, as COCO-Stuff's.

``images`` (id from 1, ``file_name`` relative to the segmented folder, size), ``categories``
(id = class id + 1, the class names and colours) and ``annotations`` (compressed RLE of
pycocotools, ``iscrowd`` 0, area, bbox). ``pycocotools.coco.COCO(path).annToMask(ann)`` gives
back each class's pixels exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from stego.atomic import atomic_write
from stego.errors import StegoError
from stego.export.common import each_image
from stego.results import Results

__all__ = ["write", "coco_dict"]


def _rle_module() -> Any:
    try:
        from pycocotools import mask
    except ImportError:
        raise StegoError(
            "the COCO export needs pycocotools: pip install 'stego-seg[export]'"
        ) from None
    return mask


def coco_dict(results: Results, progress: bool = False) -> dict[str, Any]:
    rle = _rle_module()
    classes = results.classes
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index, ids in each_image(results, progress, "COCO annotations"):
        height, width = ids.shape
        images.append({"id": index + 1, "file_name": results.image_name(index),
                       "width": width, "height": height})  # fmt: skip
        for k in np.unique(ids).tolist():
            encoded = rle.encode(np.asfortranarray(ids == k, dtype=np.uint8))
            annotations.append({
                "id": len(annotations) + 1, "image_id": index + 1, "category_id": k + 1,
                "segmentation": {"size": [height, width], "counts": encoded["counts"].decode()},
                "area": int(rle.area(encoded)), "iscrowd": 0,
                "bbox": [float(v) for v in rle.toBbox(encoded)],
            })  # fmt: skip
    categories = [{"id": k + 1, "name": name, "supercategory": "stego", "color": colour}
                  for k, (name, colour) in enumerate(zip(classes.names, classes.colors,
                                                         strict=True))]  # fmt: skip
    info = {"description": f"stego segment result {results.root}",
            "class_map": classes.fit.get("method", "none")}  # fmt: skip
    return {"info": info, "images": images, "annotations": annotations, "categories": categories}


def write(results: Results, out: Path, *, progress: bool = True, **_: Any) -> list[Path]:
    data = coco_dict(results, progress)
    with atomic_write(out, "w") as handle:
        json.dump(data, handle)
    return [out]
