"""Each dataset read from a tiny copy of its real on-disk layout; registry errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stego.data import IGNORE, FolderDataset, PairTransform, build_dataset
from stego.errors import StegoError


def gradient_image(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_cocostuff27(coco_root: Path) -> None:
    train = build_dataset("cocostuff27", coco_root, "train")
    assert len(train) == 3
    firsts = [int(train[i]["label"][0, 0]) for i in range(3)]
    assert firsts == [9, 23, IGNORE]  # fine 0 person, 105 sky, 255 unlabelled
    item = train[0]
    assert item["image"].shape == (3, 12, 16) and item["label"].shape == (12, 16)
    assert (item["label"][5:] == 11).all() and item["index"] == 0 and item["path"].endswith(".jpg")
    val = build_dataset(
        "cocostuff", coco_root / "cocostuff", "val"
    )  # alias; dataset folder as root
    assert [int(val[i]["label"][0, 0]) for i in range(2)] == [23, 24]


def test_cocostuff_variants(coco_root: Path) -> None:
    stuff = build_dataset("cocostuff15", coco_root, "val")
    assert int(stuff[0]["label"][0, 0]) == 11 and int(stuff[0]["label"][6, 0]) == IGNORE
    three = build_dataset(
        "cocostuff3", coco_root, "val", image_list="Coco164kFull_Stuff_Coarse_7.txt"
    )
    assert int(three[0]["label"][0, 0]) == 0


def test_cityscapes27(cityscapes_root: Path) -> None:
    ds = build_dataset("cityscapes27", cityscapes_root, "train")
    assert len(ds) == 2 and "aachen" in ds[0]["path"] and "bremen" in ds[1]["path"]
    label = ds[0]["label"]
    assert int(label[0, 0]) == IGNORE and int(label[0, 1]) == 26 and int(label[5, 5]) == 0
    assert len(build_dataset("cityscapes", cityscapes_root, "val")) == 1


def test_potsdam3(potsdam_root: Path) -> None:
    from scipy.io import loadmat

    train = build_dataset("potsdam3", potsdam_root, "train")
    assert len(train) == 2 and len(build_dataset("potsdam", potsdam_root, "val")) == 1
    item = train[0]
    assert item["label"][0].tolist() == [0, 1, 2, 2, 0, 1, IGNORE, 0, 0, 0]
    raw = loadmat(potsdam_root / "potsdam" / "imgs" / "tile_a.mat")["img"]
    assert torch.allclose(item["image"], torch.from_numpy(raw[..., :3]).permute(2, 0, 1))
    out = build_dataset("potsdam3", potsdam_root, "all", transform=PairTransform(4))[2]
    assert out["image"].shape == (3, 4, 4) and out["label"].shape == (4, 4)


def test_potsdam_uint8_scaled_and_unlabelled(potsdam_root: Path) -> None:
    from scipy.io import savemat

    base = potsdam_root / "potsdam"
    savemat(base / "imgs" / "tile_a.mat", {"img": np.full((10, 10, 4), 255, np.uint8)})
    assert float(build_dataset("potsdam3", potsdam_root, "train")[0]["image"].max()) == 1.0
    for gt in (base / "gt").iterdir():
        gt.unlink()
    item = build_dataset("potsdam3", potsdam_root, "unlabelled_train")[0]
    assert "label" not in item and item["image"].shape == (3, 10, 10)


def test_camvid_root_either_level(camvid_root: Path) -> None:
    for root in (camvid_root, camvid_root.parent):
        ds = build_dataset("camvid", root, "train")
        assert (
            len(ds) == 2 and int(ds[0]["label"][0, 0]) == IGNORE and int(ds[0]["label"].max()) == 10
        )


def test_folder_mixed_formats(mixed_folder: Path) -> None:
    ds = build_dataset("folder", mixed_folder)
    rel = [Path(s.image).relative_to(mixed_folder).as_posix() for s in ds.samples]
    assert rel == sorted(rel) and len(rel) == 9 and "sub/deeper/f16.png" in rel
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 9, 7) and "label" not in item


def test_folder_with_labels_and_skip_bad(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    images, labels = tmp_path / "img", tmp_path / "lab"
    for name in ("a", "b", "c", "d"):
        save_png(images / "x" / f"{name}.png", gradient_image(4, 5))
        save_png(labels / "x" / f"{name}.png", np.full((4, 5), 2, np.uint8))
    (images / "x" / "b.png").write_bytes(b"")  # zero-byte image
    save_png(labels / "x" / "c.png", np.full((4, 5), 9, np.uint8))  # value 9 >= n_classes
    save_png(labels / "x" / "d.png", np.full((3, 5), 1, np.uint8))  # wrong size
    with caplog.at_level(logging.WARNING):
        ds = FolderDataset(images, label_dir=labels, n_classes=3, skip_bad=True)
    assert len(ds) == 1 and int(ds[0]["label"][0, 0]) == 2
    assert [p.name for p, _ in ds.skipped] == ["b.png", "c.png", "d.png"]
    assert "b.png" in caplog.text
    strict = build_dataset("folder", images, label_dir=labels, n_classes=3)
    with pytest.raises(StegoError, match=r"b\.png is empty"):
        strict[1]
    with pytest.raises(StegoError, match=r"c\.png contains values 9"):
        strict[2]
    with pytest.raises(StegoError, match=r"label .*d\.png is 3x5 but image .*d\.png is 4x5"):
        strict[3]


def test_folder_missing_label_and_n_classes(tmp_path: Path) -> None:
    save_png(tmp_path / "img" / "a.png", gradient_image(4, 4))
    (tmp_path / "lab").mkdir()
    with pytest.raises(StegoError, match="need n_classes"):
        FolderDataset(tmp_path / "img", label_dir=tmp_path / "lab")
    with pytest.raises(StegoError, match=r"no label in .*lab.*a\.png"):
        FolderDataset(tmp_path / "img", label_dir=tmp_path / "lab", n_classes=2)


def test_dataset_errors_name_paths(tmp_path: Path, cityscapes_root: Path, coco_root: Path) -> None:
    with pytest.raises(StegoError, match="choose one of: cocostuff27, .*camvid, folder"):
        build_dataset("imagenet", tmp_path, "train")
    with pytest.raises(
        StegoError, match=r"split 'test' for cityscapes27; choose one of: train, val"
    ):
        build_dataset("cityscapes27", cityscapes_root, "test")
    with pytest.raises(StegoError, match=r"cityscapes dataset at .*cityscapes"):
        build_dataset("cityscapes27", tmp_path / "cocostuff", "train")
    with pytest.raises(StegoError, match="does not exist"):
        build_dataset("camvid", tmp_path / "missing", "train")
    empty = tmp_path / "camvid"
    (empty / "images" / "val").mkdir(parents=True)
    with pytest.raises(
        StegoError, match=r"split 'val' is empty: no images found under .*images/val"
    ):
        build_dataset("camvid", empty, "val")
    with pytest.raises(StegoError, match=r"expected the folder .*images/test"):
        build_dataset("camvid", empty, "test")
    (coco_root / "cocostuff" / "annotations" / "val2017" / "000000000001.png").unlink()
    with pytest.raises(StegoError, match=r"1 label files are missing, e\.g\. .*000000000001\.png"):
        build_dataset("cocostuff27", coco_root, "val")
    with pytest.raises(StegoError, match="unknown option"):
        build_dataset("camvid", empty, "val", n_classes=3)


def test_bad_coco_files_name_themselves(coco_root: Path) -> None:
    ann = coco_root / "cocostuff" / "annotations" / "train2017"
    Image.new("RGB", (16, 12)).save(ann / "000000000000.png")
    save_png(ann / "000000000001.png", np.zeros((5, 5), np.uint8))
    ds = build_dataset("cocostuff27", coco_root, "train")
    with pytest.raises(StegoError, match=r"000000000000\.png is a RGB colour image"):
        ds[0]
    with pytest.raises(
        StegoError, match=r"000000000001\.png is 5x5 but image .*000000000001\.jpg is 12x16"
    ):
        ds[1]
