"""Image and label reading: every Pillow mode to RGB, EXIF, and errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stego.data.readers import read_image, read_label, read_mat_array
from stego.errors import StegoError


def test_every_mode_becomes_rgb(mixed_folder: Path) -> None:
    files = sorted(
        p
        for p in mixed_folder.rglob("*")
        if p.is_file() and p.suffix != ".txt" and not p.name.startswith(".")
    )
    assert len(files) == 9
    for path in files:
        image = read_image(path)
        assert image.mode == "RGB" and image.size == (7, 9), path


def test_16bit_and_rgba_values(mixed_folder: Path) -> None:
    grey16 = np.asarray(read_image(mixed_folder / "sub" / "deeper" / "f16.png"))
    expected = np.rint(np.arange(63).reshape(9, 7) * 1000 / 65535 * 255).astype(np.uint8)
    assert np.array_equal(grey16[..., 0], expected) and np.array_equal(grey16[..., 2], expected)
    rgba = np.asarray(read_image(mixed_folder / "sub" / "d_rgba.png"))
    assert np.array_equal(rgba, np.asarray(read_image(mixed_folder / "b.png")))


def test_exif_orientation_applied(tmp_path: Path) -> None:
    path = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (20, 10), (200, 0, 0)).save(path, exif=exif)
    assert read_image(path).size == (10, 20)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(StegoError, match=r"empty\.png is empty"):
        read_image(path)


def test_text_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "fake.jpg"
    path.write_text("hello, not a jpeg")
    with pytest.raises(StegoError, match=r"fake\.jpg is not an image"):
        read_image(path)


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_truncated_file(tmp_path: Path, suffix: str) -> None:
    full = tmp_path / f"full.{suffix}"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        full
    )
    cut = tmp_path / f"cut.{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(StegoError, match=rf"cut\.{suffix}.*(corrupt|truncated)"):
        read_image(cut)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(StegoError, match=r"nope\.png does not exist"):
        read_image(tmp_path / "nope.png")


def test_decompression_bomb_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (40, 40)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(StegoError, match=r"big\.png is larger than .*MAX_IMAGE_PIXELS"):
        read_image(path)


def test_rgb_label_refused(tmp_path: Path) -> None:
    path = tmp_path / "colour_label.png"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(StegoError, match=r"colour_label\.png is a RGB colour image"):
        read_label(path)


def test_label_modes(tmp_path: Path) -> None:
    pal = Image.fromarray(np.array([[0, 3], [2, 1]], np.uint8)).convert("P")
    pal.save(tmp_path / "p.png")
    assert read_label(tmp_path / "p.png").tolist() == [[0, 3], [2, 1]]
    Image.fromarray(np.array([[0, 300]], np.uint16)).save(tmp_path / "i16.png")
    out = read_label(tmp_path / "i16.png")
    assert out.tolist() == [[0, 300]] and out.dtype == np.int64


def test_mat_errors(tmp_path: Path) -> None:
    from scipy.io import savemat

    savemat(tmp_path / "a.mat", {"other": np.zeros(2)})
    with pytest.raises(StegoError, match=r"a\.mat has no array 'img' \(found: other\)"):
        read_mat_array(tmp_path / "a.mat", "img")
    (tmp_path / "b.mat").write_text("garbage")
    with pytest.raises(StegoError, match=r"b\.mat is not a readable"):
        read_mat_array(tmp_path / "b.mat", "img")
