"""Bad images and bad labels through the readers, the folder dataset and prediction.

Every bad file must give either a correct RGB image or a :class:`StegoError` whose message
names the file; ``skip_bad=True`` logs and lists what it left out.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stego.data import build_dataset
from stego.data.readers import read_image, read_label
from stego.errors import StegoError

BAD = ["truncated_jpeg", "truncated_png", "zero_bytes", "text", "bomb"]
MODES = {
    "grey": "g.png",
    "palette": "p.png",
    "rgba": "a.png",
    "cmyk_jpeg": "c.jpg",
    "png16": "d.png",
}


# ----------------------------------------------------------------------------- readers


@pytest.mark.parametrize("kind", BAD)
def test_bad_image_raises_stego_error_naming_file(kind, tmp_path, helpers) -> None:
    path = helpers.write_bad_image(kind, tmp_path / helpers.BAD_KINDS[kind])
    with pytest.raises(StegoError) as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_low_pixel_limit_is_enforced(tmp_path, helpers, monkeypatch) -> None:
    """A normal-looking image over (twice) a lowered MAX_IMAGE_PIXELS is refused cleanly."""
    path = tmp_path / "big.png"
    Image.fromarray(helpers.rgb_array(64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > 2 * 1000
    with pytest.raises(StegoError, match="decompression-bomb") as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_bomb_header_is_refused_without_allocating(tmp_path, helpers) -> None:
    """A 60-byte file claiming 10^10 pixels is refused from its header alone."""
    import resource

    path = helpers.bomb_png(tmp_path / "bomb.png")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(StegoError, match="MAX_IMAGE_PIXELS"):
        read_image(path)
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb < 200_000  # far below the 30 GB the header claims


@pytest.mark.parametrize("kind", list(MODES))
def test_unusual_modes_come_out_rgb(kind, tmp_path, helpers) -> None:
    rgb = helpers.rgb_array(20, 28)
    path = helpers.write_mode_image(kind, tmp_path / MODES[kind], rgb)
    image = read_image(path)
    assert image.mode == "RGB" and image.size == (28, 20)
    out = np.asarray(image).astype(int)
    if kind == "rgba":  # alpha dropped, colour kept
        np.testing.assert_array_equal(out, rgb)
    elif kind in ("grey", "png16"):  # grey replicated to 3 channels; 16-bit scaled to 8 bits
        grey = np.asarray(Image.fromarray(rgb).convert("L")) if kind == "grey" else rgb[..., 0]
        np.testing.assert_array_equal(out, np.stack([grey] * 3, -1))
    elif kind == "palette":
        assert np.abs(out - rgb).mean() < 40  # 16-colour quantisation
    else:  # CMYK JPEG: converted, not inverted or garbled
        assert np.abs(out - rgb).mean() < 25


def test_exif_orientation_6_is_applied(tmp_path, helpers) -> None:
    """Orientation 6 = the camera was turned: the stored W x H pixels come out rotated 90 deg
    clockwise, H x W. (Labels are never rotated; see the label policy test.)"""
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = (250, 10, 10)  # left half red, right half blue as stored
    rgb[:, 20:] = (10, 10, 250)
    path = helpers.exif_rotated_jpeg(tmp_path / "rot.jpg", rgb)
    image = read_image(path)
    assert image.size == (20, 40)  # (W, H): stored 40 x 20 -> upright 20 wide, 40 tall
    out = np.asarray(image).astype(int)
    # rotate 90 deg clockwise: the stored left half ends on top
    assert out[:20, :, 0].mean() > 200 and out[20:, :, 2].mean() > 200


def test_exif_tag_is_ignored_when_the_folder_has_labels(tmp_path, helpers) -> None:
    """Label policy (docs/data.md): in a labelled dataset image and label are both read as
    stored, so a label drawn on the stored pixels stays aligned (the original and the datasets'
    annotation tools do the same); the EXIF orientation is applied only to unlabelled folders."""
    images, labels = tmp_path / "img", tmp_path / "lab"
    helpers.exif_rotated_jpeg(images / "x.jpg", helpers.rgb_array(20, 40))
    labels.mkdir()
    label = np.zeros((20, 40), np.uint8)
    label[:, 20:] = 1
    Image.fromarray(label).save(labels / "x.png")
    item = build_dataset("folder", images, label_dir=labels, n_classes=2)[0]
    assert tuple(item["image"].shape) == (3, 20, 40)
    assert np.array_equal(item["label"].numpy(), label)
    stored = np.asarray(Image.open(images / "x.jpg").convert("RGB"))  # PIL: no EXIF applied
    assert np.array_equal((item["image"] * 255).round().byte().permute(1, 2, 0).numpy(), stored)
    upright = build_dataset("folder", images)[0]["image"]  # unlabelled: turned upright
    assert tuple(upright.shape) == (3, 40, 20)


# ----------------------------------------------------------------------------- folder dataset


def _folder_with_bad_files(root: Path, helpers) -> list[Path]:
    helpers.write_folder(root, 3)
    return [helpers.write_bad_image(kind, root / helpers.BAD_KINDS[kind]) for kind in BAD]


def test_folder_dataset_raises_on_each_bad_file(tmp_path, helpers) -> None:
    root = tmp_path / "photos"
    bad = _folder_with_bad_files(root, helpers)
    ds = build_dataset("folder", root)
    paths = [Path(s.image) for s in ds.samples]
    for path in bad:
        with pytest.raises(StegoError) as info:
            ds[paths.index(path)]
        assert str(path) in str(info.value)


def test_folder_dataset_skip_bad_logs_and_lists(tmp_path, helpers, caplog) -> None:
    root = tmp_path / "photos"
    bad = _folder_with_bad_files(root, helpers)
    with caplog.at_level(logging.WARNING, logger="stego.data.folder"):
        ds = build_dataset("folder", root, skip_bad=True)
    assert len(ds) == 3
    assert sorted(p for p, _ in ds.skipped) == sorted(bad)
    for path, reason in ds.skipped:
        assert str(path) in reason
        assert str(path) in caplog.text
    for i in range(len(ds)):
        assert ds[i]["image"].shape == (3, 32, 32)


def test_folder_dataset_all_bad_is_an_error(tmp_path, helpers) -> None:
    root = tmp_path / "photos"
    helpers.write_bad_image("text", root / "a.jpg")
    with pytest.raises(StegoError, match="every image"):
        build_dataset("folder", root, skip_bad=True)


@pytest.mark.parametrize("kind", list(MODES))
def test_folder_dataset_reads_unusual_modes(kind, tmp_path, helpers) -> None:
    root = tmp_path / "photos"
    helpers.write_mode_image(kind, root / MODES[kind], helpers.rgb_array(16, 24))
    item = build_dataset("folder", root)[0]
    assert item["image"].shape == (3, 16, 24)
    assert float(item["image"].min()) >= 0.0 and float(item["image"].max()) <= 1.0


# ----------------------------------------------------------------------------- labels


def _labelled(tmp_path: Path, helpers, label: np.ndarray | None, mode: str | None = None):
    images, labels = tmp_path / "img", tmp_path / "lab"
    helpers.write_folder(images, 1, size=(8, 12))
    labels.mkdir()
    path = labels / "img_000.png"
    if label is not None:
        Image.fromarray(label, mode).save(path) if mode else Image.fromarray(label).save(path)
    return images, labels, path


def test_label_values_outside_range(tmp_path, helpers) -> None:
    label = np.zeros((8, 12), np.uint8)
    label[0, 0] = 7  # n_classes=3, ignore 255: 7 is invalid
    images, labels, path = _labelled(tmp_path, helpers, label)
    ds = build_dataset("folder", images, label_dir=labels, n_classes=3)
    with pytest.raises(StegoError, match="contains values 7") as info:
        ds[0]
    assert str(path) in str(info.value)


def test_label_ignore_value_becomes_ignore(tmp_path, helpers) -> None:
    label = np.full((8, 12), 255, np.uint8)
    label[0, :3] = [0, 1, 2]
    images, labels, _ = _labelled(tmp_path, helpers, label)
    out = build_dataset("folder", images, label_dir=labels, n_classes=3)[0]["label"]
    assert out[0, :3].tolist() == [0, 1, 2] and int((out == -1).sum()) == 8 * 12 - 3


def test_label_wrong_size(tmp_path, helpers) -> None:
    images, labels, path = _labelled(tmp_path, helpers, np.zeros((9, 12), np.uint8))
    ds = build_dataset("folder", images, label_dir=labels, n_classes=3)
    with pytest.raises(StegoError, match="must match") as info:
        ds[0]
    assert str(path) in str(info.value)


def test_rgb_label_where_ids_expected(tmp_path, helpers) -> None:
    images, labels, path = _labelled(tmp_path, helpers, np.zeros((8, 12, 3), np.uint8))
    ds = build_dataset("folder", images, label_dir=labels, n_classes=3)
    with pytest.raises(StegoError, match="colour image") as info:
        ds[0]
    assert str(path) in str(info.value)
    with pytest.raises(StegoError, match="colour image"):
        read_label(path)


def test_missing_label(tmp_path, helpers) -> None:
    images, labels, path = _labelled(tmp_path, helpers, None)
    with pytest.raises(StegoError, match="no label") as info:
        build_dataset("folder", images, label_dir=labels, n_classes=3)
    assert str(path) in str(info.value)


def test_missing_label_with_skip_bad_is_listed(tmp_path, helpers) -> None:
    images, labels, path = _labelled(tmp_path, helpers, None)
    helpers.write_folder(images / "more", 1, size=(8, 12))
    (labels / "more").mkdir()
    Image.fromarray(np.zeros((8, 12), np.uint8)).save(labels / "more" / "img_000.png")
    ds = build_dataset("folder", images, label_dir=labels, n_classes=3, skip_bad=True)
    assert len(ds) == 1
    assert [p.name for p, _ in ds.skipped] == ["img_000.png"]
    assert str(path) in ds.skipped[0][1]


@pytest.mark.parametrize("kind", ["truncated_png", "zero_bytes", "text"])
def test_bad_label_file_names_it(kind, tmp_path, helpers) -> None:
    images, labels, path = _labelled(tmp_path, helpers, None)
    helpers.write_bad_image(kind, path)
    ds = build_dataset("folder", images, label_dir=labels, n_classes=3)
    with pytest.raises(StegoError) as info:
        ds[0]
    assert str(path) in str(info.value)


def test_sixteen_bit_label_ids(tmp_path, helpers) -> None:
    """Ids above 255 in a 16-bit label PNG are read as ids, not scaled."""
    label = np.zeros((8, 12), np.uint16)
    label[0, 0] = 299
    images, labels, _ = _labelled(tmp_path, helpers, label)
    out = build_dataset("folder", images, label_dir=labels, n_classes=300, ignore_value=None)[0]
    assert int(out["label"][0, 0]) == 299


# ----------------------------------------------------------------------------- prediction


def _predict(segmenter, inputs, out, **kw):
    from stego.infer.predict import predict_paths

    return predict_paths(
        segmenter, inputs, out, num_workers=0, progress=False, flip=False, **kw
    )


@pytest.mark.parametrize("kind", BAD)
def test_prediction_bad_image_names_file(kind, tmp_path, helpers, segmenter) -> None:
    root = tmp_path / "in"
    helpers.write_folder(root, 1, size=(16, 16))
    bad = helpers.write_bad_image(kind, root / helpers.BAD_KINDS[kind])
    with pytest.raises(StegoError) as info:
        _predict(segmenter, [root], tmp_path / "out")
    assert str(bad) in str(info.value)


def test_prediction_skip_bad_lists_files(tmp_path, helpers, segmenter) -> None:
    root = tmp_path / "in"
    helpers.write_folder(root, 2, size=(16, 16))
    bad = [helpers.write_bad_image(k, root / helpers.BAD_KINDS[k]) for k in BAD]
    out = tmp_path / "out"
    summary = _predict(segmenter, [root], out, skip_bad=True)
    assert len(summary.written) == 2
    assert sorted(p for p, _ in summary.skipped) == sorted(bad)
    listed = (out / "skipped.txt").read_text()
    for path in bad:
        assert str(path) in listed
        assert not (out / "labels" / Path(path.name).with_suffix(".png")).exists()


def test_prediction_unusual_modes_and_exif(tmp_path, helpers, segmenter) -> None:
    root = tmp_path / "in"
    for kind, name in MODES.items():
        helpers.write_mode_image(kind, root / name, helpers.rgb_array(16, 24))
    helpers.exif_rotated_jpeg(root / "rot.jpg", helpers.rgb_array(16, 24))
    out = tmp_path / "out"
    summary = _predict(segmenter, [root], out)
    assert len(summary.written) == len(MODES) + 1 and not summary.skipped
    for name in MODES.values():
        labels = np.asarray(Image.open(out / "labels" / Path(name).with_suffix(".png")))
        assert labels.shape == (16, 24)
    rotated = np.asarray(Image.open(out / "labels" / "rot.png"))
    assert rotated.shape == (24, 16)  # the upright orientation, as the user sees the photo
