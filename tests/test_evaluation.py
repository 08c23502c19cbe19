"""Evaluation protocol, its outputs, the figures and the `stego eval` command (tiny, CPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stego.errors import StegoError
from stego.eval.loading import load_for_eval
from stego.eval.outputs import format_table, load_examples, write_outputs
from stego.eval.protocol import evaluate, images_to_uint8
from stego.models.heads import SegmentationHead
from stego.models.probes import ClusterProbe, LinearProbe
from stego.models.segmenter import Segmenter, SegmenterMeta
from stego.viz import colorize, overlay

COLOURS = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # class k = colour k
PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)
NAMES = ["red", "green", "blue"]
HAS_CRF = importlib.util.find_spec("pydensecrf") is not None
HAS_DATA = importlib.util.find_spec("stego.data") is not None and (
    Path(__file__).resolve().parents[1] / "stego" / "data" / "__init__.py"
).is_file()


class ColourOutput(tuple):
    """Stand-in for BackboneOutput (only ``feat`` is read by the Segmenter)."""

    @property
    def feat(self) -> Tensor:
        return self[0]


class ColourBackbone(nn.Module):
    """Backbone stub with the Backbone interface: features = mean colour of each 2x2 patch - 0.5."""

    name, patch_size, embed_dim, num_heads, num_blocks, layer = "colour", 2, 3, 1, 1, 1
    weights_digest = "stub"

    def forward(self, images: Tensor, *, with_keys: bool = False) -> ColourOutput:
        feat = F.avg_pool2d(images, self.patch_size) - 0.5  # (B, 3, h, w)
        return ColourOutput((feat, None, F.normalize(feat.mean((2, 3)), dim=1)))


def colour_model(extra: int = 0, *, linear: bool = True) -> Segmenter:
    """A model whose codes are the colours: cluster probe perfect up to a permutation."""
    probe = ClusterProbe(3, 3 + extra)
    order = [2, 0, 1]  # cluster 0 = blue, 1 = red, 2 = green: Hungarian must undo this
    with torch.no_grad():
        probe.clusters[:3] = COLOURS[order] - 0.5
        if extra:
            probe.clusters[3:] = torch.tensor([0.0, 0.0, 0.0001]) - 1.0  # far from every colour
    lin = None
    if linear:
        lin = LinearProbe(3, 3)
        with torch.no_grad():
            lin.conv.weight.copy_(10 * torch.eye(3).view(3, 3, 1, 1))
            lin.conv.bias.zero_()
    meta = SegmenterMeta(backbone="colour", backbone_layer=None, head_kind="none", code_dim=3,
                         n_clusters=3 + extra, n_classes=3 if linear else None)
    return Segmenter(ColourBackbone(), SegmentationHead(3, 3, kind="none"), probe, lin, meta).eval()


def block_dataset(n: int = 5, size: tuple[int, int] = (16, 16), seed: int = 0) -> list[dict]:
    """Images of 4x4 blocks of pure red/green/blue; labels = colour ids, one ignored block."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        blocks = torch.randint(0, 3, (size[0] // 4, size[1] // 4), generator=g)
        label = blocks.repeat_interleave(4, 0).repeat_interleave(4, 1)  # (H, W)
        image = COLOURS[label].permute(2, 0, 1).contiguous()  # (3, H, W)
        label = label.clone()
        label[:4, :4] = -1
        items.append({"image": image, "label": label, "index": i, "path": f"img{i}.png"})
    return items


def test_perfect_cluster_probe_scores_100() -> None:
    result = evaluate(colour_model(), block_dataset(), n_classes=3, class_names=NAMES,
                      progress=False, batch_size=2)
    assert result.cluster.accuracy == pytest.approx(100.0)
    assert result.cluster.miou == pytest.approx(100.0)
    assert result.cluster.assignment.tolist() == [2, 0, 1]
    assert result.linear is not None and result.linear.miou == pytest.approx(100.0)
    assert result.n_images == 5 and len(result.examples) == 5
    ex = result.examples[0]
    valid = ex.label >= 0
    assert ex.image.dtype == np.uint8 and ex.image.shape == (16, 16, 3)
    assert (ex.cluster[valid] == ex.label[valid]).all()  # mapped to classes
    assert (ex.linear[valid] == ex.label[valid]).all()


def test_no_flip_and_mixed_sizes_full_frame() -> None:
    data = block_dataset(2) + block_dataset(3, size=(16, 24), seed=1) + block_dataset(1, seed=2)
    result = evaluate(colour_model(), data, n_classes=3, progress=False, flip=False,
                      batch_size=8, n_figure_images=3)
    assert result.n_images == 6 and len(result.examples) == 3
    assert result.cluster.accuracy == pytest.approx(100.0)
    assert result.class_names == ["class 0", "class 1", "class 2"]


def test_extra_clusters_inferred_and_rules() -> None:
    strict = evaluate(colour_model(extra=2), block_dataset(), n_classes=3, progress=False)
    assert strict.extra_clusters == 2 and strict.cluster.confusion.shape == (5, 3)
    assert strict.cluster.accuracy == pytest.approx(100.0)
    original = evaluate(colour_model(extra=2), block_dataset(), n_classes=3, progress=False,
                        rule="original")
    assert original.cluster.accuracy == pytest.approx(100.0)
    with pytest.raises(StegoError, match="clusters"):
        evaluate(colour_model(), block_dataset(), n_classes=3, extra_clusters=1, progress=False)
    with pytest.raises(StegoError, match="fewer than"):
        evaluate(colour_model(), block_dataset(), n_classes=4, progress=False)


def test_bad_inputs_raise_stego_error() -> None:
    items = block_dataset(2)
    del items[1]["label"]
    with pytest.raises(StegoError, match="no label"):
        evaluate(colour_model(), items, n_classes=3, progress=False)
    with pytest.raises(StegoError, match="empty"):
        evaluate(colour_model(), [], n_classes=3, progress=False)
    with pytest.raises(StegoError, match="class names"):
        evaluate(colour_model(), block_dataset(1), n_classes=3, class_names=["a"], progress=False)


def test_linear_probe_of_other_classes_is_skipped() -> None:
    model = colour_model(extra=1)
    with pytest.warns(UserWarning, match="linear probe"):
        result = evaluate(model, block_dataset(), n_classes=4, progress=False)
    assert result.linear is None and all(e.linear is None for e in result.examples)


def test_images_to_uint8_recovers_bytes() -> None:
    raw = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    back = images_to_uint8(raw.float() / 255)
    assert (back == raw.permute(0, 2, 3, 1).numpy()).all()
    assert images_to_uint8(torch.full((1, 3, 1, 1), 0.5))[0, 0, 0, 0] == 128


@pytest.mark.skipif(not HAS_CRF, reason="pydensecrf not installed")
@pytest.mark.parametrize("workers,crf_image", [(1, "round"), (2, "round"), (1, "truncate")])
def test_evaluate_with_crf(workers: int, crf_image: str) -> None:
    result = evaluate(colour_model(), block_dataset(3), n_classes=3, progress=False, crf=True,
                      crf_workers=workers, batch_size=2, crf_image=crf_image)
    for scores in (result.cluster, result.linear):
        assert scores is not None and 0.0 <= scores.miou <= 100.0
        assert scores.accuracy > 90.0  # the CRF keeps clean colour blocks intact


def _scores_by_hand(pred: np.ndarray, label: np.ndarray, n: int, hungarian: bool) -> dict:
    """The protocol's numbers from scratch (reference section 9): one confusion matrix over all
    valid pixels (rows = prediction, cols = class), scipy's Hungarian matching (or the identity),
    accuracy and per-class IoU x100 (None where a class has no pixel at all), mIoU over the rest."""
    from scipy.optimize import linear_sum_assignment

    valid = (label >= 0) & (label < n)
    conf = np.zeros((n, n), dtype=np.int64)
    np.add.at(conf, (pred[valid], label[valid]), 1)
    rows, cols = linear_sum_assignment(conf, maximize=True) if hungarian else (range(n),) * 2
    assignment = np.empty(n, dtype=np.int64)
    assignment[list(rows)] = list(cols)
    matched = np.zeros((n, n), dtype=np.int64)  # (class, class) after matching
    np.add.at(matched, assignment, conf)
    tp = np.diag(matched).astype(np.float64)
    union = matched.sum(0) + matched.sum(1) - tp  # tp + fn + fp
    iou = [None if u == 0 else 100.0 * t / u for t, u in zip(tp, union, strict=True)]
    return {
        "accuracy": 100.0 * tp.sum() / valid.sum(),
        "miou": float(np.mean([v for v in iou if v is not None])),
        "iou": iou,
        "assignment": assignment.tolist(),
        "confusion": conf.tolist(),
    }


@pytest.mark.parametrize(
    "crf", [False, pytest.param(True, marks=pytest.mark.skipif(not HAS_CRF, reason="no CRF"))]
)
def test_tiny_vit_model_outputs(tmp_path: Path, crf: bool) -> None:
    """metrics.json and examples.npz of a random tiny-ViT model equal an independent
    computation: the model's own forward pass (+ the dense CRF, applied here image by image),
    a numpy confusion matrix and scipy's Hungarian matching."""
    backbones = pytest.importorskip("stego.models.backbone")
    torch.manual_seed(0)
    backbone = backbones.build_backbone("tiny-vit", pretrained=False)
    head = SegmentationHead(backbone.embed_dim, 8)
    # alpha 10 (not 2): sharper cluster probabilities, so that the CRF keeps all three clusters
    # of this random model instead of flooding the images with one
    meta = SegmenterMeta(backbone="tiny-vit", backbone_layer=None, head_kind="nonlinear",
                         code_dim=8, n_clusters=3, n_classes=3, alpha=10.0)
    model = Segmenter(backbone, head, ClusterProbe(8, 3), LinearProbe(8, 3), meta).eval()
    data = block_dataset(3, size=(32, 32))
    result = evaluate(model, data, n_classes=3, class_names=NAMES, progress=False,
                      crf=crf, crf_workers=1)
    path = write_outputs(result, tmp_path, PALETTE, split="val", checkpoint="mem", config=None)
    metrics = json.loads(path.read_text())

    images = torch.stack([it["image"] for it in data])  # (3, 3, 32, 32)
    labels = np.stack([it["label"].numpy() for it in data])  # (3, 32, 32)
    pictures = np.floor(images.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)
    with torch.no_grad():
        out = model(images, flip=True, size=(32, 32))
    preds = {}
    for probe, log_probs in (("cluster", out.cluster_log_probs), ("linear", out.linear_log_probs)):
        if crf:
            from stego.infer.crf import dense_crf

            preds[probe] = np.stack([dense_crf(pic, lp.exp().numpy()).argmax(0)
                                     for pic, lp in zip(pictures, log_probs, strict=True)])
        else:
            preds[probe] = log_probs.argmax(1).numpy()  # (3, 32, 32)
    assert len(np.unique(preds["cluster"])) == 3  # every cluster used: no tie in the matching

    for probe in ("cluster", "linear"):
        want = _scores_by_hand(preds[probe], labels, 3, hungarian=probe == "cluster")
        got = metrics[probe]
        assert got["confusion"] == want["confusion"] and got["assignment"] == want["assignment"]
        assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-3)
        assert got["miou"] == pytest.approx(want["miou"], abs=1e-3)
        assert list(got["iou"]) == NAMES
        for name, value in zip(NAMES, want["iou"], strict=True):
            assert got["iou"][name] == (None if value is None else pytest.approx(value, abs=1e-3))
        assert got["n_pixels"] == int((labels >= 0).sum())
    assert metrics["crf"] == crf and metrics["split"] == "val" and metrics["n_images"] == 3

    # the figures' data: image bytes, labels, cluster ids mapped to their matched classes
    assignment = np.array(metrics["cluster"]["assignment"])
    back = load_examples(tmp_path / "examples.npz")
    assert [e.name for e in back] == ["img0.png", "img1.png", "img2.png"]
    for i, example in enumerate(back):
        np.testing.assert_array_equal(example.image, pictures[i])
        np.testing.assert_array_equal(example.label, labels[i])
        np.testing.assert_array_equal(example.cluster, assignment[preds["cluster"][i]])
        np.testing.assert_array_equal(example.linear, preds["linear"][i])
    for name in ("confusion.png", "examples.png", "iou.png"):  # matplotlib renders: size only
        assert (tmp_path / name).stat().st_size > 1000
    assert "mIoU" in format_table(result)


def test_colorize_and_overlay() -> None:
    labels = np.array([[0, 1], [2, -1]])
    rgb = colorize(labels, PALETTE)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert rgb[0, 0].tolist() == [255, 0, 0] and rgb[1, 1].tolist() == [0, 0, 0]
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    mixed = overlay(image, labels, PALETTE, alpha=0.5)
    assert mixed[0, 0].tolist() == [178, 50, 50] and mixed[1, 1].tolist() == [100, 100, 100]


def test_load_for_eval_refuses_unknown_paths(tmp_path: Path) -> None:
    with pytest.raises(StegoError, match="no model"):
        load_for_eval(tmp_path)
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(StegoError, match="weights-only"):
        load_for_eval(bad)


def _camvid_like(root: Path, n: int = 3, splits: tuple[str, ...] = ("val",)) -> Path:
    """CamVid-layout splits (images/<split>, labels/<split>) of 48x64 block images, 11 classes."""
    from PIL import Image

    g = np.random.default_rng(0)
    palette = np.random.default_rng(1).integers(0, 256, (11, 3), dtype=np.uint8)
    for split in splits:
        for sub in ("images", "labels"):
            (root / sub / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            label = g.integers(0, 11, (6, 8)).repeat(8, 0).repeat(8, 1).astype(np.uint8)  # (48, 64)
            label[:8, :8] = 255
            image = palette[np.minimum(label, 10)]  # (48, 64, 3)
            Image.fromarray(image).save(root / "images" / split / f"f{i}.png")
            Image.fromarray(label).save(root / "labels" / split / f"f{i}.png")
    return root


def _tiny_camvid_model() -> Segmenter:
    backbones = pytest.importorskip("stego.models.backbone")
    torch.manual_seed(0)
    backbone = backbones.build_backbone("tiny-vit", pretrained=False)
    meta = SegmenterMeta(backbone="tiny-vit", backbone_layer=None, head_kind="nonlinear",
                         code_dim=8, n_clusters=12, n_classes=11, dataset="camvid")
    head = SegmentationHead(backbone.embed_dim, 8)
    return Segmenter(backbone, head, ClusterProbe(8, 12), LinearProbe(8, 11), meta).eval()


@pytest.mark.skipif(not HAS_DATA, reason="stego.data not available yet")
def test_cli_eval_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from stego.cli import main
    from stego.models.pretrained import save_pretrained

    data = _camvid_like(tmp_path / "camvid")
    run = tmp_path / "run"
    save_pretrained(_tiny_camvid_model(), run / "model", include_backbone=True,
                    train_config={"model": {"backbone": "tiny-vit"}})
    out = tmp_path / "eval"
    argv = ["eval", "--checkpoint", str(run), "--data-root", str(data), "--split", "val",
            "--out", str(out), "--resolution", "32", "--batch-size", "2", "--no-progress",
            "--report"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "IoU cluster" in printed and "mIoU" in printed and "bicyclist" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 3 and metrics["split"] == "val" and metrics["crf"] is False
    assert metrics["extra_clusters"] == 1 and metrics["config"]["model"]["backbone"] == "tiny-vit"
    assert metrics["checkpoint"].endswith("model") and "linear" in metrics
    assert len(metrics["cluster"]["iou"]) == 11
    for name in ("confusion.png", "examples.png", "iou.png", "report.html"):
        assert (out / name).is_file()
    assert main(argv[:-1] + ["--full-frame", "--no-flip", "--metric-rule", "original",
                             "--out", str(tmp_path / "ff")]) == 0
    assert json.loads((tmp_path / "ff/metrics.json").read_text())["eval_settings"]["full_frame"]


@pytest.mark.skipif(not HAS_DATA, reason="stego.data not available yet")
def test_cli_eval_lightning_checkpoint(tmp_path: Path) -> None:
    """A Lightning-style .ckpt (state dict + config hyper-parameters) loads weights-only."""
    from stego.cli import main
    from stego.config import StegoConfig

    model = _tiny_camvid_model()
    config = StegoConfig()
    config.data.dataset, config.model.backbone, config.model.code_dim = "camvid", "tiny-vit", 8
    state = {f"{name}.{k}": v for name in ("head", "cluster_probe", "linear_probe")
             for k, v in getattr(model, name).state_dict().items()}
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": config.to_dict(), "epoch": 0}, ckpt)
    out = tmp_path / "eval"
    data = _camvid_like(tmp_path / "c")
    assert main(["eval", "--checkpoint", str(ckpt), "--data-root", str(data),
                 "--out", str(out), "--resolution", "32", "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dataset"] == "camvid" and metrics["config"]["model"]["code_dim"] == 8


@pytest.mark.skipif(not HAS_DATA, reason="stego.data not available yet")
def test_cli_eval_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from stego.cli import main

    assert main(["eval", "--checkpoint", str(tmp_path), "--data-root", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 2
    assert "no model" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path), "--data-root", str(tmp_path),
                 "--out", str(tmp_path / "o"), "--batch-size", "0"]) == 2


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DATA, reason="stego.data not available yet")
def test_evaluate_a_trained_run_and_its_lightning_checkpoint(tmp_path: Path) -> None:
    """Integration: `train` 2 steps on a tiny CamVid-layout set, then evaluate both outputs."""
    pytest.importorskip("stego.train.trainer")
    from stego.config import load_config
    from stego.eval.protocol import evaluate_checkpoint
    from stego.train.trainer import train

    data = _camvid_like(tmp_path / "camvid", n=6, splits=("train", "val"))
    overrides = {
        "data.dataset": "camvid", "data.data_root": str(data), "data.resolution": 32,
        "data.batch_size": 2, "data.num_workers": 0, "data.val_images": 2,
        "model.backbone": "tiny-vit", "model.code_dim": 8, "train.steps": 2, "train.knn_k": 3,
        "train.num_neighbors": 1, "train.val_every": 0, "train.checkpoint_every": 0,
        "train.figure_every": 0, "train.accelerator": "cpu", "train.use_feature_cache": "false",
    }
    config = load_config(overrides=[f"{k}={v}" for k, v in overrides.items()])
    run = train(config, tmp_path / "run", progress=False)
    for checkpoint, out in ((run, "e_model"), (run / "checkpoints" / "last.ckpt", "e_ckpt")):
        result = evaluate_checkpoint(checkpoint, data, out=tmp_path / out, resolution=32,
                                     progress=False, echo=None)
        assert result.n_images == 6 and 0.0 <= result.cluster.miou <= 100.0
        metrics = json.loads((tmp_path / out / "metrics.json").read_text())
        assert metrics["config"]["model"]["backbone"] == "tiny-vit"


@pytest.mark.parametrize(
    "preset,expected",
    [
        ("cocostuff27", ("nearest", "truncate")),
        ("cocostuff27-vits8", ("nearest", "truncate")),
        ("cityscapes27", ("nearest", "truncate")),
        ("potsdam3", ("nearest", "truncate")),
        ("camvid", ("bilinear", "round")),
    ],
)
def test_paper_presets_prepare_pixels_like_the_original(preset: str, expected: tuple) -> None:
    from stego.config import load_config
    from stego.eval.protocol import _preparation

    assert _preparation(load_config(preset=preset).to_dict()) == expected


@pytest.mark.skipif(not HAS_DATA, reason="stego.data not available yet")
@pytest.mark.parametrize(
    "train_config,expected",
    [
        # convert_official saves the original's cfg under "official" (stego.models.convert_official)
        ({"official": {"model_type": "vit_small", "res": 224}}, ("nearest", "truncate")),
        ({"data": {"interpolation": "nearest", "crf_image": "round"}}, ("nearest", "round")),
        (None, ("bilinear", "round")),
    ],
)
def test_evaluate_checkpoint_prepares_pixels_as_the_model_was_trained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, train_config: dict | None, expected: tuple
) -> None:
    import stego.eval.protocol as ev
    from stego.models.pretrained import save_pretrained

    seen: dict = {}
    real = ev.evaluate

    def spy(model, dataset, **kwargs):
        seen["interpolation"] = dataset.transform.interpolation
        seen["crf_image"] = kwargs["crf_image"]
        return real(model, dataset, **kwargs)

    monkeypatch.setattr(ev, "evaluate", spy)
    data = _camvid_like(tmp_path / "camvid", n=1)
    save_pretrained(_tiny_camvid_model(), tmp_path / "m", include_backbone=True,
                    train_config=train_config)
    kw = dict(out=tmp_path / "eval", resolution=32, progress=False, echo=None, n_figure_images=0)
    ev.evaluate_checkpoint(tmp_path / "m", data, **kw)
    assert (seen["interpolation"], seen["crf_image"]) == expected
    settings = json.loads((tmp_path / "eval" / "metrics.json").read_text())["eval_settings"]
    assert (settings["interpolation"], settings["crf_image"]) == expected
    if train_config is not None:
        return
    ev.evaluate_checkpoint(tmp_path / "m", data, interpolation="nearest", **kw)  # explicit wins
    assert seen["interpolation"] == "nearest"
    with pytest.raises(StegoError, match="unknown crf_image"):
        ev.evaluate_checkpoint(tmp_path / "m", data, crf_image="floor", **kw)
