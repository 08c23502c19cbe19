"""`stego analyze`: patch labels, pair sampling, pair cosines, average precision, files, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stego.data import IGNORE
from stego.errors import StegoError
from stego.eval.analyze import (
    analyze,
    pair_cosines,
    patch_labels,
    pr_stats,
    sample_pairs,
    write_analysis,
)


def ap_distinct(scores: np.ndarray, same: np.ndarray) -> float:
    """AP for distinct scores: rank by score, precision at each positive, mean over positives."""
    hits = same[np.argsort(-scores, kind="stable")].astype(np.float64)
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits > 0].mean())


def ap_ties(scores: np.ndarray, same: np.ndarray) -> float:
    """AP allowing tied scores: each positive takes the precision of "score >= its score"."""
    above = scores[None, :] >= scores[same][:, None]  # (n_pos, P)
    return float(np.mean(above[:, same].sum(1) / above.sum(1)))


def test_ap_equals_independent_computation_on_fixed_scores():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randperm(400, generator=gen).double() / 400  # distinct
    same = torch.rand(400, generator=gen) < 0.3
    stats = pr_stats(scores, same)
    assert stats.ap == pytest.approx(ap_distinct(scores.numpy(), same.numpy()), abs=1e-6)
    # a hand-checked case: hits at ranks 1, 3, 5 -> (1 + 2/3 + 3/5) / 3
    hand = pr_stats(torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]), torch.tensor([1, 0, 1, 0, 1]).bool())
    assert hand.ap == pytest.approx((1 + 2 / 3 + 3 / 5) / 3, abs=1e-6)
    assert hand.recall[0] == 1.0 and hand.precision[0] == pytest.approx(0.6)
    assert np.isnan(pr_stats(scores, torch.zeros(400, dtype=torch.bool)).ap)  # no positives


def test_patch_labels_majority_purity_and_dropping():
    lab = torch.full((1, 4, 6), IGNORE)
    lab[0, :2, :2] = torch.tensor([[1, 1], [1, 2]])  # majority 1, purity 3/4
    lab[0, :2, 2:4] = torch.tensor([[0, 2], [IGNORE, IGNORE]])  # majority IGNORE -> dropped
    lab[0, :2, 4:6] = torch.tensor([[0, 1], [2, IGNORE]])  # all tied: IGNORE first -> dropped
    lab[0, 2:, :2] = 3  # pure class 3
    lab[0, 2:, 2:4] = torch.tensor([[0, 0], [1, 2]])  # majority 0, purity 1/2
    out = patch_labels(lab, 2, min_purity=0.5)
    assert out.label.tolist() == [[[1, IGNORE, IGNORE], [3, 0, IGNORE]]]
    assert out.purity[0, 0].tolist() == [0.75, 0.5, 0.25] and out.purity[0, 1, 1] == 0.5
    assert patch_labels(lab, 2, min_purity=0.6).label.tolist() == [
        [[1, IGNORE, IGNORE], [3, IGNORE, IGNORE]]
    ]  # impure patch dropped
    with pytest.raises(StegoError, match="patches"):
        patch_labels(lab, 4)


def random_patch_labels(n: int = 6, h: int = 5, w: int = 7, classes: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    label = torch.randint(classes, (n, h, w), generator=gen)
    label[torch.rand(n, h, w, generator=gen) < 0.3] = IGNORE  # dropped patches
    return label


def test_sample_pairs_seeded_valid_and_split_within_across():
    label = random_patch_labels()
    flat = label.reshape(-1)
    hw = label.shape[1] * label.shape[2]
    pairs = sample_pairs(
        label, 3001, within_fraction=0.4, generator=torch.Generator().manual_seed(7)
    )
    again = sample_pairs(
        label, 3001, within_fraction=0.4, generator=torch.Generator().manual_seed(7)
    )
    other = sample_pairs(
        label, 3001, within_fraction=0.4, generator=torch.Generator().manual_seed(8)
    )
    assert all(torch.equal(a, b) for a, b in zip(pairs, again, strict=True))
    assert not torch.equal(pairs.first, other.first)
    assert int(pairs.within.sum()) == round(3001 * 0.4)
    assert bool((flat[pairs.first] >= 0).all() and (flat[pairs.second] >= 0).all())  # no dropped
    same_image = pairs.first // hw == pairs.second // hw
    assert torch.equal(same_image, pairs.within)
    assert bool((pairs.first != pairs.second).all())
    assert torch.equal(pairs.same, flat[pairs.first] == flat[pairs.second])
    # every kept patch can be drawn, no dropped one ever is
    drawn = torch.zeros(flat.numel(), dtype=torch.bool)
    drawn[torch.cat([pairs.first, pairs.second])] = True
    assert torch.equal(drawn, flat >= 0)


def test_sample_pairs_needs_two_images_for_across_pairs():
    label = random_patch_labels(n=2)
    label[1] = IGNORE
    with pytest.raises(StegoError, match="two images"):
        sample_pairs(label, 10, generator=torch.Generator().manual_seed(0))
    assert bool(sample_pairs(label, 10, within_fraction=1.0).within.all())


def test_one_hot_features_give_ap_one_and_random_features_the_positive_rate():
    label = random_patch_labels(n=8, h=6, w=6, classes=4, seed=1)
    pairs = sample_pairs(label, 20000, generator=torch.Generator().manual_seed(0))
    onehot = F.one_hot(label.clamp(min=0), 4).permute(0, 3, 1, 2).float()  # (N, 4, h, w)
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(8, 16, 6, 6, generator=gen)
    batches = [torch.arange(i, min(i + 3, 8)) for i in range(0, 8, 3)]  # image ids, 3 per batch
    cos_hot, cos_noise = pair_cosines(
        [lambda ids: onehot[ids], lambda ids: noise[ids]], batches, pairs
    )
    # gathered across batches, the cosines equal the direct ones
    flat_noise = F.normalize(noise, dim=1).flatten(2).transpose(1, 2).reshape(-1, 16)
    direct = (flat_noise[pairs.first] * flat_noise[pairs.second]).sum(1)
    assert torch.allclose(cos_noise, direct, atol=1e-6)
    assert pr_stats(cos_hot, pairs.same).ap == pytest.approx(1.0)
    rate = float(pairs.same.double().mean())
    assert 0.15 < rate < 0.45
    assert pr_stats(cos_noise, pairs.same).ap == pytest.approx(rate, abs=0.025)


# ------------------------------------------------------------------ end to end, on a folder


@pytest.fixture
def labelled_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A `folder` dataset as stego/data/folder.py reads it: RGB PNGs, and single-channel label
    PNGs at the same relative path under a label folder (ids 0..2, 255 = unlabelled)."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(0)
    for k in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(
            images / f"im{k}.png"
        )
        lab = np.zeros((32, 40), np.uint8)
        lab[:, 20:] = 1
        lab[16:, 28:] = 2
        lab[: 4 + 4 * k, :8] = 255
        Image.fromarray(lab).save(labels / f"im{k}.png")
    return images, labels


def test_analyze_matches_an_independent_run_of_its_steps(labelled_folder, tmp_path):
    from test_prediction import tiny_segmenter

    from stego.data import PairTransform, build_dataset
    from stego.models.backbone import Backbone, build_backbone
    from stego.models.pretrained import load

    images, labels = labelled_folder
    model_dir = tiny_segmenter().save_pretrained(tmp_path / "model", include_backbone=True)
    result = analyze(
        "folder", images, label_dir=labels, n_classes=3, backbones=["tiny-vit"], layers=[1, 2],
        resolutions=[32], checkpoint=model_dir, n_images=None, n_pairs=300, seed=4, echo=None,
    )  # fmt: skip
    assert [(s.kind, s.layer) for s in result.settings] == [("feature", 1), ("feature", 2),
                                                           ("code", 2)]  # fmt: skip
    data = build_dataset(
        "folder", images, transform=PairTransform(32), label_dir=labels, n_classes=3
    )
    batch = torch.stack([data[i]["image"] for i in range(4)])
    label = patch_labels(torch.stack([data[i]["label"] for i in range(4)]), 8).label
    pairs = sample_pairs(label, 300, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(4)
    backbone = build_backbone("tiny-vit")
    maps = [Backbone(backbone.model, name="tiny-vit", layer=b)(batch).feat for b in (1, 2)]
    maps.append(load(model_dir).encode(batch, flip=False))
    same = pairs.same.numpy()
    for setting, fmap in zip(result.settings, maps, strict=True):
        vec = F.normalize(fmap, dim=1).flatten(2).transpose(1, 2).reshape(-1, fmap.shape[1])
        cos = (vec[pairs.first] * vec[pairs.second]).sum(1).numpy()
        assert setting.ap == pytest.approx(ap_ties(cos, same), abs=1e-5)
        w = pairs.within.numpy()
        assert setting.ap_within == pytest.approx(ap_ties(cos[w], same[w]), abs=1e-5)
        assert setting.ap_across == pytest.approx(ap_ties(cos[~w], same[~w]), abs=1e-5)
        assert setting.positive_rate == pytest.approx(same.mean())
        assert (setting.n_pairs, setting.n_within) == (300, 150)


def test_cli_writes_three_files_with_the_library_numbers(labelled_folder, tmp_path, capsys):
    from stego.cli.main import main

    images, labels = labelled_folder
    out = tmp_path / "out"
    args = ["analyze", "--dataset", "folder", "--data-root", str(images), "--label-dir",
            str(labels), "--classes", "3", "--backbones", "tiny-vit", "--layers", "1", "2",
            "--resolutions", "16", "32", "--images", "3", "--pairs", "400", "--seed", "1",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "| tiny-vit block 2 @ 32 | 400 |" in capsys.readouterr().out
    expected = analyze(
        "folder", images, label_dir=labels, n_classes=3, backbones=["tiny-vit"], layers=[1, 2],
        resolutions=[16, 32], n_images=3, n_pairs=400, seed=1, echo=None,
    )  # fmt: skip
    data = json.loads((out / "analysis.json").read_text())
    assert data["n_images"] == 3 and data["seed"] == 1
    assert data["settings"] == [s.to_dict() for s in expected.settings]
    assert len(data["settings"]) == 4
    with open(out / "analysis.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["ap"]) for r in rows] == [s.ap for s in expected.settings]
    with Image.open(out / "pr_curves.png") as png:
        assert png.format == "PNG" and png.width > 200


def test_write_analysis_files_are_complete(labelled_folder, tmp_path):
    images, labels = labelled_folder
    result = analyze(
        "folder", images, label_dir=labels, n_classes=3, backbones=["tiny-vit"],
        resolutions=[32], n_pairs=100, echo=None,
    )  # fmt: skip
    paths = write_analysis(result, tmp_path / "o")
    assert sorted(p.name for p in paths.values()) == sorted(
        ["analysis.json", "analysis.csv", "pr_curves.png"]
    )
    assert not list((tmp_path / "o").glob("*.tmp-*"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(backbones=["no-such-vit"]), "valid names: .*tiny-vit"),
        (dict(resolutions=[30]), "not a multiple of the patch size 8 of tiny-vit; use 24 or 32"),
        (dict(layers=[3]), "layer 3 is out of range"),
        (dict(label_dir=None), "needs labels"),
        (dict(n_classes=None), "pass --classes"),
        (dict(n_pairs=0), "n_pairs must be >= 1"),
    ],
)
def test_bad_input_is_a_stego_error_with_the_fix(labelled_folder, kwargs, message):
    images, labels = labelled_folder
    args = dict(label_dir=labels, n_classes=3, backbones=["tiny-vit"], resolutions=[32], echo=None)
    args.update(kwargs)
    with pytest.raises(StegoError, match=message):
        analyze("folder", images, **args)


def test_cli_reports_errors_on_one_line(labelled_folder, tmp_path, capsys):
    from stego.cli.main import main

    images, _ = labelled_folder
    args = ["analyze", "--dataset", "folder", "--data-root", str(images),
            "--backbones", "tiny-vit", "--resolutions", "32", "--out", str(tmp_path)]  # fmt: skip
    code = main(args)
    assert code == 2
    assert "needs labels" in capsys.readouterr().err
    assert main(["analyze", "--dataset", "camvid", "--data-root", str(tmp_path), "--pairs", "0",
                 "--out", str(tmp_path)]) == 2  # fmt: skip
