"""Raw label values on disk -> training class ids, as exact lookup tables.

Every dataset stores labels as small non-negative integers (PNG pixel values, ``.mat`` arrays).
A :class:`LabelMap` turns them into class ids ``0..n_classes-1`` or :data:`IGNORE` with one
table lookup, and refuses values the dataset never writes (a sign of a wrong file), naming the
file and the values. Tables are built once from the published definitions:

- COCO-Stuff fine ids 0..181 -> 27 coarse classes (STEGO / IIC table); 255 -> ignore; ids
  182..254, which stuffthingmaps never contain, are treated as unlabelled too (ignore).
- COCO-Stuff "stuff only" (15): coarse stuff classes 12..26 -> 0..14, things -> ignore.
- COCO-Stuff 3: coarse sky, plant, ground -> 0, 1, 2, everything else -> ignore.
- Cityscapes labelIds: class = labelId - 7, so labelIds 7..33 -> 0..26; labelIds 0..6 and
  34..255 -> ignore.
- Potsdam: {0, 4} -> 0, {1, 5} -> 1, {2, 3} -> 2, 255 -> ignore; other values are errors.
- CamVid-11: 0..10 kept, 255 -> ignore; other values are errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stego.errors import StegoError

IGNORE = -1
"""Label value of pixels that count for no class (unlabelled, void, excluded classes)."""

INVALID = -2
"""Table entry of raw values that must never occur; finding one raises :class:`StegoError`."""

__all__ = [
    "IGNORE",
    "INVALID",
    "LabelMap",
    "COCO_FINE_TO_COARSE27",
    "coco27_map",
    "coco15_map",
    "coco3_map",
    "cityscapes27_map",
    "potsdam3_map",
    "camvid11_map",
    "identity_map",
]

# Coarse class -> fine stuffthingmaps ids (reference section 8). Coarse 0-11 things, 12-26 stuff.
_COARSE_TO_FINE: dict[int, tuple[int, ...]] = {
    0: tuple(range(71, 77)),
    1: tuple(range(77, 83)),
    2: tuple(range(51, 61)),
    3: tuple(range(61, 71)),
    4: tuple(range(83, 91)),
    5: tuple(range(43, 51)),
    6: tuple(range(25, 33)),
    7: tuple(range(15, 25)),
    8: tuple(range(9, 15)),
    9: (0,),
    10: tuple(range(33, 43)),
    11: tuple(range(1, 9)),
    12: (101, 102),
    13: (100, 113, 114, 115, 116, 117),
    14: (120, 121, 152, 169),
    15: (97, 106, 107, 109, 111, 122, 129, 132, 155, 160, 164),
    16: (99, 131, 138, 142),
    17: (91, 92, 103, 104, 108, 130, 136, 140, 151, 166, 167),
    18: tuple(range(170, 177)),
    19: (179, 180),
    20: (94, 95, 127, 150, 157, 165),
    21: (110, 124, 125, 135, 139, 143, 144, 146, 148, 153, 158),
    22: (93, 96, 118, 123, 128, 133, 141, 162, 168),
    23: (105, 156),
    24: (126, 134, 149, 159, 161, 181),
    25: (98, 112, 137, 145, 163),
    26: (119, 147, 154, 177, 178),
}

COCO_FINE_TO_COARSE27: Mapping[int, int] = {
    fine: coarse for coarse, fines in _COARSE_TO_FINE.items() for fine in fines
}
"""Fine COCO-Stuff id (0..181) -> coarse class (0..26); covers all 182 fine ids exactly once."""

COCO_FIRST_STUFF = 12
"""Coarse classes below this are "things", the rest "stuff"."""


@dataclass(frozen=True)
class LabelMap:
    """A lookup table from raw label values to class ids.

    ``table[v]`` is the class id of raw value ``v``, :data:`IGNORE`, or :data:`INVALID`. Raw
    values at or beyond ``len(table)`` (or negative) are invalid.
    """

    table: np.ndarray  # (V,) int64
    n_classes: int

    def __call__(self, raw: np.ndarray, path: str | Path = "<array>") -> np.ndarray:
        """Map ``raw`` (any shape, integer) to int64 class ids; raise on invalid values.

        The :class:`StegoError` names ``path`` and lists the offending raw values.
        """
        raw = np.asarray(raw)
        if raw.dtype.kind not in "iub":
            raise StegoError(
                f"label file {path} holds {raw.dtype} values; expected integer class ids. "
                "Save labels as single-channel integer PNGs (or integer arrays)."
            )
        raw = raw.astype(np.int64, copy=False)
        inside = (raw >= 0) & (raw < len(self.table))
        out = np.full(raw.shape, INVALID, dtype=np.int64)
        out[inside] = self.table[raw[inside]]
        bad = out == INVALID
        if bad.any():
            values = np.unique(raw[bad])
            shown = ", ".join(str(v) for v in values[:10].tolist())
            more = f" (and {len(values) - 10} more)" if len(values) > 10 else ""
            raise StegoError(
                f"label file {path} contains values {shown}{more} that this dataset never uses "
                f"(valid raw values: {self.describe()}). Check that the label folder belongs "
                "to this dataset and holds class ids, not colours."
            )
        return out

    def describe(self) -> str:
        """Valid raw values as compact ranges, e.g. ``0-10, 255``."""
        valid = np.flatnonzero(self.table != INVALID).tolist()
        runs: list[list[int]] = []
        for v in valid:
            if runs and v == runs[-1][1] + 1:
                runs[-1][1] = v
            else:
                runs.append([v, v])
        return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


def _table(size: int = 256, fill: int = INVALID) -> np.ndarray:
    return np.full(size, fill, dtype=np.int64)


def coco27_map() -> LabelMap:
    """COCO-Stuff fine ids -> 27 coarse classes; 255 and unused ids -> ignore."""
    table = _table(fill=IGNORE)
    for fine, coarse in COCO_FINE_TO_COARSE27.items():
        table[fine] = coarse
    return LabelMap(table, 27)


def coco15_map() -> LabelMap:
    """COCO-Stuff "stuff only": coarse stuff 12..26 -> 0..14; things and unlabelled -> ignore."""
    table = coco27_map().table.copy()
    table = np.where(table >= COCO_FIRST_STUFF, table - COCO_FIRST_STUFF, IGNORE)
    return LabelMap(table.astype(np.int64), 15)


COCO3_COARSE = (23, 22, 21)
"""Coarse classes kept by COCO-Stuff-3, in order: sky, plant, ground."""


def coco3_map() -> LabelMap:
    """COCO-Stuff-3: coarse sky, plant, ground -> 0, 1, 2; everything else -> ignore."""
    coarse = coco27_map().table
    table = _table(fill=IGNORE)
    for i, c in enumerate(COCO3_COARSE):
        table[coarse == c] = i
    return LabelMap(table, 3)


def cityscapes27_map() -> LabelMap:
    """Cityscapes labelIds -> labelId - 7; results outside 0..26 -> ignore."""
    table = np.arange(256, dtype=np.int64) - 7
    table[(table < 0) | (table > 26)] = IGNORE
    return LabelMap(table, 27)


def potsdam3_map() -> LabelMap:
    """Potsdam 6 classes -> 3: {0,4}->0 roads/cars, {1,5}->1 buildings/clutter, {2,3}->2 plants."""
    table = _table()
    for raw, cls in {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}.items():
        table[raw] = cls
    table[255] = IGNORE
    return LabelMap(table, 3)


def camvid11_map() -> LabelMap:
    """CamVid-11: ids 0..10 kept, 255 (void) -> ignore."""
    return identity_map(11)


def identity_map(n_classes: int, ignore_value: int | None = 255) -> LabelMap:
    """Ids ``0..n_classes-1`` kept, ``ignore_value`` -> ignore, anything else invalid."""
    if not 1 <= n_classes <= 65535:
        raise StegoError(f"n_classes must be between 1 and 65535, got {n_classes}.")
    size = max(256, n_classes, (ignore_value or 0) + 1)
    table = _table(size)
    table[:n_classes] = np.arange(n_classes)
    if ignore_value is not None:
        if ignore_value < n_classes:
            raise StegoError(
                f"ignore value {ignore_value} collides with class ids 0..{n_classes - 1}; "
                "choose an ignore value >= n_classes (255 is usual)."
            )
        table[ignore_value] = IGNORE
    return LabelMap(table, n_classes)
