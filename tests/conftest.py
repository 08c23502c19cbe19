"""Shared fixtures: paths to the parity vectors and the CamVid sample, offline hub."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STEGO_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    path = SHARED / "parity"
    if not path.is_dir():
        pytest.fail(f"parity vectors not found at {path}; set STEGO_SHARED to the shared/ folder")
    return path


@pytest.fixture(scope="session")
def load_parity(parity_dir: Path):
    cache: dict[str, dict[str, np.ndarray]] = {}

    def _load(name: str) -> dict[str, np.ndarray]:
        if name not in cache:
            with np.load(parity_dir / name) as data:
                cache[name] = {k: data[k] for k in data.files}
        return cache[name]

    return _load


@pytest.fixture(scope="session")
def camvid_dir() -> Path:
    path = SHARED / "data" / "camvid"
    if not path.is_dir():
        pytest.skip(f"CamVid sample not found at {path}")
    return path
