"""The paper's path on real COCO-Stuff files: crop, train with the cocostuff27 preset, eval.

The data root is a subset of ``../shared/data/coco-sample`` (100 COCO-2017 photos with their
COCO-Stuff labels, in the original implementation's layout): the same folder names, the same
files (linked, never copied into the repository), and curated lists naming only the subset, as
the original's ``curated/train2017/*.txt`` do (one image id a line). CI, which has the sample,
must run these; elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stego.data import DATASETS, IGNORE, build_dataset
from stego.data.readers import read_label

LISTS = ("Coco164kFull_Stuff_Coarse.txt", "Coco164kFull_Stuff_Coarse_7.txt")


def subset_root(sample: Path, root: Path, count: int) -> Path:
    """A data root holding the first ``count`` images of the sample, laid out as the original's."""
    ids = sorted(p.stem for p in (sample / "cocostuff" / "images" / "train2017").glob("*.jpg"))
    for part, suffix in (("images", ".jpg"), ("annotations", ".png")):
        folder = root / "cocostuff" / part / "train2017"
        folder.mkdir(parents=True)
        for image_id in ids[:count]:
            (folder / f"{image_id}{suffix}").symlink_to(
                sample / "cocostuff" / part / "train2017" / f"{image_id}{suffix}"
            )
    curated = root / "cocostuff" / "curated" / "train2017"
    curated.mkdir(parents=True)
    for name in LISTS:
        (curated / name).write_text("".join(f"{i}\n" for i in ids[:count]))
    return root


def test_coco_sample_reads_as_cocostuff27(coco_sample_dir: Path) -> None:
    ds = build_dataset("cocostuff27", coco_sample_dir, "train")
    assert len(ds) == 100
    seen = np.zeros(DATASETS["cocostuff27"].n_classes, dtype=bool)
    for sample in ds.samples:  # every label value is a fine id or unlabelled
        mapped = ds.label_map(read_label(sample.label), sample.label)
        seen[mapped[mapped != IGNORE]] = True
    assert seen[:12].any() and seen[12:].any()  # things and stuff both present


@pytest.mark.slow
def test_cocostuff27_preset_trains_and_evaluates_on_real_files(
    coco_sample_dir: Path, tmp_path: Path
) -> None:
    from stego.cli import main

    root = subset_root(coco_sample_dir, tmp_path / "data", 6)
    run, scores = tmp_path / "run", tmp_path / "eval"
    crop = ["crop", "--dataset", "cocostuff27", "--data-root", str(root), "--no-progress"]
    assert main(crop) == 0
    assert len(list((root / "cropped").rglob("*.png"))) >= 5 * 6
    small = ["data.resolution=56", "data.batch_size=5", "train.knn_k=4", "train.num_neighbors=2"]
    args = ["--preset", "cocostuff27", "--backbone", "imgfocus-saliency-vits14", "--steps", "3"]
    args += ["--data-root", str(root), "--out", str(run), "--quiet"]
    assert main(["train", *args, *[f"--set={s}" for s in small]]) == 0
    assert main(["eval", "--checkpoint", str(run), "--data-root", str(root), "--split", "train",
                 "--out", str(scores), "--resolution", "56", "--no-progress"]) == 0
    metrics = json.loads((scores / "metrics.json").read_text())
    assert metrics["dataset"] == "cocostuff27"
    assert metrics["config"]["model"]["backbone"] == "imgfocus-saliency-vits14"
    cluster = metrics["cluster"]
    assert len(cluster["iou"]) == 27 and 0.0 <= cluster["miou"] <= 100.0
    assert np.asarray(cluster["confusion"]).sum() == cluster["n_pixels"] > 0
