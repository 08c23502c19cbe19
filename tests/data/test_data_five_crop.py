"""Five-crop writing: crop geometry, reading back, resuming, manifests that cannot escape."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stego.cli import main
from stego.data import IGNORE, build_dataset, five_crop_boxes, write_five_crops
from stego.data import five_crop as fc
from stego.errors import StegoError


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_boxes_tile_the_image() -> None:
    boxes = five_crop_boxes(12, 16)
    assert [tuple(b) for b in boxes] == [
        (0, 0, 6, 8),
        (0, 8, 6, 8),
        (6, 0, 6, 8),
        (6, 8, 6, 8),
        (3, 4, 6, 8),
    ]
    odd = five_crop_boxes(7, 9)
    assert tuple(odd[3]) == (4, 5, 3, 4) and tuple(odd[4]) == (2, 2, 3, 4)
    with pytest.raises(StegoError, match="too small"):
        five_crop_boxes(1, 5)


def test_write_and_read_back(camvid_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "crops"
    result = write_five_crops("camvid", camvid_root, "train", out, progress=False)
    assert result.n_images == 2 and result.n_crops == 10 and result.n_written == 2
    assert result.folder == out / "camvid_five_crop_0.5"
    source = build_dataset("camvid", camvid_root, "train")
    crops = build_dataset("camvid", camvid_root, "train", crop_type="five", crop_dir=out)
    assert len(crops) == 10 and crops.groups == [0] * 5 + [1] * 5
    full = source[1]
    image, label = full["image"], full["label"]  # (3, 6, 8), (6, 8)
    corners = [(0, 0, 0, 0), (0, -1, 0, 7), (-1, 0, 5, 0), (-1, -1, 5, 7)]
    for k, (r, c, R, C) in enumerate(corners):
        crop = crops[5 + k]
        assert crop["image"].shape == (3, 3, 4)
        assert np.array_equal(
            crop["image"][:, r, c].numpy(), image[:, R, C].numpy()
        )  # lossless PNG
        assert int(crop["label"][r, c]) == int(label[R, C])
    centre = crops[9]
    assert np.array_equal(centre["label"].numpy(), label[2:5, 2:6].numpy())
    assert int(crops[0]["label"][0, 0]) == IGNORE  # void survives the +1 encoding
    manifest = json.loads((result.folder / "train.manifest.json").read_text())
    assert manifest["images"][1]["crops"][3]["box"] == [3, 4, 3, 4]
    assert manifest["images"][1]["source"].endswith("f1.png")
    assert not (result.folder / "train.progress.jsonl").exists()
    again = write_five_crops("camvid", camvid_root, "train", out, progress=False)
    assert again.n_written == 0


def test_interrupted_run_resumes_without_corrupt_files(
    camvid_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = write_five_crops(
        "camvid", camvid_root, "train", tmp_path / "ref", progress=False
    ).folder
    out = tmp_path / "crops"
    real_save = fc._save

    def failing_save(path: Path, array: np.ndarray, fmt: str) -> None:
        # die inside image 1, at its second crop (files 5-9 are image 1's): images are cut by
        # threads, so a count of calls would not say which image is cut
        if path.as_posix().endswith("img/train/6.png"):
            raise KeyboardInterrupt
        real_save(path, array, fmt)

    monkeypatch.setattr(fc, "_save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        write_five_crops("camvid", camvid_root, "train", out, progress=False)
    folder = out / "camvid_five_crop_0.5"
    with pytest.raises(StegoError, match="unfinished.*rerun"):
        build_dataset("camvid", camvid_root, "train", crop_type="five", crop_dir=out)
    stray = folder / "img" / "train" / ".7.png.tmp-abc123"
    stray.write_bytes(b"half a png")
    with open(folder / "train.progress.jsonl", "a") as log:
        log.write('{"group": 1, "sou')  # torn line of a killed append
    monkeypatch.setattr(fc, "_save", real_save)
    cut = []
    real_crop = fc._crop_one
    monkeypatch.setattr(fc, "_crop_one", lambda ds, g, *a: cut.append(g) or real_crop(ds, g, *a))
    result = write_five_crops("camvid", camvid_root, "train", out, progress=False)
    assert cut == [1] and result.n_written == 1
    assert not stray.exists()
    ours, ref = _files(folder), _files(reference)
    ours.pop("train.manifest.json"), ref.pop("train.manifest.json")
    assert ours.keys() == ref.keys() and ours == ref  # byte-identical to an uninterrupted run
    assert len(build_dataset("camvid", camvid_root, "train", crop_type="five", crop_dir=out)) == 10


def test_manifest_paths_must_stay_inside(camvid_root: Path, tmp_path: Path) -> None:
    folder = write_five_crops("camvid", camvid_root, "train", tmp_path, progress=False).folder
    manifest = folder / "train.manifest.json"
    data = json.loads(manifest.read_text())
    for bad in ("../../escape.png", "/etc/passwd", "img/../../x.png"):
        data["images"][0]["crops"][0]["image"] = bad
        manifest.write_text(json.dumps(data))
        with pytest.raises(StegoError, match="leaves the crop folder"):
            build_dataset("camvid", camvid_root, "train", crop_type="five", crop_dir=tmp_path)


def test_journal_with_escaping_path_is_not_trusted(camvid_root: Path, tmp_path: Path) -> None:
    folder = tmp_path / "camvid_five_crop_0.5"
    folder.mkdir()
    bad = {"group": 0, "source": str(camvid_root / "images/train/f0.png"), "format": "png",
           "crops": [{"image": "../outside.png", "label": None}] * 5}  # fmt: skip
    (tmp_path / "outside.png").write_bytes(b"x")
    (folder / "train.progress.jsonl").write_text(json.dumps(bad) + "\n")
    result = write_five_crops("camvid", camvid_root, "train", tmp_path, progress=False)
    assert result.n_written == 2 and (tmp_path / "outside.png").read_bytes() == b"x"


def test_reads_the_original_layout(tmp_path: Path) -> None:
    folder = tmp_path / "cropped" / "cityscapes_five_crop_0.5"
    for i in range(10):
        (folder / "img" / "train").mkdir(parents=True, exist_ok=True)
        (folder / "label" / "train").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (i, 0, 0)).save(folder / "img" / "train" / f"{i}.jpg")
        Image.fromarray(np.full((4, 4), i % 3, np.uint8)).save(
            folder / "label" / "train" / f"{i}.png"
        )
    (folder / "img" / "train" / ".3.jpg.tmp-x").write_bytes(b"")
    ds = build_dataset("cityscapes27", tmp_path, "train", crop_type="five")
    assert len(ds) == 10 and ds.groups[9] == 1
    assert int(ds[0]["label"][0, 0]) == IGNORE and int(ds[2]["label"][0, 0]) == 1
    (folder / "label" / "train" / "4.png").unlink()
    with pytest.raises(StegoError, match="one <i>.png label per crop"):
        build_dataset("cityscapes27", tmp_path, "train", crop_type="five")
    with pytest.raises(
        StegoError, match=r"no five-crop data for cocostuff27 at .*cocostuff27_five_crop_0\.5"
    ):
        build_dataset("cocostuff27", tmp_path, "train", crop_type="five")


def test_jpg_format_and_cli(
    camvid_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["crop", "--dataset", "camvid", "--data-root", str(camvid_root), "--out", str(tmp_path),
            "--format", "jpg", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert (tmp_path / "camvid_five_crop_0.5" / "img" / "train" / "9.jpg").is_file()
    assert "10 crops of 2 images" in capsys.readouterr().out
    assert main(args[:-3] + ["--format", "png"]) == 2
    assert "already holds split 'train' as jpg" in capsys.readouterr().err
    assert main(["crop", "--dataset", "nope", "--data-root", str(tmp_path)]) == 2
    assert "choose one of" in capsys.readouterr().err


def test_folder_dataset_crops_need_an_output_dir(mixed_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(StegoError, match="pass an output folder"):
        write_five_crops("folder", mixed_folder, "all", progress=False)
    result = write_five_crops("folder", mixed_folder, "all", tmp_path / "out", progress=False)
    crops = build_dataset("folder", mixed_folder, crop_type="five", crop_dir=tmp_path / "out")
    assert result.n_crops == 45 == len(crops) and crops[44]["image"].shape == (3, 4, 3)
    assert "label" not in crops[0]
