"""One quick check on the real CamVid sample (../shared/data/camvid)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stego.data import DATASETS, IGNORE, PairTransform, build_dataset
from stego.data.readers import read_label


def test_camvid_train_split(camvid_dir: Path) -> None:
    ds = build_dataset("camvid", camvid_dir, "train")
    assert len(ds) == 367
    seen = np.zeros(DATASETS["camvid"].n_classes, dtype=bool)
    for sample in ds.samples:  # labels only (fast): every value is a class or void
        mapped = ds.label_map(read_label(sample.label), sample.label)
        seen[mapped[mapped != IGNORE]] = True
    assert seen.all()
    item = build_dataset("camvid", camvid_dir, "val", transform=PairTransform(320))[0]
    assert (
        item["image"].shape == (3, 320, 320)
        and 0.0 <= float(item["image"].min()) <= float(item["image"].max()) <= 1.0
    )
    assert int(item["label"].min()) >= IGNORE and int(item["label"].max()) < 11
