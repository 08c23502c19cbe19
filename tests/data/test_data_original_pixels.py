"""Items read the way the original STEGO code reads them: PIL NEAREST resize for every image
(tensors included), Potsdam tiles without ``gt`` as unlabelled, EXIF tags ignored in labelled
datasets. Expected values are computed independently here with PIL on the stored arrays.

Layouts follow the original's ``src/data.py`` (github mhamilton723/STEGO): ``Potsdam`` reads
``potsdam/imgs/<id>.mat`` (key ``img``, H x W x 4 uint8, first 3 channels used through
``to_pil_image``) and ``potsdam/gt/<id>.mat`` (key ``gt``; a ``FileNotFoundError`` gives a
label of 255 everywhere, mapped to -1), ids from ``all.txt`` / ``labelled_train.txt``;
``Coco`` opens ``images/<split>2017/<id>.jpg`` with ``Image.open(...).convert("RGB")`` (no EXIF
transpose) and labels ``annotations/<split>2017/<id>.png``, ids from ``curated/...`` lists.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stego.data import FolderDataset, PairTransform, build_dataset
from stego.data.transforms import pil_nearest_indices

# the original's Potsdam fine -> coarse map (roads+cars, buildings+clutter, vegetation+trees)
POTSDAM_COARSE = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2, 255: -1}
NEAREST = Image.Resampling.NEAREST


def gradient_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def pil_resize_centre_crop(arr: np.ndarray, res: int) -> np.ndarray:
    """torchvision's Resize(res, NEAREST) + CenterCrop(res) on a PIL image, done with PIL."""
    h, w = arr.shape[:2]
    size = (res, int(res * w / h)) if h <= w else (int(res * h / w), res)
    out = np.asarray(Image.fromarray(arr).resize((size[1], size[0]), NEAREST))
    top, left = int(round((size[0] - res) / 2.0)), int(round((size[1] - res) / 2.0))
    return out[top : top + res, left : left + res]


@pytest.mark.parametrize("src,dst", [(64, 224), (200, 224), (200, 37), (64, 37), (480, 320)])
def test_nearest_indices_are_pils(src: int, dst: int) -> None:
    rgb = np.zeros((3, src, 3), np.uint8)
    rgb[..., 0] = np.arange(src) % 256  # column id in red, id // 256 in green
    rgb[..., 1] = np.arange(src) // 256
    out = np.asarray(Image.fromarray(rgb).resize((dst, 3), NEAREST)).astype(np.int64)
    picked = out[0, :, 0] + 256 * out[0, :, 1]
    assert np.array_equal(pil_nearest_indices(src, dst).numpy(), picked)


def test_half_way_cases_exist_where_torch_nearest_differs() -> None:
    # 64 -> 224: source position (i + 0.5) * 2/7 is an integer for i = 3, 10, 17, ...; PIL's
    # running sum falls below it, torch's and the closed form land on it: 25 columns differ.
    ours = pil_nearest_indices(64, 224)
    x = torch.arange(64.0).view(1, 1, 1, 64)
    torch_exact = F.interpolate(x, size=(1, 224), mode="nearest-exact").flatten().long()
    closed = torch.floor((torch.arange(224) + 0.5) * 64 / 224).long()
    assert int((torch_exact != ours).sum()) == 25
    assert int((closed != ours).sum()) == 25


@pytest.mark.parametrize("res", [224, 37])
def test_tensor_and_pil_images_resize_alike_and_stay_on_their_labels(res: int) -> None:
    arr = gradient_image(64, 80, seed=3)
    transform = PairTransform(res, interpolation="nearest")
    col_ids = np.tile(np.arange(80, dtype=np.int64), (64, 1)) * 100 + np.arange(64)[:, None]
    from_pil = transform(Image.fromarray(arr), col_ids)
    from_tensor = transform(torch.from_numpy(arr).permute(2, 0, 1), col_ids)
    expected = torch.from_numpy(pil_resize_centre_crop(arr, res).copy()).permute(2, 0, 1)
    assert torch.equal((from_pil.image * 255).round().byte(), expected)
    assert torch.equal((from_tensor.image * 255).round().byte(), expected)
    # the label picks the same source pixel as the image: position ids decode to it
    rows, cols = from_tensor.label % 100, from_tensor.label // 100
    src = torch.from_numpy(arr).permute(2, 0, 1)[:, rows, cols]
    assert torch.equal((from_tensor.image * 255).round().byte(), src)


@pytest.fixture
def potsdam_all_root(tmp_path: Path) -> Path:
    """potsdam/ as the original reads it: uint8 RGB+IR tiles, gt for two of three tiles."""
    from scipy.io import savemat

    base = tmp_path / "potsdam"
    (base / "imgs").mkdir(parents=True)
    (base / "gt").mkdir()
    rng = np.random.default_rng(7)
    for k, tile in enumerate(["3_10_1", "3_10_2", "7_1_3"]):
        savemat(base / "imgs" / f"{tile}.mat", {"img": rng.integers(0, 256, (64, 64, 4), np.uint8)})
        if k < 2:
            gt = rng.choice(np.array([0, 1, 2, 3, 4, 5, 255], np.uint8), (64, 64))
            savemat(base / "gt" / f"{tile}.mat", {"gt": gt})
    (base / "all.txt").write_text("3_10_1\n3_10_2\n7_1_3\n")
    (base / "labelled_train.txt").write_text("3_10_1\n7_1_3\n")
    (base / "labelled_test.txt").write_text("3_10_2\n")
    (base / "unlabelled_train.txt").write_text("7_1_3\n")
    return tmp_path


def _original_potsdam_item(root: Path, tile: str, res: int | None) -> tuple[np.ndarray, np.ndarray]:
    """What the original's Potsdam class returns, from the stored arrays, with PIL."""
    from scipy.io import loadmat

    img = loadmat(root / "potsdam" / "imgs" / f"{tile}.mat")["img"][..., :3]
    gt_file = root / "potsdam" / "gt" / f"{tile}.mat"
    gt = loadmat(gt_file)["gt"] if gt_file.is_file() else np.full(img.shape[:2], 255, np.uint8)
    if res is not None:
        img, gt = pil_resize_centre_crop(img, res), pil_resize_centre_crop(gt, res)
    coarse = np.vectorize(POTSDAM_COARSE.get)(gt.astype(np.int64))
    return img, coarse


@pytest.mark.parametrize("res", [None, 224, 37])
@pytest.mark.parametrize("split", ["all", "train", "val"])
def test_potsdam_items_match_the_original(
    potsdam_all_root: Path, split: str, res: int | None, caplog: pytest.LogCaptureFixture
) -> None:
    transform = None if res is None else PairTransform(res, interpolation="nearest")
    with caplog.at_level(logging.WARNING, logger="stego.data.datasets"):
        data = build_dataset("potsdam3", potsdam_all_root, split, transform=transform)
    tiles = {"all": ["3_10_1", "3_10_2", "7_1_3"], "train": ["3_10_1", "7_1_3"]}
    tiles["val"] = ["3_10_2"]
    assert [Path(s.image).stem for s in data.samples] == tiles[split]
    assert data.unlabelled == (0 if split == "val" else 1)
    if data.unlabelled:
        assert "1 of" in caplog.text and "no gt file" in caplog.text
    for i, tile in enumerate(tiles[split]):
        item = data[i]
        img, label = _original_potsdam_item(potsdam_all_root, tile, res)
        assert np.array_equal((item["image"] * 255).round().byte().permute(1, 2, 0).numpy(), img)
        assert np.array_equal(item["label"].numpy(), label)
    if split != "val":
        assert bool((data[tiles[split].index("7_1_3")]["label"] == -1).all())


def test_potsdam_split_without_any_gt_has_no_labels(potsdam_all_root: Path) -> None:
    data = build_dataset("potsdam3", potsdam_all_root, "unlabelled_train")
    assert not data.has_labels and "label" not in data[0]


def _exif_jpeg(path: Path, array: np.ndarray, orientation: int = 6) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: "rotate 90 degrees clockwise to display"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, exif=exif, quality=95)


def test_labelled_jpegs_ignore_exif_like_the_original(coco_root: Path) -> None:
    # overwrite COCO val image 0 (12 x 16) with an EXIF-rotated JPEG; its label stays 12 x 16
    path = coco_root / "cocostuff" / "images" / "val2017" / f"{0:012d}.jpg"
    _exif_jpeg(path, gradient_image(12, 16, 5))
    raw = np.asarray(Image.open(path).convert("RGB"))  # the original's read
    for res in (None, 224, 37):
        transform = None if res is None else PairTransform(res, interpolation="nearest")
        item = build_dataset("cocostuff27", coco_root, "val", transform=transform)[0]
        expected = raw if res is None else pil_resize_centre_crop(raw, res)
        assert tuple(item["label"].shape) == expected.shape[:2]
        assert np.array_equal((item["image"] * 255).round().byte().permute(1, 2, 0), expected)


def test_unlabelled_folders_still_apply_exif(tmp_path: Path) -> None:
    arr = gradient_image(12, 16, 5)
    _exif_jpeg(tmp_path / "photos" / "a.jpg", arr)
    upright = FolderDataset(tmp_path / "photos")[0]["image"]
    assert tuple(upright.shape) == (3, 16, 12)  # turned by the tag
    save_png(tmp_path / "labels" / "a.png", np.zeros((12, 16), np.uint8))
    labelled = FolderDataset(tmp_path / "photos", label_dir=tmp_path / "labels", n_classes=2)[0]
    assert tuple(labelled["image"].shape) == (3, 12, 16) and labelled["label"].shape == (12, 16)
