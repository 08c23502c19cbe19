"""Where the benchmarks find the shared data: ``$STEGO_SHARED`` or the ``shared/`` folder beside
the repository (the same rule as the tests' ``conftest.py``); every benchmark also takes the
folder as an option."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STEGO_SHARED", REPO.parent / "shared"))
CAMVID = SHARED / "data" / "camvid"  # the CamVid copy with images/, labels/, classes.txt
