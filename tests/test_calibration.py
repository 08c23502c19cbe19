"""Label-free shift calibration: the quantile rule, config fragments, figures, "auto" shifts in
training (fresh and resumed) and ``stego calibrate``. Tiny random data and the ``tiny-vit``
backbone; a few seconds in all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from stego.config import load_config
from stego.errors import StegoError
from stego.features.calibration import (
    SHIFT_KEYS,
    TERMS,
    LiveFeatures,
    auto_shift_keys,
    calibrate_shifts,
    histogram_figure,
    resolve_auto_shifts,
    shifts_config,
)

COLORS = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]])


def blob_features(n: int = 12, c: int = 16, hw: int = 6, seed: int = 0) -> list[torch.Tensor]:
    """Feature maps made of 3 well-separated directions (+ noise), two per image."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(3, c, generator=g)
    feats = []
    for i in range(n):
        a, b = i % 3, (i + 1) % 3
        f = torch.empty(c, hw, hw)
        f[:, :, : hw // 2] = dirs[a][:, None, None]
        f[:, :, hw // 2 :] = dirs[b][:, None, None]
        feats.append(f + 0.1 * torch.randn(c, hw, hw, generator=g))
    return feats


def ring_neighbors(n: int, k: int = 4) -> torch.Tensor:
    return torch.stack([torch.arange(i, i + k) % n for i in range(n)])  # rank 0 = itself


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("camvid")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(10):
            label = np.zeros((64, 64), np.uint8)
            a, b = rng.integers(0, 3, 2)
            label[:, :32], label[:, 32:] = a, b
            image = COLORS[label] + rng.integers(-20, 20, (64, 64, 3))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
                root / "images" / split / f"{i:02d}.png")
            Image.fromarray(label).save(root / "labels" / split / f"{i:02d}.png")
    return root


def tiny(root: Path, tmp: Path, steps: int = 2, **extra: object) -> list[str]:
    values: dict[str, object] = {
        "data.dataset": "camvid", "data.data_root": str(root), "data.resolution": 32,
        "data.batch_size": 4, "data.num_workers": 0, "data.cache_dir": str(tmp / "cache"),
        "model.backbone": "tiny-vit", "model.code_dim": 8, "train.steps": steps,
        "train.knn_k": 5, "train.num_neighbors": 3, "train.val_every": 0,
        "train.checkpoint_every": 1, "train.figure_every": 0, "train.accelerator": "cpu",
        "loss.feature_samples": 5, "loss.neg_samples": 2, "loss.pos_intra_shift": "auto",
        "loss.neg_inter_shift": "auto",
    }
    values.update(extra)
    return [f"{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"
            for k, v in values.items()]


# --------------------------------------------------------------------------- the rule
def test_attracted_fraction_equals_same_pseudo_class_fraction() -> None:
    feats = blob_features()
    cal = calibrate_shifts(feats, ring_neighbors(len(feats)), 3, num_neighbors=3, n_samples=5,
                           batch_size=6, n_batches=4, kmeans_images=12, seed=0)
    assert set(cal.shifts) == set(TERMS) == set(cal.same_fraction) == set(cal.fd)
    for term in TERMS:
        attracted = float((cal.fd[term] > cal.shifts[term]).float().mean())
        assert attracted == pytest.approx(cal.same_fraction[term], abs=0.02)
        assert 0.0 < cal.same_fraction[term] < 1.0
    # self pairs share a pseudo-class more often than random pairs: a lower self threshold
    assert cal.same_fraction["self"] > cal.same_fraction["random"]
    again = calibrate_shifts(feats, ring_neighbors(len(feats)), 3, num_neighbors=3, n_samples=5,
                             batch_size=6, n_batches=4, kmeans_images=12, seed=0)
    assert again.shifts == cal.shifts  # seeded: exact replay
    assert cal.as_tuple() == (cal.shifts["self"], cal.shifts["knn"], cal.shifts["random"])


def test_bad_inputs_are_refused() -> None:
    feats = blob_features(n=4)
    with pytest.raises(StegoError, match="at least 2 clusters"):
        calibrate_shifts(feats, ring_neighbors(4), 1)
    with pytest.raises(StegoError, match="at least 2 images"):
        calibrate_shifts(feats[:1], ring_neighbors(1, 1), 3)


def test_config_fragment_and_histogram(tmp_path: Path) -> None:
    feats = blob_features()
    cal = calibrate_shifts(feats, ring_neighbors(len(feats)), 3, num_neighbors=3, n_samples=5,
                           batch_size=6, n_batches=2, kmeans_images=12)
    fragment = shifts_config(cal)
    assert list(fragment["loss"]) == [SHIFT_KEYS[t] for t in TERMS]
    path = tmp_path / "frag.yaml"
    path.write_text(yaml.safe_dump(fragment))
    config = load_config("camvid", path)  # usable with `stego train --config`
    assert config.loss.neg_inter_shift == fragment["loss"]["neg_inter_shift"]
    png = histogram_figure(cal, tmp_path / "sub" / "hist.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "sub").glob("*.tmp*"))  # written atomically


def test_config_accepts_auto_only_for_shifts() -> None:
    config = load_config(overrides=["loss.pos_inter_shift=auto", "loss.neg_inter_shift=0.3"])
    assert auto_shift_keys(config) == ["pos_inter_shift"]
    with pytest.raises(StegoError, match="must be float \\| 'auto'"):
        load_config(overrides=["loss.pos_inter_shift=automatic"])
    with pytest.raises(StegoError, match="must be"):
        load_config(overrides=["loss.pos_inter_weight=auto"])


def test_resolve_reuses_saved_values_and_live_features() -> None:
    config = load_config(overrides=["loss.pos_intra_shift=auto", "loss.neg_inter_shift=auto"])
    saved = {"loss": {"pos_intra_shift": 0.5, "neg_inter_shift": 0.25}}
    assert resolve_auto_shifts(config, [], torch.zeros(0, 2), 3, saved=saved, log=None) is None
    assert (config.loss.pos_intra_shift, config.loss.neg_inter_shift) == (0.5, 0.25)

    class Doubler(torch.nn.Module):
        calls = 0

        def forward(self, x):  # noqa: ANN001
            Doubler.calls += 1
            return type("Out", (), {"feat": 2 * x})()

    data = [{"image": torch.full((3, 2, 2), float(i))} for i in range(3)]
    live = LiveFeatures(Doubler(), data)
    assert len(live) == 3 and torch.equal(live[2], torch.full((3, 2, 2), 4.0))
    live[2]
    assert Doubler.calls == 1  # computed once, then kept


# --------------------------------------------------------------------------- training and CLI
@pytest.mark.parametrize("cached", [False, True])
def test_training_resolves_auto_and_saves_the_values(data_root: Path, tmp_path: Path,
                                                     cached: bool, capsys) -> None:
    from stego.train.trainer import train

    overrides = tiny(data_root, tmp_path, 2, **{"train.use_feature_cache": cached})
    run = train(load_config(overrides=overrides), tmp_path / "run", progress=False)
    expected = "auto shifts (label-free calibration, 5 pseudo-classes for 11 clusters)"
    assert expected in capsys.readouterr().out
    saved = yaml.safe_load((run / "config.yaml").read_text())["loss"]
    assert isinstance(saved["pos_intra_shift"], float)
    assert isinstance(saved["neg_inter_shift"], float)
    assert saved["pos_inter_shift"] == 0.02  # not "auto": untouched
    # resuming with the same "auto" config reuses the saved values (no recalibration)
    train(load_config(overrides=tiny(data_root, tmp_path, 3,
                                     **{"train.use_feature_cache": cached})),
          run, resume=True, progress=False)
    assert "taken from the resumed run" in capsys.readouterr().out
    assert yaml.safe_load((run / "config.yaml").read_text())["loss"] == saved


def test_cli_calibrate_writes_shifts_and_figure(data_root: Path, tmp_path: Path, capsys) -> None:
    from stego.cli import main

    out = tmp_path / "cal"
    code = main(["calibrate", "--dataset", "camvid", "--data-root", str(data_root),
                 "--backbone", "tiny-vit", "--resolution", "32", "--clusters", "3",
                 "--num-neighbors", "3", "--feature-samples", "5", "--batches", "2",
                 "--no-pointwise", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
                 "--quiet"])
    assert code == 0
    text = capsys.readouterr().out
    assert "neg_inter_shift" in text and "same fraction" in text
    fragment = yaml.safe_load((out / "shifts.yaml").read_text())
    assert set(fragment["loss"]) == {*SHIFT_KEYS.values(), "pointwise"}
    assert (out / "shift_histograms.png").is_file()
    assert list((tmp_path / "cache").rglob("manifest.json"))  # the cache was built there
    assert main(["calibrate", "--dataset", "camvid", "--data-root", str(data_root),
                 "--backbone", "tiny-vit", "--resolution", "32", "--clusters", "1",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 2


def test_kmeans_probe_refits_the_centroids(data_root: Path, tmp_path: Path, capsys) -> None:
    from stego.models.pretrained import load
    from stego.train.trainer import train

    overrides = tiny(data_root, tmp_path, 2, **{"train.use_feature_cache": True,
                                                "train.kmeans_probe": True})
    run = train(load_config(overrides=overrides), tmp_path / "km", progress=False)
    assert "refit by spherical k-means" in capsys.readouterr().out
    centroids = load(run / "model").cluster_probe.clusters.detach()
    # k-means centroids are unit-norm; the gradient-trained probe's randn rows are not
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(len(centroids)))


def test_calibrate_takes_batch_and_table_size_from_the_config(data_root: Path,
                                                               tmp_path: Path) -> None:
    """`stego calibrate` (calibrate_split) builds the train.knn_k table where training reads it
    and samples data.batch_size images per batch: the same shifts as calibrate_shifts called
    directly with those values, and other shifts with the batch it used to hard-code (16)."""
    from stego.features.cache import FeatureCache
    from stego.features.calibration import calibrate_split
    from stego.features.neighbors import NeighborTable

    config = load_config(overrides=[f"{k}={v}" for k, v in {
        "data.dataset": "camvid", "data.data_root": str(data_root), "data.resolution": 32,
        "data.batch_size": 4, "data.cache_dir": str(tmp_path / "cache"),
        "model.backbone": "tiny-vit", "train.knn_k": 5, "train.num_neighbors": 3,
        "loss.feature_samples": 5, "train.seed": 3}.items()])
    cal, pseudo = calibrate_split(config, 4, n_batches=2, progress=False)
    assert pseudo == 2
    (table,) = (tmp_path / "cache").rglob("neighbors_k*.safetensors")
    assert table.name == "neighbors_k5.safetensors"
    cache = FeatureCache.open(table.parent / "features")
    nbrs = NeighborTable.load(table).indices
    assert nbrs.shape == (10, 5)
    kw = dict(num_neighbors=3, n_samples=5, pointwise=True, n_batches=2, seed=3)
    assert cal.shifts == calibrate_shifts(cache, nbrs, 2, batch_size=4, **kw).shifts
    assert cal.shifts != calibrate_shifts(cache, nbrs, 2, batch_size=16, **kw).shifts


def test_pseudo_class_count_is_half_the_segments_at_most_five() -> None:
    from stego.features.calibration import MAX_PSEUDO_CLASSES, pseudo_class_count

    # K <= 11 keeps the rule chosen on CamVid; more segments stop at the cap, whose shifts
    # were better on COCO photos at K = 27 (docs/benchmarks.md)
    assert [pseudo_class_count(k) for k in (2, 3, 8, 11)] == [2, 2, 4, 5]
    assert pseudo_class_count(27) == pseudo_class_count(100) == MAX_PSEUDO_CLASSES == 5
