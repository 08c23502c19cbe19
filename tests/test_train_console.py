"""`stego train` by default: feature cache built on first use and reused, quiet console, summary.

Same tiny CamVid-layout data as tests/test_training.py (12 synthetic 64x64 images, the random
``tiny-vit`` backbone at resolution 32).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stego.cli import main
from stego.features.fingerprint import default_cache_root
from stego.train.pairs import usable_workers

COLORS = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]])

# What Lightning and PyTorch print in a run when nothing hides it (issue #12).
NOISE = (
    "GPU available",
    "TPU available",
    "litlogger",
    "LeafSpec",
    "max_steps=",
    "weights_only",
    "Warning",
    "worker processes",
)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("camvid")
    rng = np.random.default_rng(0)
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    for i in range(12):
        label = np.zeros((64, 64), np.uint8)
        a, b = rng.integers(0, 3, 2)
        label[:, :32], label[:, 32:] = a, b
        image = COLORS[label] + rng.integers(-20, 20, (64, 64, 3))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
            root / "images" / "train" / f"{i:02d}.png"
        )
        Image.fromarray(label).save(root / "labels" / "train" / f"{i:02d}.png")
    return root


def train_args(root: Path, out: Path, *extra: str) -> list[str]:
    sets = {
        "data.dataset": "camvid",
        "data.resolution": 32,
        "data.batch_size": 4,
        "data.val_images": 0,
        "model.backbone": "tiny-vit",
        "model.code_dim": 8,
        "train.knn_k": 5,
        "train.num_neighbors": 3,
        "train.val_every": 0,
        "train.figure_every": 0,
        "train.accelerator": "cpu",
        "loss.feature_samples": 5,
        "loss.neg_samples": 2,
    }
    args = ["train", "--data-root", str(root), "--out", str(out), "--steps", "3"]
    return args + [f"--set={k}={v}" for k, v in sets.items()] + list(extra)


def test_default_builds_the_cache_once_then_reuses_it_quietly(
    data_root: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    cache = data_root / "stego-cache"
    assert not cache.exists()
    assert main(train_args(data_root, tmp_path / "a")) == 0
    first = capfd.readouterr()
    manifests = list(cache.rglob("features/manifest.json"))
    assert len(manifests) == 1 and list(cache.rglob("neighbors_k5.safetensors"))
    assert "feature cache and neighbour table ready" in first.out
    stamp = manifests[0].stat().st_mtime_ns
    assert main(train_args(data_root, tmp_path / "b")) == 0
    second = capfd.readouterr()
    assert manifests[0].stat().st_mtime_ns == stamp  # not rebuilt
    reuse = [line for line in second.out.splitlines() if line.startswith("reusing")]
    assert len(reuse) == 1 and str(manifests[0].parent.parent) in reuse[0]
    for text in (first.out + first.err, second.out + second.err):
        assert not [word for word in NOISE if word in text], text
    assert "Next:" in second.out and f"stego eval --checkpoint {tmp_path / 'b'}" in second.out


def test_live_skips_the_cache_and_verbose_shows_lightning(
    tmp_path: Path, data_root: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "data"  # a data root without a cache yet
    for sub in ("images/train", "labels/train"):
        (copy / sub).mkdir(parents=True)
        for f in (data_root / sub).iterdir():
            (copy / sub / f.name).write_bytes(f.read_bytes())
    records: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    lightning_log = logging.getLogger("lightning.pytorch")
    lightning_log.addHandler(handler)  # wherever pytest routes logging, these reach us
    try:
        assert main(train_args(copy, tmp_path / "quiet", "--live")) == 0
        quiet = list(records)
        assert main(train_args(copy, tmp_path / "live", "--live", "--verbose")) == 0
    finally:
        lightning_log.removeHandler(handler)
    out = capfd.readouterr()
    assert not list((copy / "stego-cache").rglob("manifest.json"))  # no feature cache
    assert "live backbone every step" in out.out
    # Lightning's banner: hidden by default, shown with --verbose
    assert not any("GPU available" in r for r in quiet)
    assert any("GPU available" in r for r in records[len(quiet):])


def test_read_only_data_root_caches_under_the_user_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "camvid"
    data.mkdir()
    assert default_cache_root(data) == data / "stego-cache"
    monkeypatch.setenv("STEGO_CACHE", str(tmp_path / "user"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as for a read-only folder
    got = default_cache_root(data)
    assert got.parent == tmp_path / "user" / "data" and got.name.startswith("camvid-")
    (data / "stego-cache").mkdir()  # an existing cache folder is still used
    assert default_cache_root(data) == data / "stego-cache"


def test_workers_fit_the_cpus_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert [usable_workers(n) for n in (0, 1, 2, 4)] == [0, 1, 2, 2]


def test_resume_keeps_the_interrupted_runs_csv_log(
    data_root: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    import csv

    run = tmp_path / "run"
    log = ["--set=train.log_every=1", "--quiet"]
    assert main(train_args(data_root, run, *log)) == 0  # 3 steps
    args = train_args(data_root, run, *log, "--resume")
    args[args.index("--steps") + 1] = "5"
    assert main(args) == 0
    folder = run / "logs" / "csv"

    def steps(name: str) -> list[int]:
        with open(folder / name) as f:
            return [int(r["step"]) for r in csv.DictReader(f) if r.get("loss/total")]

    assert steps("metrics-part1.csv") == [0, 1, 2] and steps("metrics.csv") == [3, 4]
    text = "".join(capfd.readouterr())
    assert "exists and is not empty" not in text and "Warning" not in text


def test_training_keeps_nearest_and_bilinear_artefacts_apart(
    data_root: Path, tmp_path: Path
) -> None:
    """Training's fingerprint holds data.interpolation: a nearest run (the paper presets) finds
    neither the cache nor the table of a bilinear run, and builds its own."""
    from stego.config import load_config
    from stego.models.backbone import build_backbone
    from stego.train.datamodule import build_datamodule

    roots = {}
    for how in ("bilinear", "nearest"):
        sets = train_args(data_root, tmp_path / "unused", f"--set=data.interpolation={how}")
        overrides = [a.removeprefix("--set=") for a in sets if a.startswith("--set=")]
        config = load_config(overrides=[*overrides, f"data.data_root={data_root}",
                                        f"data.cache_dir={tmp_path / 'cache'}"])
        data, _ = build_datamodule(config, build_backbone("tiny-vit"), progress=False)
        cache = data.train_pairs.cached.cache
        assert cache.fingerprint["interpolation"] == how
        roots[how] = cache.root.parent
    assert roots["nearest"] != roots["bilinear"]
    for root in roots.values():
        assert (root / "neighbors_k5.safetensors").is_file()
