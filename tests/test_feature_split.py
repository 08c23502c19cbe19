"""stego.features.split: one prepared split gives the artefacts' fingerprint and folder once,
and they are those of the code before it (so caches built earlier stay valid)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stego.config import StegoConfig
from stego.features.cache import FeatureCache
from stego.features.split import PreparedSplit
from stego.models.backbone import build_backbone

# Computed by the code before PreparedSplit (stego.features.build.split_fingerprint,
# artifact_root, table_path at commit 44519e1) for the folder below.
EXPECTED_FINGERPRINT = {
    "backbone": "tiny-vit",
    "weights_digest": "random",
    "layer": 2,
    "dataset": "folder",
    "split": "all",
    "crop_type": "none",
    "resolution": 32,
    "interpolation": "bilinear",
    "num_items": 3,
    "items_sha256": "79bf36b2b690ab3c76de91e0269152ee44470f8db41f34d2eafb0a22e34ffa4e",
}
EXPECTED_FOLDER = "folder/all_none_32/tiny-vit_layer2_random"
EXPECTED_NEAREST_FOLDER = "folder/all_none_32_nearest/tiny-vit_layer2_random"


@pytest.fixture()
def config(tmp_path: Path) -> StegoConfig:
    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.png", "sub/b.png", "c.jpg"]):
        Image.fromarray(np.full((40, 48, 3), 30 * i, np.uint8)).save(images / name)
    c = StegoConfig()
    c.data.dataset, c.data.data_root, c.data.split = "folder", str(images), "all"
    c.data.resolution, c.data.cache_dir = 32, str(tmp_path / "cache")
    c.model.backbone = "tiny-vit"
    return c


def test_fingerprint_and_file_names_are_unchanged(config: StegoConfig, tmp_path: Path) -> None:
    split = PreparedSplit.from_config(config, build_backbone("tiny-vit"))
    fp = dict(split.fingerprint)
    assert fp.pop("data_root") == config.data.data_root
    assert fp == EXPECTED_FINGERPRINT
    cache_dir = tmp_path / "cache"
    assert split.folder.relative_to(cache_dir).as_posix() == EXPECTED_FOLDER
    assert split.table_path(5) == split.folder / "neighbors_k5.safetensors"
    run = {"device": "cpu", "batch_size": 2, "num_workers": 0, "progress": False}
    cache = split.feature_cache(True, **run)
    assert cache is not None and cache.root == split.folder / "features"
    assert split.neighbor_table(3, cache=cache, **run).shape == (3, 3)
    assert (split.folder / "neighbors_k3.safetensors").is_file()
    # the cache opens under the fingerprint a fresh split of the same config computes
    again = PreparedSplit.from_config(config, build_backbone("tiny-vit"))
    assert FeatureCache.open(again.features_dir, again.fingerprint).fingerprint == cache.fingerprint
    config.data.interpolation = "nearest"
    nearest = PreparedSplit.from_config(config, build_backbone("tiny-vit"))
    assert nearest.folder.relative_to(cache_dir).as_posix() == EXPECTED_NEAREST_FOLDER


def test_the_dataset_is_read_once(config: StegoConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    import stego.features.split as split_module

    calls = []
    real = split_module.open_split
    monkeypatch.setattr(split_module, "open_split", lambda spec: calls.append(spec) or real(spec))
    split = PreparedSplit.from_config(config, build_backbone("tiny-vit"))
    assert split.folder == split.features_dir.parent and split.fingerprint["num_items"] == 3
    assert split.dataset is split.dataset and len(calls) == 1


def _cli_args(config: StegoConfig) -> list[str]:
    d = config.data
    return ["features", "--dataset", "folder", "--data-root", d.data_root, "--split", "all",
            "--resolution", "32", "--backbone", "tiny-vit", "--cache-dir", d.cache_dir,
            "--num-workers", "0", "--batch-size", "2", "--quiet"]  # fmt: skip


def test_dry_run_prints_size_and_time_and_writes_nothing(
    config: StegoConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    from stego.cli import main

    assert main([*_cli_args(config), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    # 3 items x (32 x 4 x 4) float16 + 32 float32 global features = 3 x 1152 bytes
    assert "3 items x (32, 4, 4) float16 = 3.5 KB on disk" in printed
    assert "free there" in printed and "estimated time: about" in printed
    assert not list(Path(config.data.cache_dir).rglob("*.npy"))


def test_a_cache_that_cannot_fit_is_refused_before_any_work(
    config: StegoConfig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    import stego.atomic
    from stego.cli import main

    usage = shutil.disk_usage(config.data.data_root)
    monkeypatch.setattr(stego.atomic.shutil, "disk_usage", lambda p: usage._replace(free=100))
    assert main(_cli_args(config)) == 2
    err = capsys.readouterr().err
    assert "not enough disk space for the feature cache" in err and "3.5 KB" in err
    assert "stego train --live" in err and "--cache-dir DIR" in err
    assert not list(Path(config.data.cache_dir).rglob("*.npy"))
