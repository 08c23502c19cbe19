"""Out of disk space, and paths read from files that try to leave their folder."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from stego.errors import StegoError

Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def little_space(monkeypatch):
    """shutil.disk_usage reports 1 KB free everywhere."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 1000, 1000))


def _dataset(tmp_path: Path, helpers, n: int = 6):
    from stego.data import PairTransform, build_dataset

    images = helpers.write_folder(tmp_path / "img", n, size=(32, 32))
    return build_dataset("folder", images, transform=PairTransform(32, crop="center"))


# ----------------------------------------------------------------------------- out of space


def test_feature_cache_out_of_space(tmp_path, helpers, little_space) -> None:
    from stego.features.cache import FeatureCache
    from stego.models.backbone import build_backbone

    root = tmp_path / "cache"
    backbone, dataset = build_backbone("tiny-vit", pretrained=False), _dataset(tmp_path, helpers)
    with pytest.raises(StegoError, match="not enough disk space") as info:
        FeatureCache.build(backbone, dataset, root, dataset_name="folder", split="all",
                           resolution=32, shard_size=4, progress=False)  # fmt: skip
    assert str(root) in str(info.value)
    assert not list(root.glob("*.npy")) and not helpers.stray_temps(root)
    with pytest.raises(StegoError, match="manifest.json missing"):  # refused before writing
        FeatureCache.open(root)


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_feature_cache_disk_full_mid_write_leaves_no_torn_shard(
    tmp_path, helpers, monkeypatch
) -> None:
    """The disk fills while a shard is being finished: no shard or temp file is left behind and
    no partial cache is ever opened."""
    from stego.features import cache as fc
    from stego.features import shards
    from stego.models.backbone import build_backbone

    monkeypatch.setattr(shards, "save_npy", _enospc)
    root = tmp_path / "cache"
    with pytest.raises((StegoError, OSError)):
        fc.FeatureCache.build(build_backbone("tiny-vit", pretrained=False),
                              _dataset(tmp_path, helpers), root, dataset_name="folder",
                              split="all", resolution=32, shard_size=4, progress=False)  # fmt: skip
    assert not list(root.glob("*.npy")) and not helpers.stray_temps(root)
    with pytest.raises(StegoError):
        fc.FeatureCache.open(root)


def test_disk_full_while_writing_is_a_stego_error(tmp_path, monkeypatch) -> None:
    from stego.atomic import atomic_write

    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(StegoError, match="space"):
        with atomic_write(tmp_path / "x.bin") as handle:
            handle.write(b"abc")


def test_atomic_write_disk_full_keeps_old_file(tmp_path, monkeypatch) -> None:
    from stego.atomic import atomic_write

    target = tmp_path / "last.ckpt"
    target.write_bytes(b"good")
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises((OSError, StegoError)):
        with atomic_write(target) as handle:
            handle.write(b"half")
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_checkpoint_io_disk_full_keeps_last_good(tmp_path, monkeypatch) -> None:
    from stego.train.trainer import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.ones(3)}}, target)
    monkeypatch.setattr(torch, "save", _enospc)
    with pytest.raises((OSError, StegoError)):
        io.save_checkpoint({"global_step": 4, "state_dict": {"w": torch.zeros(3)}}, target)
    assert torch.load(target, weights_only=True)["global_step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_checkpoint_io_out_of_space_is_a_stego_error(tmp_path, little_space) -> None:
    from stego.train.trainer import AtomicCheckpointIO

    target = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(StegoError, match="disk space"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(1000)}}, target)
    assert not target.exists()


def test_save_pretrained_out_of_space_is_a_stego_error(tmp_path, helpers, little_space) -> None:
    from stego.models.pretrained import save_pretrained

    with pytest.raises(StegoError, match="disk space"):
        save_pretrained(helpers.tiny_segmenter(), tmp_path / "model")
    assert not (tmp_path / "model" / "config.json").exists()


# ----------------------------------------------------------------------------- five-crop paths


@pytest.fixture
def crops(tmp_path, helpers) -> Path:
    from stego.data import write_five_crops

    images = helpers.write_folder(tmp_path / "img", 2, size=(16, 16))
    result = write_five_crops("folder", images, "all", tmp_path / "crops", progress=False)
    return result.folder


@pytest.mark.parametrize(
    "evil_path",
    ["../../../etc/passwd", "img/all/../../../outside.png", "/etc/passwd", "img\\..\\x.png", ""],
)
def test_manifest_path_escape_refused(crops, evil_path) -> None:
    from stego.data import build_dataset

    manifest_file = crops / "all.manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["images"][1]["crops"][2]["image"] = evil_path
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(StegoError, match="leaves the crop folder|outside") as info:
        build_dataset("folder", crops.parent.parent / "img", crop_type="five",
                      crop_dir=crops.parent)  # fmt: skip
    assert "all.manifest.json" in str(info.value)


def test_manifest_symlink_escape_refused(crops, tmp_path) -> None:
    """A path that looks inside but resolves outside through a symlink."""
    from stego.data import build_dataset

    outside = tmp_path / "outside"
    outside.mkdir()
    (crops / "link").symlink_to(outside, target_is_directory=True)
    manifest_file = crops / "all.manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["images"][0]["crops"][0]["image"] = "link/0.png"
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(StegoError, match="outside"):
        build_dataset("folder", tmp_path / "img", crop_type="five", crop_dir=crops.parent)


def test_journal_path_escape_is_not_trusted(tmp_path, helpers) -> None:
    """A journal line naming a path outside the crop folder is redone, never trusted."""
    from stego.data import write_five_crops

    images = helpers.write_folder(tmp_path / "img", 2, size=(16, 16))
    out = tmp_path / "crops"
    folder = write_five_crops("folder", images, "all", out, progress=False).folder
    manifest = json.loads((folder / "all.manifest.json").read_text())
    record = manifest["images"][0]
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"x")
    record["crops"][0]["image"] = "../../secret.png"
    (folder / "all.manifest.json").unlink()
    (folder / "all.progress.jsonl").write_text(json.dumps(record) + "\n")
    result = write_five_crops("folder", images, "all", out, progress=False)
    assert result.n_written == 2  # both images redone, the tampered line ignored
    assert secret.read_bytes() == b"x"
    fresh = json.loads((folder / "all.manifest.json").read_text())
    assert fresh["images"][0]["crops"][0]["image"] == "img/all/0.png"


# ----------------------------------------------------------------------------- prediction paths


@pytest.mark.parametrize("rel", ["../escape.png", "a/../../escape.png", "/tmp/escape.png"])
def test_prediction_output_path_stays_inside(tmp_path, rel) -> None:
    from stego.infer.images import inside

    with pytest.raises(StegoError, match="escapes the output folder"):
        inside(tmp_path / "out", Path(rel))


def test_prediction_symlinked_output_subfolder_refused(tmp_path, helpers, segmenter) -> None:
    from stego.infer.predict import predict_paths

    images = helpers.write_folder(tmp_path / "in", 1, size=(16, 16))
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "labels").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(StegoError, match="escapes"):
        predict_paths(segmenter, [images], out, num_workers=0, progress=False, flip=False)
    assert not list(elsewhere.iterdir())


def test_prediction_inputs_outside_cwd_write_inside_out(tmp_path, helpers, segmenter) -> None:
    """Inputs given as ../ paths or absolute files still write under out/ by their own name."""
    from stego.infer.predict import predict_paths

    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    helpers.write_folder(tmp_path / "in", 1, size=(16, 16))
    single = deep / ".." / ".." / "in" / "img_000.png"
    out = tmp_path / "out"
    summary = predict_paths(segmenter, [str(single)], out, num_workers=0, progress=False,
                            flip=False)  # fmt: skip
    assert len(summary.written) == 1
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["labels/img_000.png", "overlays/img_000.png"]
    from PIL import Image

    assert np.asarray(Image.open(out / "labels/img_000.png")).shape == (16, 16)
