"""Naming clusters: class maps, `stego name` on a real tiny `stego segment` output, bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stego.cli import main
from stego.errors import StegoError
from stego.naming import (
    ClassMap,
    hand_class_map,
    majority_class_map,
    name_results,
    parse_names,
    read_class_map,
    read_classes_txt,
)
from stego.segment import segment_folder

N_CLUSTERS = 3


def _write_images(folder: Path, n: int = 4, size: tuple[int, int] = (64, 48)) -> None:
    """Red left half, blue right half (class 0 / class 1 of the labels below)."""
    rng = np.random.default_rng(0)
    (folder / "nested").mkdir(parents=True)
    for i in range(n):
        img = np.zeros((size[1], size[0], 3), np.uint8)
        img[:, : size[0] // 2] = (200, 30, 30)
        img[:, size[0] // 2 :] = (30, 30, 200)
        img = np.clip(img + rng.integers(0, 40, img.shape), 0, 255).astype(np.uint8)
        target = folder / ("nested" if i % 2 else ".") / f"img{i}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(img).save(target)


def _label(size: tuple[int, int] = (64, 48)) -> np.ndarray:
    label = np.zeros((size[1], size[0]), np.uint8)
    label[:, size[0] // 2 :] = 1
    label[:2] = 255  # a void band
    return label


def _write_labels(folder: Path, rels: tuple[str, ...] = ("img0.png", "nested/img1.png")) -> Path:
    (folder / "nested").mkdir(parents=True, exist_ok=True)
    (folder / "classes.txt").write_text("red\nblue\ngreen\n")
    for rel in rels:
        Image.fromarray(_label()).save(folder / rel)
    return folder


@pytest.fixture(scope="module")
def segmented(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("naming")
    _write_images(root / "images")
    segment_folder(
        root / "images",
        root / "out",
        clusters=N_CLUSTERS,
        backbone="tiny-vit",
        steps=4,
        resolution=32,
        progress=False,
    )
    return root / "out"


@pytest.fixture
def results(segmented: Path, tmp_path: Path) -> Path:
    """A fresh copy of the segment output (naming rewrites it)."""
    return Path(shutil.copytree(segmented, tmp_path / "results"))


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "work" not in p.relative_to(folder).parts
    }


# ----------------------------------------------------------------------------- class maps


def test_class_map_round_trips_and_refuses_bad_mappings(tmp_path: Path) -> None:
    cmap = ClassMap(["sky", "road"], [[1, 2, 3], [4, 5, 6]], [1, 0, 1], {"method": "hand"})
    again = ClassMap.from_dict(json.loads(json.dumps(cmap.to_dict())))
    assert again == cmap and cmap.n_classes == 2 and cmap.n_clusters == 3
    assert cmap.lookup()[torch.tensor([[0, 2], [1, 1]])].tolist() == [[1, 1], [0, 0]]
    with pytest.raises(StegoError, match="outside"):
        ClassMap(["sky"], [[0, 0, 0]], [0, 1])
    with pytest.raises(StegoError, match="one colour per class"):
        ClassMap(["sky", "road"], [[0, 0, 0]], [0, 1])
    assert read_class_map(tmp_path) is None
    (tmp_path / "classes.json").write_text("{not json")
    with pytest.raises(StegoError, match="classes.json"):
        read_class_map(tmp_path)


def test_merged_log_probs_sum_the_clusters_of_a_class() -> None:
    cmap = ClassMap(["a", "b"], [[0, 0, 0], [1, 1, 1]], [1, 0, 1])
    probs = torch.tensor([0.2, 0.3, 0.5]).reshape(1, 3, 1, 1)
    merged = cmap.merge_log_probs(probs.log()).exp().flatten()
    assert torch.allclose(merged, torch.tensor([0.3, 0.7]))


def test_parse_names_from_text_and_yaml(tmp_path: Path) -> None:
    assert parse_names("0=sky, 1=road,2=road") == {0: "sky", 1: "road", 2: "road"}
    (tmp_path / "names.yaml").write_text("0: sky\n3: car\n")
    assert parse_names(tmp_path / "names.yaml") == {0: "sky", 3: "car"}
    for bad in ("sky=0", "0=", "0=sky,0=road", ""):
        with pytest.raises(StegoError, match="names|cluster"):
            parse_names(bad)


def test_hand_names_merge_clusters_and_keep_the_rest() -> None:
    cmap = hand_class_map({0: "sky", 2: "road", 4: "road"}, 5)
    assert cmap.names == ["sky", "cluster 1", "road", "cluster 3"]
    assert cmap.mapping == [0, 1, 2, 3, 2]
    assert cmap.fit["method"] == "hand" and cmap.fit["labelled_pixels"] == 0
    with pytest.raises(StegoError, match="cluster.*7.*0-4"):
        hand_class_map({7: "car"}, 5)


def test_classes_txt_plain_or_numbered(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("sky\nroad\n\n")
    (tmp_path / "b.txt").write_text("0 sky\n1 road\n")
    (tmp_path / "c.txt").write_text("sky\nsky\n")
    assert read_classes_txt(tmp_path / "a.txt") == read_classes_txt(tmp_path / "b.txt")
    assert read_classes_txt(tmp_path / "b.txt") == ["sky", "road"]
    with pytest.raises(StegoError, match="more than once"):
        read_classes_txt(tmp_path / "c.txt")
    with pytest.raises(StegoError, match="classes.txt"):
        read_classes_txt(tmp_path / "classes.txt")


def test_majority_names_and_borrows_for_unlabelled_clusters() -> None:
    counts = np.array([[5, 1, 0], [0, 9, 0], [0, 0, 0]])  # cluster 2: no labelled pixel
    centroids = np.array([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])  # cluster 2 is near cluster 1
    with pytest.warns(UserWarning, match="'c'.*no labelled pixel"):
        cmap = majority_class_map(counts, ["a", "b", "c"], centroids, labelled_images=2, source="L")
    assert cmap.mapping == [0, 1, 1]
    assert cmap.fit["clusters_without_labels"] == [2] and cmap.fit["unnamed_classes"] == ["c"]
    assert cmap.fit["labelled_pixels"] == 15


# ----------------------------------------------------------------------------- stego name


def test_name_from_labels_rewrites_results(results: Path, tmp_path: Path) -> None:
    clusters_before = {p.name: _read(p) for p in (results / "labels").rglob("*.png")}
    labels = _write_labels(tmp_path / "labels")
    with pytest.warns(UserWarning, match="green"):  # classes.txt names a class no pixel shows
        cmap = name_results(results, labels=labels, progress=False)
    assert cmap.fit["method"] == "majority" and cmap.fit["labelled_images"] == 2
    assert cmap.fit["labelled_pixels"] == 2 * 64 * 46
    lookup = np.asarray(cmap.mapping)
    for path in (results / "clusters").rglob("*.png"):
        clusters = _read(path)
        assert np.array_equal(clusters, clusters_before[path.name])  # cluster ids kept
        rel = path.relative_to(results / "clusters")
        assert np.array_equal(_read(results / "labels" / rel), lookup[clusters])
        overlay = _read(results / "overlays" / rel)
        assert overlay.shape[0] > clusters.shape[0]  # the legend below the image
    summary = json.loads((results / "summary.json").read_text())
    assert summary["classes"] == ["red", "blue", "green"]
    shares = summary["class_pixel_fraction"]
    assert abs(sum(shares.values()) - 1) < 1e-3 and shares["green"] == 0
    assert read_class_map(results / "model") == cmap
    assert not (results / ".naming-new").exists() and not (results / ".naming-old").exists()


def test_named_model_predicts_classes(results: Path) -> None:
    import stego

    name_results(results, names={0: "left", 2: "left"}, progress=False)
    model = stego.load(results / "model")
    assert model.classes is not None and model.classes.names == ["left", "cluster 1"]
    images = torch.rand(2, 3, 40, 56)
    clusters = model.predict(images, probe="cluster")
    assert torch.equal(model.predict(images), model.classes.lookup()[clusters])
    saved = model.save_pretrained(results / "again")
    assert stego.load(saved).classes == model.classes
    model.set_classes(None)
    model.save_pretrained(saved)  # unnamed: the old classes.json must go
    assert stego.load(saved).classes is None and torch.equal(
        stego.load(saved).predict(images), clusters
    )
    with pytest.raises(StegoError, match="names 2 clusters"):
        model.set_classes(ClassMap(["a"], [[0, 0, 0]], [0, 0]))


def test_renaming_starts_from_the_clusters(results: Path) -> None:
    clusters = {p.name: _read(p) for p in (results / "labels").rglob("*.png")}
    name_results(results, names={0: "a", 1: "a", 2: "a"}, progress=False)
    name_results(results, names={1: "b"}, progress=False)
    for path in (results / "labels").rglob("*.png"):
        want = np.asarray([0, 1, 2])[clusters[path.name]]  # "cluster 0", "b", "cluster 2"
        assert np.array_equal(_read(path), want)
    assert read_class_map(results / "model").names == ["cluster 0", "b", "cluster 2"]


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        ("size", r"img0.png is 32x24 but its image is 64x48"),
        ("ids", r"class ids \[7\] outside the 3 classes"),
        ("orphan", r"stray.png matches no segmented image"),
        ("rgb", r"RGB image"),
    ],
)
def test_bad_labels_name_the_file_and_leave_results(
    results: Path, tmp_path: Path, spoil: str, message: str
) -> None:
    labels = _write_labels(tmp_path / "labels")
    if spoil == "size":
        Image.fromarray(_label((32, 24))).save(labels / "img0.png")
    elif spoil == "ids":
        Image.fromarray(np.full((48, 64), 7, np.uint8)).save(labels / "img0.png")
    elif spoil == "orphan":
        Image.fromarray(_label()).save(labels / "stray.png")
    else:
        Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(labels / "img0.png")
    before = _digest(results)
    with pytest.raises(StegoError, match=message):
        name_results(results, labels=labels, progress=False)
    assert _digest(results) == before


def test_a_failure_while_rendering_leaves_results(results: Path, segmented: Path) -> None:
    summary = json.loads((results / "summary.json").read_text())
    summary["input"] = str(results / "gone")  # the images moved away: no overlays possible
    (results / "summary.json").write_text(json.dumps(summary))
    before = _digest(results)
    with pytest.raises(StegoError, match="put the folder back"):
        name_results(results, names={0: "x"}, progress=False)
    assert _digest(results) == before


def test_cli_name(results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["name", str(results), "--names", "0=sky,1=road,2=road", "--quiet"]) == 0
    assert "named 3 clusters as 2 classes by hand" in capsys.readouterr().out
    assert main(["name", str(results), "--names", "9=car", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cluster(s) [9]" in err and len(err.strip().splitlines()) == 1


def test_predict_paths_writes_class_ids_of_a_named_model(results: Path, tmp_path: Path) -> None:
    import stego
    from stego.infer.predict import predict_paths

    name_results(results, names={0: "sky", 1: "sky"}, progress=False)
    model = stego.load(results / "model")
    images = Path(json.loads((results / "summary.json").read_text())["input"])
    predict_paths(model, [images], tmp_path / "pred", progress=False, num_workers=0)
    legend = json.loads((tmp_path / "pred" / "clusters.json").read_text())
    assert legend["probe"] == "class"
    assert [e["class_name"] for e in legend["ids"]] == ["sky", "cluster 2"]
    for path in (tmp_path / "pred" / "labels").rglob("*.png"):
        assert set(np.unique(_read(path)).tolist()) <= {0, 1}


def test_onnx_export_gives_class_ids(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort
    from test_prediction import tiny_segmenter

    from stego.infer.onnx import export_onnx

    model = tiny_segmenter(n_clusters=4)
    model.set_classes(hand_class_map({0: "a", 3: "a"}, 4))
    export_onnx(model, tmp_path / "m.onnx", include_backbone=True, height=32, width=40)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    images = torch.rand(2, 3, 32, 40)
    _, _, class_ids = session.run(None, {"images": images.numpy()})
    with warnings.catch_warnings():
        want = model.predict(images, flip=False)
    assert (class_ids == want.numpy()).mean() > 0.99  # float ties of the argmax may differ


# ------------------------------------------------------------------------ stego segment --labels


def test_segment_with_labels_by_majority_writes_class_ids(tmp_path: Path) -> None:
    _write_images(tmp_path / "images")
    labels = _write_labels(tmp_path / "labels")
    argv = ["segment", str(tmp_path / "images"), "--labels", str(labels), "--clusters", "3"]
    argv += ["--backbone", "tiny-vit", "--steps", "4", "--resolution", "32", "--quiet"]
    argv += ["--out", str(tmp_path / "out"), "--naming", "majority"]
    with pytest.warns(UserWarning, match="green"):
        assert main(argv) == 0
    out = tmp_path / "out"
    cmap = read_class_map(out / "model")
    assert cmap is not None and cmap.names == ["red", "blue", "green"] and cmap.n_clusters == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["naming"]["labelled_images"] == 2 and summary["classes"] == cmap.names
    assert len(summary["cluster_pixel_fraction"]) == 3
    rels = sorted(p.relative_to(out / "clusters") for p in (out / "clusters").rglob("*.png"))
    assert len(rels) == 4
    for rel in rels:
        want = np.asarray(cmap.mapping)[_read(out / "clusters" / rel)]
        assert np.array_equal(_read(out / "labels" / rel), want)


def test_segment_refuses_bad_labels_before_training(tmp_path: Path) -> None:
    _write_images(tmp_path / "images")
    labels = _write_labels(tmp_path / "labels")
    Image.fromarray(_label((30, 20))).save(labels / "img0.png")
    with pytest.raises(StegoError, match="img0.png is 30x20 but its image is 64x48"):
        segment_folder(tmp_path / "images", tmp_path / "out", labels=labels, backbone="tiny-vit")
    assert not (tmp_path / "out" / "work").exists()
    with pytest.raises(StegoError, match="--clusters"):
        segment_folder(tmp_path / "images", tmp_path / "out", backbone="tiny-vit")
