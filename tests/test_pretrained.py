"""Segmenter on any image size, and the save / load format (safetensors + JSON, no pickle)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import stego
from stego.errors import StegoError
from stego.models.backbone import build_backbone
from stego.models.heads import SegmentationHead
from stego.models.probes import ClusterProbe, LinearProbe
from stego.models.segmenter import Segmenter, SegmenterMeta


def _model(linear: bool = True) -> Segmenter:
    torch.manual_seed(0)
    backbone = build_backbone("tiny-vit", pretrained=False)
    head = SegmentationHead(backbone.embed_dim, 6)
    meta = SegmenterMeta(
        backbone="tiny-vit",
        backbone_layer=None,
        head_kind="nonlinear",
        code_dim=6,
        n_clusters=4,
        n_classes=3 if linear else None,
        class_names=["a", "b", "c"],
        palette=[[1, 2, 3]] * 3,
    )
    return Segmenter(
        backbone, head, ClusterProbe(6, 4), LinearProbe(6, 3) if linear else None, meta
    ).eval()


@pytest.mark.parametrize("size", [(32, 32), (37, 53), (8, 200)])
def test_any_size_gives_outputs_of_that_size(size: tuple[int, int]) -> None:
    model = _model()
    out = model(torch.rand(2, 3, *size))
    assert out.cluster_log_probs.shape == (2, 4, *size)
    assert out.linear_log_probs is not None and out.linear_log_probs.shape == (2, 3, *size)
    assert torch.allclose(out.cluster_log_probs.exp().sum(1), torch.ones(2, *size), atol=1e-5)
    assert model.predict(torch.rand(1, 3, *size)).shape == (1, *size)


def test_flip_averaging_is_flip_equivariant() -> None:
    model = _model()
    images = torch.rand(1, 3, 32, 48)
    a = model(images).cluster_log_probs
    b = model(images.flip(-1)).cluster_log_probs.flip(-1)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("include_backbone", [False, True])
def test_save_load_round_trip_is_exact(tmp_path: Path, include_backbone: bool) -> None:
    model = _model()
    stego.save_pretrained(
        model, tmp_path / "m", include_backbone=include_backbone, train_config={"note": 1}
    )
    loaded = stego.load(tmp_path / "m")
    images = torch.rand(2, 3, 40, 24)
    assert torch.equal(model(images).cluster_log_probs, loaded(images).cluster_log_probs)
    assert loaded.meta.class_names == ["a", "b", "c"]
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["includes_backbone"] is include_backbone and config["train_config"] == {"note": 1}


def test_model_without_linear_probe(tmp_path: Path) -> None:
    stego.save_pretrained(_model(linear=False), tmp_path / "m")
    assert stego.load(tmp_path / "m").linear_probe is None


def test_interrupted_save_is_refused(tmp_path: Path) -> None:
    stego.save_pretrained(_model(), tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()  # as if killed before the config was written
    with pytest.raises(StegoError, match="interrupted"):
        stego.load(tmp_path / "m")


def test_missing_directory_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(StegoError, match="stego train"):
        stego.load(tmp_path / "nothing-here")


def test_weights_that_do_not_match_the_config_are_refused(tmp_path: Path) -> None:
    stego.save_pretrained(_model(), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["meta"]["code_dim"] = 9
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(StegoError, match="does not match"):
        stego.load(tmp_path / "m")
