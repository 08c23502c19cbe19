"""Shared fixtures: the shipped parity vectors, the real CamVid folder (../shared), offline hub."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
# The parity vectors ship with the tests; STEGO_PARITY points at another set.
PARITY = Path(os.environ.get("STEGO_PARITY", REPO / "tests" / "data" / "parity"))
# The real CamVid images may not be redistributed: they live beside the checkout, in ../shared.
SHARED = Path(os.environ.get("STEGO_SHARED", REPO.parent / "shared"))
CAMVID = SHARED / "data" / "camvid"
COCO_SAMPLE = SHARED / "data" / "coco-sample"


def in_ci() -> bool:
    """True where the CI script runs the suite (CI=true): missing test inputs are failures there."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    if not PARITY.is_dir():
        pytest.fail(f"parity vectors not found at {PARITY}; unset STEGO_PARITY to use the shipped")
    return PARITY


@pytest.fixture(scope="session")
def load_parity(parity_dir: Path):
    cache: dict[str, dict[str, np.ndarray]] = {}

    def _load(name: str) -> dict[str, np.ndarray]:
        if name not in cache:
            with np.load(parity_dir / name) as data:
                cache[name] = {k: data[k] for k in data.files}
        return cache[name]

    return _load


def skip_unless_ci(reason: str) -> None:
    """Skip a test whose input is missing here; in CI, which must run it, fail instead."""
    if in_ci():
        pytest.fail(f"CI=true, so this test must run, but: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def camvid_dir() -> Path:
    """The real CamVid folder (../shared/data/camvid)."""
    if not CAMVID.is_dir():
        skip_unless_ci(f"real CamVid not found at {CAMVID} (STEGO_SHARED: the shared/ folder)")
    return CAMVID


@pytest.fixture(scope="session")
def coco_sample_dir() -> Path:
    """The 100 real COCO-Stuff photos (../shared/data/coco-sample), the original's layout."""
    if not (COCO_SAMPLE / "cocostuff").is_dir():
        skip_unless_ci(
            f"the COCO-Stuff sample is not at {COCO_SAMPLE} (STEGO_SHARED: the shared/ folder)"
        )
    return COCO_SAMPLE


@pytest.fixture(scope="session")
def ls_decode():
    """Label Studio's own brush reader (label-studio-converter, installed without its
    dependencies: the brush module needs only numpy)."""
    try:
        from label_studio_converter.brush import decode_rle
    except ImportError:
        skip_unless_ci(
            "label-studio-converter not installed (pip install --no-deps label-studio-converter)"
        )
    return decode_rle


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium executable for the browser tests."""
    from chromium_cdp import find_chromium

    exe = find_chromium()
    if exe is None:
        skip_unless_ci("Chromium not installed (Debian: apt-get install chromium)")
    return exe


def write_test_images(folder: Path, n: int = 6, size: tuple[int, int] = (64, 48)) -> None:
    """``n`` small photos-like images (two kinds of things: red left, blue right, noise), half
    of them in a nested folder, as PNG and JPEG."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "nested").mkdir(parents=True)
    for i in range(n):
        img = np.zeros((size[1], size[0], 3), np.uint8)
        split = size[0] // 2 + (i - n // 2) * 4
        img[:, :split] = (200, 30, 30)
        img[:, split:] = (30, 30, 200)
        img[: size[1] // 4] = (30, 190, 40)  # a green band on top
        img = np.clip(img + rng.integers(0, 40, img.shape), 0, 255).astype(np.uint8)
        target = folder / ("nested" if i % 2 else ".") / f"img{i}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(img).save(target)


@pytest.fixture(scope="session")
def segment_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real `stego segment` output (tiny random ViT, 3 clusters, 6 images), made once per
    session. Tests that change it work on a copy (``copy_results``)."""
    from stego.segment import segment_folder

    root = tmp_path_factory.mktemp("results")
    write_test_images(root / "images")
    segment_folder(root / "images", root / "out", clusters=3, backbone="tiny-vit", steps=4,
                   resolution=32, progress=False)  # fmt: skip
    return root / "out"


@pytest.fixture()
def copy_results(segment_results: Path, tmp_path: Path) -> Path:
    """A copy of ``segment_results`` this test may change (the images stay where they are)."""
    import shutil

    target = tmp_path / "results"
    shutil.copytree(segment_results, target, ignore=shutil.ignore_patterns("work"))
    return target
