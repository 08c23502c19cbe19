"""Naming by a pixel classifier (`stego segment --labels`): fit, save/load, predict, ONNX."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_naming import _read, _write_images, _write_labels

from stego.cli import main
from stego.errors import StegoError
from stego.models.class_map import CLASSIFIER_FILE, ClassMap, read_class_map, write_class_map
from stego.models.pixel_classifier import (
    PixelClassifier,
    classifier_inputs,
    fit_pixel_classifier,
)
from stego.naming import name_results
from stego.naming.classifier import inputs_at_pixels


def _segment(root: Path, *extra: str) -> Path:
    _write_images(root / "images")
    labels = _write_labels(root / "labels")
    argv = ["segment", str(root / "images"), "--labels", str(labels), "--clusters", "3"]
    argv += ["--backbone", "tiny-vit", "--steps", "4", "--resolution", "32", "--quiet"]
    argv += ["--out", str(root / "out"), *extra]
    with pytest.warns(UserWarning, match="green"):  # no labelled pixel shows class 2
        assert main(argv) == 0
    return root / "out"


@pytest.fixture(scope="module")
def by_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _segment(tmp_path_factory.mktemp("classifier"))


def _rels(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*.png"))


def _image(path: Path) -> torch.Tensor:
    from stego.infer.predict import read_image_rgb

    return torch.from_numpy(read_image_rgb(path)).permute(2, 0, 1)[None].float() / 255.0


# ----------------------------------------------------------------------------- the fit itself


def test_fit_separates_separable_pixels() -> None:
    """Two classes told apart (with a margin) by one input channel among noise: every sample
    must come out right, and a class without samples never."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(600, 6, generator=generator)
    y = (x[:, 4] > 0).long()  # classes 0 and 1; class 2 has no sample
    x[:, 4] = torch.where(y == 1, 1 + x[:, 4].abs(), -1 - x[:, 4].abs())
    model = fit_pixel_classifier(x, y, code_dim=4, n_classes=3)
    assert torch.equal(model.linear(x).argmax(1), y)
    assert model.linear.bias[2] < -1e3  # a class without samples is never predicted


def test_inputs_at_pixels_are_the_upsampled_maps() -> None:
    """Sampling at pixels equals prediction's bilinear upsampling (then crop) at those pixels."""
    maps = torch.randn(5, 4, 6, generator=torch.Generator().manual_seed(1))  # (D', h, w)
    padded, own = (32, 48), (30, 45)
    full = F.interpolate(maps[None], size=padded, mode="bilinear", align_corners=False)[0]
    full = full[:, : own[0], : own[1]]
    rows, cols = np.array([0, 7, 29, 15]), np.array([0, 44, 3, 20])
    got = inputs_at_pixels(maps, padded, own, own, rows, cols)  # (P, D')
    assert torch.allclose(got, full[:, rows, cols].T, atol=1e-5)


def test_classifier_inputs_are_unit_parts() -> None:
    code, feat = torch.randn(2, 3, 4, 5), 7 * torch.randn(2, 6, 4, 5)
    x = classifier_inputs(code, feat)
    assert x.shape == (2, 9, 4, 5)
    assert torch.allclose(x[:, :3].norm(dim=1), torch.ones(2, 4, 5), atol=1e-5)
    assert torch.allclose(x[:, 3:].norm(dim=1), torch.ones(2, 4, 5), atol=1e-5)


# ----------------------------------------------------------------------------- stego segment


def test_segment_with_labels_predicts_every_image_with_the_classifier(by_classifier: Path) -> None:
    out = by_classifier
    cmap = read_class_map(out / "model")
    assert cmap is not None and cmap.classifier is not None
    assert cmap.fit["method"] == "classifier" and cmap.fit["labelled_images"] == 2
    assert cmap.fit["unnamed_classes"] == ["green"] and cmap.fit["labelled_pixels"] > 0
    assert (out / "model" / CLASSIFIER_FILE).is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["naming"]["method"] == "classifier" and summary["classes"] == cmap.names
    assert abs(sum(summary["class_pixel_fraction"].values()) - 1) < 1e-3
    assert len(summary["cluster_pixel_fraction"]) == 3
    # the two labelled images (img0, nested/img1) are not suggested again
    assert len(summary["images_to_label"]) == 2
    assert not {Path(p).stem for p in summary["images_to_label"]} & {"img0", "img1"}
    rels = _rels(out / "labels")
    assert len(rels) == 4 and rels == _rels(out / "clusters") == _rels(out / "overlays")
    for rel in rels:
        classes = _read(out / "labels" / rel)
        assert classes.shape == (48, 64) and set(np.unique(classes).tolist()) <= {0, 1}
        assert _read(out / "clusters" / rel).max() < 3


def test_classifier_gets_the_labelled_halves_right(by_classifier: Path) -> None:
    """Images: red left half, blue right half, labelled 0 / 1. The classifier must put each
    half in its class in every image, labelled or not (a left-right mix-up would fail)."""
    for rel in _rels(by_classifier / "labels"):
        classes = _read(by_classifier / "labels" / rel)
        assert (classes[:, :28] == 0).mean() > 0.95, rel
        assert (classes[:, 36:] == 1).mean() > 0.95, rel


def test_saved_model_predicts_the_written_classes(by_classifier: Path) -> None:
    import stego

    model = stego.load(by_classifier / "model")
    assert model.needs_features and model.default_probe() == "class"
    images = Path(json.loads((by_classifier / "summary.json").read_text())["input"])
    for rel in _rels(by_classifier / "labels"):
        source = next((images / rel).parent.glob(rel.stem + ".*"))
        image = _image(source)
        assert np.array_equal(
            model.predict(image)[0].numpy(), _read(by_classifier / "labels" / rel)
        )
        clusters = model.predict(image, probe="cluster")[0].numpy()
        assert np.array_equal(clusters, _read(by_classifier / "clusters" / rel))
    out = model(torch.rand(1, 3, 40, 56))
    assert out.class_log_probs.shape == (1, 3, 40, 56)  # what the CRF refines
    assert torch.allclose(out.class_log_probs.exp().sum(1), torch.ones(1, 40, 56), atol=1e-4)


def test_crf_refines_the_classifier_classes(by_classifier: Path, tmp_path: Path) -> None:
    """`--crf` with a classifier: class ids and cluster ids, each refined, from one pass."""
    pytest.importorskip("pydensecrf")
    import stego
    from stego.infer.predict import predict_paths

    model = stego.load(by_classifier / "model")
    images = Path(json.loads((by_classifier / "summary.json").read_text())["input"])
    out = tmp_path / "crf"
    predict_paths(model, [images], out, crf=True, keep_clusters=True, progress=False, num_workers=0)
    assert _rels(out / "labels") == _rels(out / "clusters") == _rels(by_classifier / "labels")
    for rel in _rels(out / "labels"):
        classes = _read(out / "labels" / rel)
        assert (classes[:, :28] == 0).mean() > 0.95 and (classes[:, 36:] == 1).mean() > 0.95
        assert _read(out / "clusters" / rel).max() < 3
    overlay = _read(out / "overlays" / next(iter(_rels(out / "labels"))))
    assert overlay.shape[0] > 48  # the legend of the classes below the image


def test_class_map_with_classifier_round_trips(by_classifier: Path, tmp_path: Path) -> None:
    import stego

    model = stego.load(by_classifier / "model")
    saved = model.save_pretrained(tmp_path / "again")
    again = stego.load(saved)
    weights = model.classes.classifier.state()
    for key, tensor in again.classes.classifier.state().items():
        assert torch.equal(tensor, weights[key])
    images = torch.rand(2, 3, 40, 56)
    assert torch.equal(again.predict(images), model.predict(images))
    model.set_classes(None)
    model.save_pretrained(saved)  # unnamed: the classifier must go with classes.json
    assert not (saved / CLASSIFIER_FILE).exists() and stego.load(saved).classes is None


def test_missing_classifier_file_is_a_clear_error(by_classifier: Path, tmp_path: Path) -> None:
    model_dir = Path(shutil.copytree(by_classifier / "model", tmp_path / "model"))
    (model_dir / CLASSIFIER_FILE).unlink()
    with pytest.raises(StegoError, match="pixel classifier .* missing or unreadable"):
        read_class_map(model_dir)


def test_classifier_of_another_model_is_refused(by_classifier: Path) -> None:
    from test_prediction import tiny_segmenter

    cmap = read_class_map(by_classifier / "model")
    model = tiny_segmenter(n_clusters=3)  # code dim 8, not the segment run's 32
    with pytest.raises(StegoError, match="fit it again on this model"):
        model.set_classes(cmap)


def test_stego_name_afterwards_names_by_majority(by_classifier: Path, tmp_path: Path) -> None:
    results = Path(shutil.copytree(by_classifier, tmp_path / "results"))
    labels = _write_labels(tmp_path / "labels")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "green" is never predicted
        cmap = name_results(results, labels=labels, progress=False)
    assert cmap.fit["method"] == "majority" and cmap.classifier is None
    assert not (results / "model" / CLASSIFIER_FILE).exists()
    for rel in _rels(results / "clusters"):
        want = np.asarray(cmap.mapping)[_read(results / "clusters" / rel)]
        assert np.array_equal(_read(results / "labels" / rel), want)


# ----------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize("include_backbone", [True, False])
def test_onnx_class_ids_follow_the_classifier(tmp_path: Path, include_backbone: bool) -> None:
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort
    from test_prediction import tiny_segmenter

    from stego.infer.onnx import export_onnx

    model = tiny_segmenter(n_clusters=4)
    torch.manual_seed(3)
    classifier = PixelClassifier(8, int(model.backbone.embed_dim), 3)
    torch.nn.init.normal_(classifier.linear.weight, std=3.0)
    names = ["a", "b", "c"]
    model.set_classes(ClassMap(names, [[0, 0, 0]] * 3, [0, 1, 2, 0], classifier=classifier))
    export_onnx(model, tmp_path / "m.onnx", include_backbone=include_backbone, height=32, width=40)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    images = torch.rand(2, 3, 24, 48)  # head graph: another size than exported (dynamic)
    if include_backbone:
        images = torch.rand(2, 3, 32, 40)
        want = model.predict(images, flip=False)
        class_ids = session.run(None, {"images": images.numpy()})[2]
    else:  # class ids at feature resolution: the classifier's argmax on code and features
        feat = model.backbone(images).feat
        want = classifier(model.head(feat).code, feat).argmax(1)
        class_ids = session.run(None, {"features": feat.numpy()})[2]
    assert len(np.unique(want.numpy())) > 1  # the test means something
    assert (class_ids == want.numpy()).mean() > 0.99  # float ties of the argmax may differ


def test_write_class_map_replaces_an_old_classifier(by_classifier: Path, tmp_path: Path) -> None:
    model_dir = Path(shutil.copytree(by_classifier / "model", tmp_path / "model"))
    cmap = read_class_map(model_dir)
    write_class_map(model_dir, ClassMap(cmap.names, cmap.colors, cmap.mapping, {"method": "hand"}))
    assert not (model_dir / CLASSIFIER_FILE).exists()
    assert read_class_map(model_dir).classifier is None


def test_exports_read_the_classifier_classes(by_classifier: Path, tmp_path: Path) -> None:
    """`stego export` gives the class ids the classifier wrote, not the clusters' majority."""
    import csv

    from stego.export import export_results
    from stego.results import open_results

    opened = open_results(by_classifier)
    for i, rel in enumerate(opened.rels):
        assert np.array_equal(opened.class_ids(i), _read(by_classifier / "labels" / rel))
    (table, _) = export_results(by_classifier, "areas", tmp_path / "areas.csv", progress=False)
    rows = list(csv.reader(table.open()))
    by_name = {row[0]: row for row in rows[1:]}
    for i, rel in enumerate(opened.rels):
        classes = _read(by_classifier / "labels" / rel)
        row = by_name[opened.image_name(i)]
        assert abs(float(row[3]) - (classes == 0).mean()) < 1e-5  # the share of "red"


def test_rerun_with_the_other_naming_is_refused(
    by_classifier: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The output of `stego segment --labels` (classifier) rerun with --naming majority: refused
    before any work, naming the fix, and nothing in it changed."""
    root = tmp_path
    out = Path(shutil.copytree(by_classifier, root / "out"))
    _write_images(root / "images")
    labels = _write_labels(root / "labels")
    before = {p: p.read_bytes() for p in sorted(out.rglob("*.png"))}
    argv = ["segment", str(root / "images"), "--labels", str(labels), "--clusters", "3"]
    argv += ["--backbone", "tiny-vit", "--steps", "4", "--resolution", "32", "--quiet"]
    argv += ["--out", str(out), "--naming", "majority"]
    assert main(argv) == 2
    assert "rerun with --naming classifier" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in sorted(out.rglob("*.png"))} == before
