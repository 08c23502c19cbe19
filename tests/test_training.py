"""Training: live and cached paths, exact resume, DDP on CPU, NaN stop, CLI.

A tiny CamVid-layout dataset of 12 synthetic 64x64 images whose labels are colour blocks, the
random ``tiny-vit`` backbone (patch 8) at resolution 32 (4x4 features), a few steps each.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stego.config import StegoConfig, load_config
from stego.errors import StegoError
from stego.train.pairs import StepSampler, split_holdout
from stego.train.trainer import StegoModule, train

REPO = Path(__file__).resolve().parents[1]
COLORS = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("camvid")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(12):
            label = np.zeros((64, 64), np.uint8)
            a, b = rng.integers(0, 3, 2)
            label[:, :32], label[:, 32:], label[:16] = a, b, (a + 1) % 3
            image = COLORS[label] + rng.integers(-20, 20, (64, 64, 3))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
                root / "images" / split / f"{i:02d}.png"
            )
            Image.fromarray(label).save(root / "labels" / split / f"{i:02d}.png")
    return root


def tiny_overrides(root: Path, steps: int = 4, **extra: object) -> list[str]:
    values: dict[str, object] = {
        "data.dataset": "camvid",
        "data.data_root": str(root),
        "data.resolution": 32,
        "data.batch_size": 4,
        "data.num_workers": 0,
        "model.backbone": "tiny-vit",
        "model.code_dim": 8,
        "train.steps": steps,
        "train.knn_k": 5,
        "train.num_neighbors": 3,
        "train.val_every": 2,
        "train.checkpoint_every": 2,
        "train.log_every": 1,
        "train.figure_every": 2,
        "train.accelerator": "cpu",
        "train.use_feature_cache": False,
        "loss.feature_samples": 5,
        "loss.neg_samples": 2,  # small: the machine is shared
    }
    values.update(extra)
    return [
        f"{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"
        for k, v in values.items()
    ]


def tiny_config(root: Path, steps: int = 4, **extra: object) -> StegoConfig:
    return load_config(overrides=tiny_overrides(root, steps, **extra))


def losses(run: Path, key: str = "loss/total") -> list[float]:
    rows = list(csv.DictReader(open(run / "logs" / "csv" / "metrics.csv")))
    return [float(r[key]) for r in rows if r.get(key)]


def trained_state(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return ckpt["state_dict"]


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


# --------------------------------------------------------------------------- units
def test_sampler_is_a_function_of_step_and_splits_over_ranks() -> None:
    full = StepSampler(list(range(10)), 4, seed=1)
    it = iter(full)
    first = [next(it) for _ in range(12)]  # 3 steps, crossing an epoch boundary
    resumed = iter(StepSampler(list(range(10)), 4, seed=1, start_step=2))
    assert [next(resumed) for _ in range(4)] == first[8:]
    ranks = [iter(StepSampler(list(range(10)), 4, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    step0 = [next(ranks[0]) for _ in range(2)] + [next(ranks[1]) for _ in range(2)]
    assert step0 == first[:4]
    assert sorted(i for i, e in first[:10]) == list(range(10)) and first[10][1] == 1


def test_holdout_is_seeded_and_disjoint() -> None:
    train_idx, held = split_holdout(12, 64, seed=0)
    assert len(held) == 2 and not set(train_idx) & set(held)
    assert split_holdout(12, 64, seed=0) == (train_idx, held)


def test_nan_loss_stops_with_clear_error(data_root: Path, tmp_path: Path, monkeypatch) -> None:
    original = StegoModule._features

    def poisoned(self, batch):  # noqa: ANN001
        feat, feat_pos = original(self, batch)
        return (feat * float("nan"), feat_pos) if self.global_step == 3 else (feat, feat_pos)

    monkeypatch.setattr(StegoModule, "_features", poisoned)
    run = tmp_path / "nan"
    with pytest.raises(StegoError, match=r"diverged at step 3.*learning rate.*float16 overflow"):
        train(tiny_config(data_root, 6), run, progress=False)
    state = trained_state(run)  # the last good checkpoint (step 2) is kept
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state.values())


# --------------------------------------------------------------------------- runs
def test_live_run_writes_everything(data_root: Path, tmp_path: Path) -> None:
    run = train(tiny_config(data_root, 4), tmp_path / "live", progress=False)
    values = losses(run)
    assert len(values) == 4 and all(np.isfinite(values))
    assert losses(run, "val/cluster_miou")  # validation on the held-out part ran
    assert (run / "config.yaml").is_file() and (run / "model" / "model.safetensors").is_file()
    saved = load_config(file=run / "config.yaml")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert StegoConfig.from_dict(ckpt["hyper_parameters"]) == saved
    assert not any(k.startswith("backbone.") for k in ckpt["state_dict"])
    with pytest.raises(StegoError, match="already holds a run"):
        train(tiny_config(data_root, 4), run, progress=False)


def test_cache_and_live_give_the_same_losses(data_root: Path, tmp_path: Path) -> None:
    live = train(tiny_config(data_root, 4), tmp_path / "live", progress=False)
    cached = train(
        tiny_config(data_root, 4, **{"train.use_feature_cache": True}),
        tmp_path / "cached",
        progress=False,
    )
    assert list((data_root / "stego-cache").rglob("manifest.json"))  # the cache was built
    # float16 features in the cache: the curves agree to ~1e-5 here; 1e-3 allowed
    np.testing.assert_allclose(losses(cached), losses(live), atol=1e-3)
    np.testing.assert_allclose(
        losses(cached, "probe/linear_loss"), losses(live, "probe/linear_loss"), atol=1e-3
    )


def test_resume_reaches_the_same_weights(data_root: Path, tmp_path: Path) -> None:
    full = train(tiny_config(data_root, 6), tmp_path / "full", progress=False)
    part = train(tiny_config(data_root, 2), tmp_path / "part", progress=False)
    with pytest.raises(StegoError, match="differs"):
        train(tiny_config(data_root, 6, **{"train.lr": 1e-3}), part, resume=True, progress=False)
    train(tiny_config(data_root, 6), part, resume=True, progress=False)
    assert_same_state(trained_state(part), trained_state(full), atol=1e-6)
    assert losses(part)[-4:] == pytest.approx(losses(full)[-4:], abs=1e-6)


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one(data_root: Path, tmp_path: Path) -> None:
    """Lightning DDP (gloo) with 2 processes vs 1 process on the same global batches.

    Exact up to float reduction order (atol 1e-6; measured 6e-8) when every loss term is a mean
    over images: dropout 0 (masks are per rank), no random term (derangements are within a
    rank's half-batch) and pointwise off (its centring adds back a batch-wide mean). With those
    on, DDP is a valid but different estimate of the same loss.
    """
    extra = {
        "model.dropout": 0.0,
        "loss.neg_inter_weight": 0.0,
        "loss.pointwise": False,
        "train.val_every": 0,
    }
    args = [f"--set={o}" for o in tiny_overrides(data_root, 3, **extra)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"ddp{devices}"
        cmd = [
            sys.executable,
            "-m",
            "stego.cli",
            "train",
            "--out",
            str(out),
            "--quiet",
            "--devices",
            str(devices),
            *args,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = trained_state(out)
    assert_same_state(results[2], results[1], atol=1e-6)


def test_cli_train_and_errors(data_root: Path, tmp_path: Path) -> None:
    from stego.cli import main

    args = [f"--set={o}" for o in tiny_overrides(data_root, 2)]
    assert main(["train", "--out", str(tmp_path / "cli"), "--quiet", "--steps", "2", *args]) == 0
    assert load_config(file=tmp_path / "cli" / "config.yaml").train.steps == 2
    assert main(["train", "--out", str(tmp_path / "x"), "--preset", "nope"]) == 2
    assert main(["train", "--out", str(tmp_path / "y"), "--set", "train.stepz=1"]) == 2
