"""Several processes (``--devices 2`` on the CPU: Lightning's ddp over gloo) write what one
process writes: the same feature-cache shards, byte for byte, and resume an interrupted run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stego.cli import main

REPO = Path(__file__).resolve().parents[1]


def _run_two_processes(args: list[str]) -> str:
    """``stego ARGS --devices 2 --accelerator cpu`` in a fresh interpreter; its output."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "stego.cli", *args, "--devices", "2", "--accelerator", "cpu"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{exc}: {exc.stdout!r} {exc.stderr!r}") from None
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(10):  # noise, so that every item's features differ
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
            folder / f"{i:02d}.png"
        )
    return folder


def _features_args(images: Path, out: Path) -> list[str]:
    return ["features", "--dataset", "folder", "--data-root", str(images), "--split", "all",
            "--resolution", "32", "--backbone", "tiny-vit", "--out", str(out),
            "--num-workers", "0", "--batch-size", "2", "--shard-size", "3"]  # fmt: skip


def test_two_processes_resume_a_feature_cache_to_one_process_bytes(
    images: Path, tmp_path: Path
) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*_features_args(images, one), "--quiet"]) == 0
    # an interrupted run: shards 1 and 3 (of 0..3) missing, a half-written temp file, the
    # manifest not complete
    shutil.copytree(one, two)
    for name in ("feats-00001.npy", "global-00001.npy", "feats-00003.npy", "global-00003.npy"):
        (two / name).unlink()
    (two / ".feats-00003.npy.tmp-1234").write_bytes(b"torn")
    manifest = json.loads((two / "manifest.json").read_text())
    (two / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    kept = (two / "feats-00000.npy").stat().st_mtime_ns

    printed = _run_two_processes(_features_args(images, two))

    assert printed.count("feature cache ready") == 1  # one summary (rank 0)
    assert "2/4 shards" in printed  # only the missing shards were computed
    assert (two / "feats-00000.npy").stat().st_mtime_ns == kept
    names = sorted(p.name for p in one.iterdir())
    assert sorted(p.name for p in two.iterdir()) == names  # the torn temp file is gone
    for name in names:
        if name != ".lock":
            assert (two / name).read_bytes() == (one / name).read_bytes(), name
