"""Label mappings on known raw values, and the class/palette tables."""

from __future__ import annotations

import numpy as np
import pytest

from stego.data import DATASETS, IGNORE
from stego.data import label_maps as M
from stego.errors import StegoError


def test_coco27_known_ids() -> None:
    lut = M.coco27_map()
    raw = np.array([0, 1, 8, 105, 156, 181, 100, 255, 182, 254])
    assert lut(raw).tolist() == [9, 11, 11, 23, 23, 24, 13, IGNORE, IGNORE, IGNORE]


def test_coco27_table_covers_every_fine_id_once() -> None:
    assert sorted(M.COCO_FINE_TO_COARSE27) == list(range(182))
    counts = np.bincount(list(M.COCO_FINE_TO_COARSE27.values()), minlength=27)
    assert counts.min() >= 1 and counts.sum() == 182


def test_coco_stuff_only_and_three() -> None:
    raw = np.array([0, 105, 93, 110, 181, 255])  # person, sky, plant, ground, solid, unlabelled
    assert M.coco15_map()(raw).tolist() == [IGNORE, 11, 10, 9, 12, IGNORE]
    assert M.coco3_map()(raw).tolist() == [IGNORE, 0, 1, 2, IGNORE, IGNORE]


def test_cityscapes_label_ids() -> None:
    raw = np.array([0, 6, 7, 8, 33, 34, 255])
    assert M.cityscapes27_map()(raw).tolist() == [IGNORE, IGNORE, 0, 1, 26, IGNORE, IGNORE]


def test_potsdam_merge_and_bad_value_names_file() -> None:
    lut = M.potsdam3_map()
    assert lut(np.array([0, 4, 1, 5, 2, 3, 255])).tolist() == [0, 0, 1, 1, 2, 2, IGNORE]
    with pytest.raises(StegoError, match=r"gt/x\.mat.*values 6, 7"):
        lut(np.array([6, 7, 0]), "gt/x.mat")


def test_camvid_range() -> None:
    lut = M.camvid11_map()
    assert lut(np.array([0, 10, 255])).tolist() == [0, 10, IGNORE]
    with pytest.raises(StegoError, match=r"lab\.png.*values 11.*0-10, 255"):
        lut(np.array([11]), "lab.png")
    with pytest.raises(StegoError, match="values -3"):
        lut(np.array([-3]), "lab.png")


def test_float_labels_refused() -> None:
    with pytest.raises(StegoError, match="integer class ids"):
        M.camvid11_map()(np.zeros(3, np.float32), "f.png")


def test_identity_map_rules() -> None:
    assert M.identity_map(300, None)(np.array([0, 299])).tolist() == [0, 299]
    with pytest.raises(StegoError, match="collides"):
        M.identity_map(5, 3)


@pytest.mark.parametrize("name", [n for n in DATASETS if n != "folder"])
def test_info_tables_consistent(name: str) -> None:
    info = DATASETS[name]
    assert len(info.class_names) == info.n_classes
    assert info.palette.shape == (info.n_classes, 3) and info.palette.dtype == np.uint8
