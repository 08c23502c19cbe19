"""predict_paths: any size / mode, label PNGs at the original size, skip_bad, resume, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stego.errors import StegoError
from stego.infer.predict import collect_images, predict_paths

N_CLUSTERS = 5


def tiny_segmenter(n_classes: int | None = None, n_clusters: int = N_CLUSTERS):
    """Seeded tiny-vit Segmenter with a random head (code dim 8) and probes."""
    from stego.models.backbone import build_backbone
    from stego.models.heads import SegmentationHead
    from stego.models.probes import ClusterProbe, LinearProbe
    from stego.models.segmenter import Segmenter, SegmenterMeta

    torch.manual_seed(0)
    backbone = build_backbone("tiny-vit", pretrained=False)
    head = SegmentationHead(backbone.embed_dim, 8)
    probe = ClusterProbe(8, n_clusters)
    linear = LinearProbe(8, n_classes) if n_classes else None
    meta = SegmenterMeta(
        backbone="tiny-vit",
        backbone_layer=None,
        head_kind="nonlinear",
        code_dim=8,
        n_clusters=n_clusters,
        n_classes=n_classes,
    )
    return Segmenter(backbone, head, probe, linear, meta).eval()


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    """A folder of odd images: sizes, modes, a sub-folder."""
    rng = np.random.default_rng(0)
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (333, 517, 3), dtype=np.uint8)).save(root / "big.jpg")
    Image.fromarray(rng.integers(0, 256, (37, 53), dtype=np.uint8), "L").save(root / "gray.png")
    Image.fromarray(rng.integers(0, 256, (41, 29, 4), dtype=np.uint8), "RGBA").save(
        root / "sub/rgba.png"
    )
    Image.fromarray(rng.integers(0, 65536, (30, 45), dtype=np.uint16)).save(root / "sub/deep.png")
    Image.fromarray(rng.integers(0, 256, (33, 33), dtype=np.uint8), "L").convert("P").save(
        root / "pal.gif"
    )
    return root


def _truncated(path: Path) -> Path:
    buffer = path.with_suffix(".tmp.png")
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        buffer
    )
    path.write_bytes(buffer.read_bytes()[:2000])
    buffer.unlink()
    return path


def test_predict_odd_images(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = predict_paths(
        tiny_segmenter(), [images], out, batch_size=2, num_workers=0, progress=False, flip=False
    )
    assert len(summary.written) == 5 and not summary.skipped and not summary.existing
    for source, rel in collect_images([images]):
        labels = np.array(Image.open(out / "labels" / rel))
        width, height = Image.open(source).size
        assert labels.shape == (height, width), rel
        assert labels.dtype == np.uint8 and labels.max() < N_CLUSTERS
        overlay = Image.open(out / "overlays" / rel)
        assert overlay.size == (width, height) and overlay.mode == "RGB"
    legend = json.loads((out / "clusters.json").read_text())
    assert [e["id"] for e in legend["ids"]] == list(range(N_CLUSTERS))
    assert (out / "labels/sub/deep.png").is_file()


def test_predict_matches_model(tmp_path: Path) -> None:
    model = tiny_segmenter()
    rgb = np.random.default_rng(1).integers(0, 256, (21, 35, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    predict_paths(model, [tmp_path / "a.png"], tmp_path / "out", num_workers=0, progress=False)
    expected = model.predict(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255)[0]
    assert np.array_equal(np.array(Image.open(tmp_path / "out/labels/a.png")), expected.numpy())


def test_bad_file_named_or_skipped(images: Path, tmp_path: Path) -> None:
    bad = _truncated(images / "sub" / "broken.png")
    model = tiny_segmenter()
    with pytest.raises(StegoError, match="broken.png"):
        predict_paths(model, [images], tmp_path / "o1", num_workers=0, progress=False)
    summary = predict_paths(
        model, [images], tmp_path / "o2", skip_bad=True, num_workers=0, progress=False
    )
    assert [p for p, _ in summary.skipped] == [bad]
    assert "broken.png" in (tmp_path / "o2/skipped.txt").read_text()
    assert len(summary.written) == 5


def test_rerun_skips_done(images: Path, tmp_path: Path) -> None:
    model = tiny_segmenter()
    out = tmp_path / "out"
    first = predict_paths(
        model, [images / "gray.png", images / "sub"], out, num_workers=0, progress=False
    )
    assert len(first.written) == 3
    (out / "labels/sub/rgba.png").unlink()  # like a run killed before this image
    second = predict_paths(
        model, [images / "gray.png", images / "sub"], out, num_workers=0, progress=False
    )
    assert [p.name for p in second.written] == ["rgba.png"] and len(second.existing) == 2


def _log_probs_downscaled(model, rgb: np.ndarray, max_side: int) -> torch.Tensor:
    """Cluster log-probs (K, H, W) at the image's own size for an (H, W, 3) uint8 image whose
    shorter side exceeds ``max_side``: the network sees it with its shorter side at ``max_side``
    (aspect kept, each side rounded; bilinear antialiased resize, as predict_paths documents and
    does), and the prediction is upsampled back to (H, W), flip averaging on."""
    import torch.nn.functional as F

    height, width = rgb.shape[:2]
    scale = max_side / min(height, width)
    assert scale < 1  # this helper is only for images the rule shrinks
    small = (round(height * scale), round(width * scale))
    images = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0  # (1, 3, H, W)
    net_in = F.interpolate(images, size=small, mode="bilinear", align_corners=False,
                           antialias=True)  # fmt: skip
    with torch.no_grad():
        return model(net_in, flip=True, size=(height, width)).cluster_log_probs[0]


def test_workers_crf_and_downscale(images: Path, tmp_path: Path) -> None:
    """max_side=16 shrinks both images for the network. Without CRF the labels are the argmax of
    the prediction made by the downscale rule; with CRF they are stego.infer.crf.dense_crf of the
    full-size image and those probabilities. Both differ from a full-size prediction."""
    pytest.importorskip("pydensecrf")
    from stego.infer.crf import dense_crf
    from stego.infer.predict import read_image_rgb

    model = tiny_segmenter()
    kw = dict(crf_workers=1, num_workers=1, max_side=16, progress=False)
    summary = predict_paths(model, [images / "sub"], tmp_path / "crf", crf=True, **kw)
    assert len(summary.written) == 2
    plain = predict_paths(model, [images / "sub"], tmp_path / "plain", crf=False, **kw)
    assert len(plain.written) == 2
    for name, size in (("deep.png", (30, 45)), ("rgba.png", (41, 29))):
        rgb = read_image_rgb(images / "sub" / name)  # (H, W, 3) uint8, alpha dropped
        assert rgb.shape[:2] == size
        log_probs = _log_probs_downscaled(model, rgb, 16)  # (K, H, W)
        argmax = log_probs.argmax(0).numpy()
        refined = dense_crf(rgb, log_probs.exp().numpy()).argmax(0)  # (H, W)
        got_plain = np.array(Image.open(tmp_path / "plain" / "labels" / name))
        got_crf = np.array(Image.open(tmp_path / "crf" / "labels" / name))
        np.testing.assert_array_equal(got_plain, argmax, err_msg=name)
        np.testing.assert_array_equal(got_crf, refined, err_msg=name)
        assert (refined != argmax).any(), name  # the CRF changed something: not a no-op
        full = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
        assert (model.predict(full)[0].numpy() != argmax).any(), name  # downscaling happened


def test_output_inside_input_is_ignored_and_collisions_refused(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(StegoError, match="both write"):
        collect_images([tmp_path])
    (tmp_path / "a.jpg").unlink()
    (tmp_path / "out" / "labels").mkdir(parents=True)
    (tmp_path / "out/labels/a.png").write_bytes(b"")
    assert [rel for _, rel in collect_images([tmp_path], exclude=tmp_path / "out")] == [
        Path("a.png")
    ]


def test_linear_probe_class_ids(tmp_path: Path) -> None:
    model = tiny_segmenter(n_classes=3)
    model.meta.class_names = ["a", "b", "c"]
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / "x.png")
    predict_paths(
        model, [tmp_path / "x.png"], tmp_path / "out", probe="linear", num_workers=0, progress=False
    )
    legend = json.loads((tmp_path / "out/clusters.json").read_text())
    assert [e["class_name"] for e in legend["ids"]] == ["a", "b", "c"]
    assert np.array(Image.open(tmp_path / "out/labels/x.png")).max() < 3


def test_cli_predict(images: Path, tmp_path: Path) -> None:
    from stego.cli import main
    from stego.models.pretrained import save_pretrained

    save_pretrained(tiny_segmenter(), tmp_path / "run" / "model", include_backbone=True)
    code = main(
        [
            "predict",
            "--checkpoint",
            str(tmp_path / "run"),
            str(images / "gray.png"),
            "--out",
            str(tmp_path / "out"),
            "--workers",
            "0",
            "--no-flip",
        ]
    )
    assert code == 0 and (tmp_path / "out/labels/gray.png").is_file()
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(tmp_path / "nope"),
                str(images),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )


# ----------------------------------------------------------------------------- throughput


@pytest.fixture()
def mixed(tmp_path: Path) -> Path:
    """Images of six sizes; at patch 8 and max_side 24 six of them share a padded network
    size (24x40 / 22x38 / 20x36 native, 48x80 downscaled to 24x40), two do not."""
    rng = np.random.default_rng(3)
    root = tmp_path / "mixed"
    root.mkdir()
    sizes = [(24, 40), (22, 38), (33, 17), (20, 36), (48, 80), (24, 40), (22, 38), (9, 9)]
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    return root


def test_mixed_sizes_share_batches_with_the_labels_of_one_image_batches(
    mixed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images of different sizes go through the backbone together when their padded network
    inputs agree, and every label map is byte for byte the one a batch of one gives."""
    model = tiny_segmenter()
    batches: list[int] = []
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda x, **kw: batches.append(len(x)) or encode(x, **kw))
    kw = dict(num_workers=0, progress=False, max_side=24, flip=False)
    alone = predict_paths(model, [mixed], tmp_path / "alone", batch_size=1, **kw)
    assert batches == [1] * 8
    batches.clear()
    together = predict_paths(model, [mixed], tmp_path / "together", batch_size=4, **kw)
    assert batches == [4, 1, 2, 1]  # the six of one padded size in two batches
    assert together.written == alone.written == sorted(alone.written)
    alone_files = [p for p in (tmp_path / "alone").rglob("*") if p.is_file()]
    assert len(alone_files) == 2 * 8 + 1  # labels, overlays, clusters.json
    for rel in sorted(p.relative_to(tmp_path / "alone") for p in alone_files):
        assert (tmp_path / "together" / rel).read_bytes() == (tmp_path / "alone" / rel).read_bytes()


def test_mixed_sizes_crf_labels_match_one_image_batches(mixed: Path, tmp_path: Path) -> None:
    pytest.importorskip("pydensecrf")
    model = tiny_segmenter()
    kw = dict(num_workers=0, progress=False, max_side=24, crf=True, crf_workers=1, flip=False)
    predict_paths(model, [mixed], tmp_path / "alone", batch_size=1, **kw)
    predict_paths(model, [mixed], tmp_path / "together", batch_size=4, **kw)
    for path in sorted((tmp_path / "alone" / "labels").iterdir()):
        assert (tmp_path / "together" / "labels" / path.name).read_bytes() == path.read_bytes()


def test_size_batches_group_within_chunks() -> None:
    from stego.infer.loading import ReadImage, size_batches

    shapes = [(2, 2), (3, 3), (2, 2), (3, 3), (2, 2), None, (2, 2), (3, 3), (3, 3)]
    stream = [
        ReadImage(i, None if s is None else np.zeros((*s, 3), np.uint8), "bad" if s is None else "")
        for i, s in enumerate(shapes)
    ]
    got = [[r.index for r in b] for b in size_batches(iter(stream), 2, 4, lambda a: a.shape)]
    # chunk 0-3: two full pairs; chunk 4-7: the bad image at once, then 4+6 full, 7 left over;
    # chunk 8: 8 alone
    assert got == [[0, 2], [1, 3], [5], [4, 6], [7], [8]]


def test_a_failed_write_stops_the_run_naming_the_image(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stego.infer.predict as predict

    def full_disk(out_dir, rel, *args) -> None:
        if rel.name == "gray.png":
            raise OSError(28, "No space left on device")
        real(out_dir, rel, *args)

    real = predict.write_outputs
    monkeypatch.setattr(predict, "write_outputs", full_disk)
    with pytest.raises(StegoError, match="gray.png.*No space left"):
        predict_paths(tiny_segmenter(), [images], tmp_path / "out", num_workers=0, progress=False)
    assert not (tmp_path / "out" / "labels" / "gray.png").exists()


def test_output_writer_bounds_waiting_writes_and_reports_errors() -> None:
    import threading

    from stego.infer.writing import OutputWriter

    gate, started, done = threading.Event(), [], []
    writer = OutputWriter(threads=1, max_pending=2)
    writer.submit("a", lambda: (started.append("a"), gate.wait()), done=lambda: done.append("a"))
    writer.submit("b", lambda: started.append("b"), done=lambda: done.append("b"))
    third = threading.Thread(target=writer.submit, args=("c", lambda: None))
    third.start()
    third.join(0.2)
    assert third.is_alive()  # two writes wait: the third is held back
    gate.set()
    third.join(5)
    writer.submit("d", lambda: 1 / 0)
    with pytest.raises(StegoError, match="outputs of d: division by zero"):
        writer.close()
    assert done == ["a", "b"]
