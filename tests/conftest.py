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
def chromium() -> str:
    """The Chromium executable for the browser tests."""
    from chromium_cdp import find_chromium

    exe = find_chromium()
    if exe is None:
        skip_unless_ci("Chromium not installed (Debian: apt-get install chromium)")
    return exe
