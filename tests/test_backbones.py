"""Backbone registry, features, freezing, size checks and checkpoint loading (tiny models, CPU)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from stego.errors import StegoError
from stego.models import backbone as bb
from stego.models import weights as weight_sources
from stego.models.backbone import (
    BACKBONES,
    Backbone,
    build_backbone,
    list_backbones,
    weights_digest,
)
from stego.models.registry import patch_size

TINY = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, img_size=32)


def _timm(spec: bb.BackboneSpec) -> torch.nn.Module:
    return timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **spec.kwargs)


@pytest.mark.parametrize("name", list_backbones())
def test_every_registry_entry_reads_sizes_from_the_model(name: str) -> None:
    # meta tensors: every architecture (giant included) is built and run without allocating memory
    with torch.device("meta"):
        backbone = build_backbone(name, pretrained=False)
        reference = _timm(BACKBONES[name])
        p = backbone.patch_size
        out = backbone(torch.rand(1, 3, 2 * p, 3 * p), with_keys=True)
    assert p == reference.patch_embed.patch_size[0] == patch_size(name)
    assert backbone.embed_dim == reference.embed_dim
    assert backbone.num_heads == reference.blocks[0].attn.num_heads
    assert backbone.num_blocks == len(reference.blocks) == backbone.layer
    assert backbone.weights_digest == "random"
    head_dim = reference.blocks[0].attn.head_dim
    assert out.feat.shape == (1, backbone.embed_dim, 2, 3)
    assert out.keys is not None and out.keys.shape == (1, backbone.num_heads * head_dim, 2, 3)
    assert out.global_feat.shape == (1, backbone.embed_dim)


# one tiny model per family: plain ViT (DINO), ViT with registers (DINOv2-reg), EVA + RoPE (DINOv3)
FAMILIES = {
    "vit": ("vit_small_patch8_224", TINY),
    "vit-reg": ("vit_small_patch14_reg4_dinov2", {**TINY, "img_size": 28}),
    "eva-rope": ("vit_small_patch16_dinov3", {**TINY, "img_size": 32}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_real_forward_per_family(family: str) -> None:
    torch.manual_seed(0)
    arch, kwargs = FAMILIES[family]
    model = timm.create_model(
        arch, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs
    )
    backbone = Backbone(model, name=family)
    p = backbone.patch_size
    out = backbone(torch.rand(2, 3, 2 * p, 3 * p), with_keys=True)
    assert out.feat.shape == (2, 32, 2, 3)
    assert out.keys is not None and out.keys.shape == (2, 32, 2, 3)
    assert torch.isfinite(out.feat).all() and torch.isfinite(out.keys).all()
    torch.testing.assert_close(out.global_feat.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(
        out.global_feat, torch.nn.functional.normalize(out.feat.mean((2, 3)))
    )
    assert backbone(torch.rand(1, 3, p, p)).keys is None


def test_registry_names_match_the_contract() -> None:
    expected = {
        "dino-vits8",
        "dino-vits16",
        "dino-vitb8",
        "dino-vitb16",
        "dinov3-vits16",
        "dinov3-vitb16",
        "imgfocus-saliency-vits14",
        "tiny-vit",
    }
    expected |= {f"dinov2-vit{s}14{r}" for s in "sblg" for r in ("", "-reg")}
    assert set(list_backbones()) == expected
    assert BACKBONES["dino-vits8"].timm_name == "vit_small_patch8_224.dino"
    assert BACKBONES["dinov2-vitl14-reg"].timm_name == "vit_large_patch14_reg4_dinov2.lvd142m"


@pytest.mark.parametrize("extra", [{}, dict(reg_tokens=4, no_embed_class=True)])
def test_feat_matches_timm_final_norm_tokens(extra: dict) -> None:
    # on the native position grid; resized grids are checked against onnxruntime (offline test)
    size = (32, 32)
    torch.manual_seed(0)
    make = lambda: timm.create_model(  # noqa: E731
        "vit_small_patch8_224", num_classes=0, dynamic_img_size=True, **TINY, **extra
    )
    reference = make().eval()
    model = make()
    model.load_state_dict(reference.state_dict())
    backbone = Backbone(model, name="tiny")
    images = torch.rand(2, 3, *size)
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    with torch.no_grad():
        (expected,) = reference.forward_intermediates(
            (images - mean) / std, indices=[1], norm=True, intermediates_only=True
        )
    torch.testing.assert_close(backbone(images).feat, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [1, 2])
def test_keys_are_the_chosen_blocks_attention_keys(layer: int) -> None:
    torch.manual_seed(0)
    backbone = build_backbone("tiny-vit", layer=layer)
    attn = backbone.model.blocks[layer - 1].attn
    seen: list[torch.Tensor] = []
    handle = attn.register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
    out = backbone(torch.rand(1, 3, 16, 24), with_keys=True)
    handle.remove()
    B, N, _ = seen[0].shape
    qkv = attn.qkv(seen[0]).reshape(B, N, 3, attn.num_heads, attn.head_dim)
    keys = qkv[:, 1:, 1].reshape(B, 2, 3, -1).permute(0, 3, 1, 2)  # drop class token
    torch.testing.assert_close(out.keys, keys)


def test_layer_option_and_range() -> None:
    torch.manual_seed(0)
    last = build_backbone("tiny-vit")
    first = build_backbone("tiny-vit", layer=1)
    first.model.load_state_dict(last.model.state_dict())
    images = torch.rand(1, 3, 16, 16)
    assert (first.layer, last.layer) == (1, 2)
    assert not torch.allclose(first(images).feat, last(images).feat)
    for bad in (0, 3):
        with pytest.raises(StegoError, match="choose a layer from 1 to 2"):
            build_backbone("tiny-vit", layer=bad)


def test_frozen_and_always_eval() -> None:
    backbone = build_backbone("tiny-vit")
    assert not any(p.requires_grad for p in backbone.parameters())
    wrapper = torch.nn.Sequential(backbone).train()
    assert not backbone.training and not any(m.training for m in backbone.modules())
    images = torch.rand(1, 3, 16, 16, requires_grad=True)
    assert not backbone(images, with_keys=True).feat.requires_grad
    assert wrapper is not None


def test_size_not_multiple_of_patch_names_the_nearest_sizes() -> None:
    backbone = build_backbone("tiny-vit")
    with pytest.raises(
        StegoError, match="height 230 is not a multiple of the patch size 8.*224 or 232"
    ):
        backbone(torch.rand(1, 3, 230, 224))
    with pytest.raises(StegoError, match="width 5 .* pad to 8"):
        backbone(torch.rand(1, 3, 16, 5))


def test_bad_images_are_rejected() -> None:
    backbone = build_backbone("tiny-vit")
    with pytest.raises(StegoError, match=r"\(B, 3, H, W\)"):
        backbone(torch.rand(3, 16, 16))
    with pytest.raises(StegoError, match="divide uint8 images by 255"):
        backbone(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(StegoError, match="unknown backbone 'vit-huge'.*dino-vitb8.*tiny-vit"):
        build_backbone("vit-huge")


def _tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return build_backbone("tiny-vit").model.state_dict()


def _assert_loaded(path: Path, state: dict[str, torch.Tensor]) -> None:
    backbone = build_backbone("tiny-vit", weights=path)
    loaded = backbone.model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert backbone.weights_digest == weights_digest(state) != "random"


def test_dino_training_checkpoint_round_trips(tmp_path: Path) -> None:
    state = _tiny_state()
    wrapped = {f"module.backbone.{k}": v for k, v in state.items()}
    wrapped["module.head.mlp.0.weight"] = torch.zeros(4, 32)  # DINO projection head: dropped
    wrapped["module.head.last_layer.weight_g"] = torch.ones(8, 1)
    checkpoint = {
        "teacher": wrapped,
        "student": {k: v + 1 for k, v in wrapped.items()},
        "epoch": 3,
        "args": argparse.Namespace(arch="vit_small", patch_size=8),
    }
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    _assert_loaded(tmp_path / "checkpoint.pth", state)  # the teacher is used


def test_plain_official_checkpoint_round_trips(tmp_path: Path) -> None:
    state = _tiny_state()
    torch.save(state, tmp_path / "dino_deitsmall8_pretrain.pth")
    _assert_loaded(tmp_path / "dino_deitsmall8_pretrain.pth", state)


def test_timm_safetensors_round_trips(tmp_path: Path) -> None:
    state = _tiny_state()
    save_file(state, str(tmp_path / "model.safetensors"))
    _assert_loaded(tmp_path / "model.safetensors", state)


def test_mismatched_keys_are_named(tmp_path: Path) -> None:
    state = _tiny_state()
    del state["norm.weight"]
    state["blocks.0.attn.bogus"] = torch.zeros(3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(StegoError, match=r"missing keys \['norm.weight'\].*blocks.0.attn.bogus"):
        build_backbone("tiny-vit", weights=tmp_path / "bad.pth")


def test_wrong_shapes_and_missing_file(tmp_path: Path) -> None:
    state = _tiny_state()
    state["norm.weight"] = torch.zeros(7)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(StegoError, match="wrong shapes"):
        build_backbone("tiny-vit", weights=tmp_path / "shape.pth")
    with pytest.raises(StegoError, match="does not exist"):
        build_backbone("tiny-vit", weights=tmp_path / "nope.pth")


class _Payload:
    def __reduce__(self):  # what a malicious pickle would do
        return (print, ("pickled code ran",))


def test_pickled_code_is_never_executed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.save({"x": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(StegoError, match="cannot read weights file"):
        build_backbone("tiny-vit", weights=tmp_path / "evil.pth")
    assert "pickled code ran" not in capsys.readouterr().out


def test_offline_hub_name_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # empty cache
    start = time.perf_counter()
    with pytest.raises(StegoError, match="--weights FILE.*imgfocus-saliency-vits14"):
        build_backbone("dino-vitb8")
    assert time.perf_counter() - start < 5


def test_unreachable_hub_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(weight_sources, "_hub_offline", lambda: False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    start = time.perf_counter()
    with pytest.raises(StegoError, match="unreachable.*--weights FILE"):
        build_backbone("dinov2-vits14")
    assert time.perf_counter() - start < 5


def test_cached_hub_weights_load_without_network(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    state = _tiny_state()
    save_file(state, str(tmp_path / "model.safetensors"))
    spec = bb.BackboneSpec("vit_small_patch8_224", "dino", kwargs=TINY)
    monkeypatch.setitem(BACKBONES, "tiny-hub", spec)
    cached = str(tmp_path / "model.safetensors")
    monkeypatch.setattr(weight_sources, "_cached_hub_file", lambda *_: cached)
    backbone = build_backbone("tiny-hub")
    assert backbone.weights_digest == weights_digest(state)


def _pos_tokens(backbone: Backbone, h: int, w: int) -> torch.Tensor:
    """Position embedding added to each token (class token first) for an h x w patch grid."""
    model = backbone.model
    x = torch.zeros(1, h, w, backbone.embed_dim)
    with torch.no_grad():
        tokens = model._pos_embed(x)  # (1, 1 + h*w, D): zero patches + cls token, plus positions
    return tokens - torch.cat([model.cls_token, torch.zeros(1, h * w, backbone.embed_dim)], 1)


@pytest.mark.parametrize("name", ["dino-vits8", "dino-vits16"])
def test_dino_v1_resizes_positions_by_its_scale_factor_rule(name: str) -> None:
    # DINO v1 (facebookresearch/dino vision_transformer.interpolate_pos_encoding, also in the
    # original STEGO): bicubic by scale_factor ((H/p + 0.1) / sqrt(N), (W/p + 0.1) / sqrt(N))
    # on the (1, D, sqrt(N), sqrt(N)) grid, align_corners False, class position kept.
    import math

    backbone = build_backbone(name, pretrained=False)
    assert BACKBONES[name].pos_embed == "dino" and backbone.model.stego_pos_embed_rule == "dino"
    pos = backbone.model.pos_embed.detach()  # (1, 1 + N, D)
    n = pos.shape[1] - 1
    side, dim = int(math.sqrt(n)), pos.shape[2]
    grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    for h, w in [(5, 7), (40, 40), (side + 1, side - 3)]:
        scale = ((h + 0.1) / math.sqrt(n), (w + 0.1) / math.sqrt(n))
        resized = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
        expected = torch.cat([pos[:, :1], resized.permute(0, 2, 3, 1).reshape(1, h * w, dim)], 1)
        got = _pos_tokens(backbone, h, w)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        by_size = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        assert (resized - by_size).abs().max() > 1e-3  # timm-style resizing would differ here
    torch.testing.assert_close(_pos_tokens(backbone, side, side), pos, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tiny-vit", "dinov2-vits14"])
def test_other_backbones_keep_resizing_positions_by_target_size(name: str) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(name, pretrained=False)
    model = backbone.model
    assert BACKBONES[name].pos_embed == "size" and model.stego_pos_embed_rule == "size"
    pos = model.pos_embed.detach()
    gh, gw = model.patch_embed.grid_size
    grid = pos[:, 1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
    h, w = gh + 3, gw - 1
    resized = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    expected = torch.cat([pos[:, :1], resized.permute(0, 2, 3, 1).reshape(1, h * w, -1)], 1)
    torch.testing.assert_close(_pos_tokens(backbone, h, w), expected, rtol=0, atol=1e-6)


def test_dinov3_uses_rotary_positions_untouched() -> None:
    assert BACKBONES["dinov3-vits16"].pos_embed == "size"
    with torch.device("meta"):
        backbone = build_backbone("dinov3-vits16", pretrained=False)
    assert not hasattr(backbone.model, "stego_pos_embed_rule")


def test_resize_pos_grid_rejects_unknown_rules() -> None:
    with pytest.raises(StegoError, match="unknown position-embedding rule"):
        bb.resize_pos_grid(torch.zeros(1, 2, 4, 4), (3, 3), "nearest")
