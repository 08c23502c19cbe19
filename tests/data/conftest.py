"""Tiny on-disk fixtures in each dataset's real format (built in tmp_path, a few KB each)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def gradient_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 image whose pixels are all different enough to locate crops."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def save_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    """cocostuff/ with 3 train and 2 val images; label pixel (0, 0) of image k = FINE[k]."""
    base = tmp_path / "cocostuff"
    fine = {"train2017": [0, 105, 255], "val2017": [156, 181]}
    lists = {
        "train2017": "Coco164kFull_Stuff_Coarse.txt",
        "val2017": "Coco164kFull_Stuff_Coarse_7.txt",
    }
    for sub, values in fine.items():
        ids = []
        for k, value in enumerate(values):
            image_id = f"{k:012d}"
            ids.append(image_id)
            (base / "images" / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(gradient_image(12, 16, k)).save(
                base / "images" / sub / f"{image_id}.jpg"
            )
            label = np.full((12, 16), 255, np.uint8)
            label[0, 0] = value
            label[5:, :] = 1  # a vehicle (fine 1 -> coarse 11) in the lower part
            save_png(base / "annotations" / sub / f"{image_id}.png", label)
        (base / "curated" / sub).mkdir(parents=True, exist_ok=True)
        (base / "curated" / sub / lists[sub]).write_text("\n".join(ids) + "\n")
    return tmp_path


@pytest.fixture
def cityscapes_root(tmp_path: Path) -> Path:
    """cityscapes/ with two cities in train (labelIds 7, 6, 33 at known pixels) and one in val."""
    base = tmp_path / "cityscapes"
    for split, cities in {"train": ["aachen", "bremen"], "val": ["lindau"]}.items():
        for c, city in enumerate(cities):
            stem = f"{city}_000000_{c:06d}"
            save_png(
                base / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                gradient_image(8, 16, c),
            )
            label = np.full((8, 16), 7, np.uint8)
            label[0, 0], label[0, 1], label[0, 2] = 6, 33, 26 + 7
            save_png(base / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label)
    return tmp_path


@pytest.fixture
def potsdam_root(tmp_path: Path) -> Path:
    """potsdam/ with float RGB+IR tiles in [0, 1] and gt with values 0..5 and 255."""
    from scipy.io import savemat

    base = tmp_path / "potsdam"
    (base / "imgs").mkdir(parents=True)
    (base / "gt").mkdir()
    ids = ["tile_a", "tile_b", "tile_c"]
    for k, tile in enumerate(ids):
        img = np.random.default_rng(k).random((10, 10, 4)).astype(np.float32)
        savemat(base / "imgs" / f"{tile}.mat", {"img": img})
        gt = np.array([0, 1, 2, 3, 4, 5, 255, 0, 0, 0], np.uint8)[None].repeat(10, 0)
        savemat(base / "gt" / f"{tile}.mat", {"gt": gt})
    (base / "labelled_train.txt").write_text("tile_a\ntile_b\n")
    (base / "labelled_test.txt").write_text("tile_c\n")
    (base / "all.txt").write_text("\n".join(ids) + "\n")
    (base / "unlabelled_train.txt").write_text("tile_a\n")
    return tmp_path


@pytest.fixture
def camvid_root(tmp_path: Path) -> Path:
    """A 2-image CamVid copy in the shared layout (root = the camvid folder itself)."""
    base = tmp_path / "camvid"
    for k in range(2):
        save_png(base / "images" / "train" / f"f{k}.png", gradient_image(6, 8, k))
        label = np.arange(48, dtype=np.uint8).reshape(6, 8) % 11
        label[0, 0] = 255
        save_png(base / "labels" / "train" / f"f{k}.png", label)
    return base


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """Nested folder of jpg, png, bmp, RGBA png, greyscale, 16-bit png and palette images."""
    root = tmp_path / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    rgb = gradient_image(9, 7)
    Image.fromarray(rgb).save(root / "a.jpg")
    Image.fromarray(rgb).save(root / "b.png")
    Image.fromarray(rgb).save(root / "sub" / "c.bmp")
    Image.fromarray(np.dstack([rgb, np.full((9, 7), 128, np.uint8)])).save(
        root / "sub" / "d_rgba.png"
    )
    Image.fromarray(rgb[..., 0]).save(root / "sub" / "e_grey.png")
    Image.fromarray(np.arange(63, dtype=np.uint16).reshape(9, 7) * 1000).save(
        root / "sub" / "deeper" / "f16.png"
    )
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(
        root / "sub" / "deeper" / "g_pal.png"
    )
    Image.fromarray(rgb).save(root / "sub" / "h.webp")
    Image.fromarray(rgb).save(root / "sub" / "i.tif")
    (root / ".hidden.png").write_bytes(b"")  # hidden: never listed
    (root / "notes.txt").write_text("not an image")
    return root
