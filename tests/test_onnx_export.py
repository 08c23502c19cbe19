"""ONNX export: head only and with the tiny backbone, checked with onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from stego.infer.onnx import export_onnx  # noqa: E402


def _model():
    from test_prediction import tiny_segmenter

    return tiny_segmenter()


def test_head_only(tmp_path: Path) -> None:
    import onnxruntime as ort

    model = _model()
    diff = export_onnx(model, tmp_path / "head.onnx", height=32, width=48)
    assert diff <= 1e-4 and (tmp_path / "head.onnx").is_file()
    session = ort.InferenceSession(str(tmp_path / "head.onnx"), providers=["CPUExecutionProvider"])
    feat = torch.randn(3, model.head.in_dim, 5, 7)  # other batch and spatial size than exported
    code, log_probs = session.run(None, {"features": feat.numpy()})
    want = model.cluster_probe.log_probs(model.head(feat).code)
    assert np.abs(log_probs - want.detach().numpy()).max() < 1e-4 and code.shape == (3, 8, 5, 7)


def test_with_backbone(tmp_path: Path) -> None:
    import onnxruntime as ort

    model = _model()
    diff = export_onnx(
        model, tmp_path / "full.onnx", include_backbone=True, height=40, width=27, flip=True
    )
    assert diff <= 1e-4
    session = ort.InferenceSession(str(tmp_path / "full.onnx"), providers=["CPUExecutionProvider"])
    images = torch.rand(3, 3, 40, 27)
    _, log_probs = session.run(None, {"images": images.numpy()})
    assert np.abs(log_probs - model(images).cluster_log_probs.numpy()).max() < 1e-4


def _cli_export(model_dir: Path, out: Path, *extra: str) -> None:
    from stego.cli import main

    args = ["export-onnx", "--checkpoint", str(model_dir), "--out", str(out), *extra]
    assert main([*args, "--height", "32", "--width", "32"]) == 0
    assert out.is_file()


def test_cli(tmp_path: Path) -> None:
    """`stego export-onnx` writes a graph whose onnxruntime outputs equal the saved model's:
    head only (code and cluster log-probs from features), and with the backbone and --flip."""
    import onnxruntime as ort

    import stego

    model = _model()
    stego.save_pretrained(model, tmp_path / "m", include_backbone=True)

    _cli_export(tmp_path / "m", tmp_path / "x.onnx")
    session = ort.InferenceSession(str(tmp_path / "x.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["features"]
    feat = torch.randn(2, model.head.in_dim, 6, 3, generator=torch.Generator().manual_seed(1))
    code, log_probs = session.run(None, {"features": feat.numpy()})
    with torch.no_grad():
        want_code = model.head(feat).code  # (2, 8, 6, 3)
        want = model.cluster_probe.log_probs(want_code, alpha=model.meta.alpha)  # (2, K, 6, 3)
    assert code.shape == tuple(want_code.shape) and log_probs.shape == tuple(want.shape)
    np.testing.assert_allclose(code, want_code.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(log_probs, want.numpy(), rtol=0, atol=1e-4)

    _cli_export(tmp_path / "m", tmp_path / "full.onnx", "--with-backbone", "--flip")
    session = ort.InferenceSession(str(tmp_path / "full.onnx"), providers=["CPUExecutionProvider"])
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    _, log_probs = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        flipped = model(images, flip=True).cluster_log_probs  # (2, K, 32, 32)
        plain = model(images, flip=False).cluster_log_probs
    np.testing.assert_allclose(log_probs, flipped.numpy(), rtol=0, atol=1e-4)
    assert np.abs(log_probs - plain.numpy()).max() > 1e-3  # --flip reached the graph
