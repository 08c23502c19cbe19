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


def test_cli(tmp_path: Path) -> None:
    from stego.cli import main
    from stego.models.pretrained import save_pretrained

    save_pretrained(_model(), tmp_path / "m", include_backbone=True)
    assert (
        main(
            [
                "export-onnx",
                "--checkpoint",
                str(tmp_path / "m"),
                "--out",
                str(tmp_path / "x.onnx"),
                "--height",
                "32",
                "--width",
                "32",
            ]
        )
        == 0
    )
    assert (tmp_path / "x.onnx").is_file()
