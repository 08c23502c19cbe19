"""convert_official on a synthetic original-layout checkpoint; the restricted unpickler."""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stego.errors import StegoError
from stego.safe_pickle import load_checkpoint, to_plain

D, K, N_CLASSES = 6, 4, 3
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _fake_omegaconf() -> dict[str, types.ModuleType]:
    """Modules named like omegaconf's, holding classes that pickle like DictConfig / nodes."""
    base = types.ModuleType("omegaconf.base")
    dictconfig = types.ModuleType("omegaconf.dictconfig")
    nodes = types.ModuleType("omegaconf.nodes")

    class ContainerMetadata:
        pass

    class DictConfig:
        pass

    class AnyValueNode:
        pass

    for cls, module in ((ContainerMetadata, base), (DictConfig, dictconfig), (AnyValueNode, nodes)):
        cls.__module__ = module.__name__
        cls.__qualname__ = cls.__name__
        setattr(module, cls.__name__, cls)
    return {
        "omegaconf": types.ModuleType("omegaconf"),
        "omegaconf.base": base,
        "omegaconf.dictconfig": dictconfig,
        "omegaconf.nodes": nodes,
    }


def _dictconfig(modules: dict[str, types.ModuleType], values: dict) -> object:
    """An object whose pickle looks like omegaconf's DictConfig (with _parent cycles)."""
    cfg = modules["omegaconf.dictconfig"].DictConfig()
    meta = modules["omegaconf.base"].ContainerMetadata()
    meta.__dict__.update(ref_type=None, object_type=dict, key=None, flags={})
    content = {}
    for key, value in values.items():
        node = modules["omegaconf.nodes"].AnyValueNode()
        node.__dict__.update(_val=value, _parent=cfg, _metadata=meta)
        content[key] = node
    cfg.__dict__.update(_metadata=meta, _parent=None, _content=content)
    return cfg


def _synthetic_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A Lightning checkpoint laid out like the original STEGO's, with tiny-vit-sized weights."""
    from stego.backbones import build_backbone

    torch.manual_seed(0)
    vit = build_backbone("tiny-vit", pretrained=False).model
    for p in vit.parameters():
        p.data.normal_(0, 0.2)
    c = vit.embed_dim
    state: dict[str, torch.Tensor] = OrderedDict(
        (f"net.model.{k}", v.clone()) for k, v in vit.state_dict().items()
    )
    state.update(
        {
            "net.cluster1.weight": torch.randn(D, c, 1, 1),
            "net.cluster1.bias": torch.randn(D),
            "net.cluster2.0.weight": torch.randn(c, c, 1, 1),
            "net.cluster2.0.bias": torch.randn(c),
            "net.cluster2.2.weight": torch.randn(D, c, 1, 1),
            "net.cluster2.2.bias": torch.randn(D),
            "cluster_probe.clusters": torch.randn(K, D),
            "linear_probe.weight": torch.randn(N_CLASSES, D, 1, 1),
            "linear_probe.bias": torch.randn(N_CLASSES),
            "decoder.weight": torch.randn(
                c, D, 1, 1
            ),  # an extra the converter must ignore (warned)
        }
    )
    modules = _fake_omegaconf()
    sys.modules.update(modules)
    try:
        cfg = _dictconfig(
            modules,
            {
                "arch": "dino",
                "model_type": "vit_small",
                "dino_patch_size": 8,
                "dim": D,
                "extra_clusters": 1,
                "dataset_name": "potsdam",
                "dino_feat_type": "feat",
                "continuous": True,
            },
        )
        torch.save(
            {
                "epoch": 3,
                "global_step": 5000,
                "pytorch-lightning_version": "1.4.9",
                "state_dict": state,
                "optimizer_states": [{"state": {}, "param_groups": []}],
                "hyper_parameters": {"n_classes": N_CLASSES, "cfg": cfg},
                "run_args": argparse.Namespace(seed=0),
                "data_dir": Path("/data/potsdam"),
            },
            path,
        )
    finally:
        for name in modules:
            sys.modules.pop(name, None)
    return state


def _manual_log_probs(state: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """The original's prediction rule written out with timm and raw weights: (B, K, H, W)."""
    import timm

    vit = timm.create_model(
        "vit_small_patch8_224",
        pretrained=False,
        num_classes=0,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        img_size=32,
        dynamic_img_size=True,
    )
    vit.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("net.model.")})
    vit.eval()

    def code(x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        patches = F.conv2d(
            (x - MEAN) / STD,
            state["net.model.patch_embed.proj.weight"],
            state["net.model.patch_embed.proj.bias"],
            stride=8,
        )  # (B, C, h/8, w/8)
        pos = state["net.model.pos_embed"]  # (1, 1 + 4*4, C); DINO resizes it bicubic, no antialias
        grid = pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h // 8, w // 8), mode="bicubic", align_corners=False)
        tokens = torch.cat(
            [state["net.model.cls_token"].expand(b, -1, -1), patches.flatten(2).transpose(1, 2)],
            dim=1,
        )
        tokens = tokens + torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
        tokens = vit.norm(vit.blocks(tokens))[:, 1:]  # (B, h*w, C), after the final norm
        f = tokens.transpose(1, 2).reshape(b, -1, h // 8, w // 8)
        lin = F.conv2d(f, state["net.cluster1.weight"], state["net.cluster1.bias"])
        hid = F.relu(F.conv2d(f, state["net.cluster2.0.weight"], state["net.cluster2.0.bias"]))
        return lin + F.conv2d(hid, state["net.cluster2.2.weight"], state["net.cluster2.2.bias"])

    with torch.no_grad():
        c = (code(images) + code(images.flip(-1)).flip(-1)) / 2
        c = F.interpolate(c, size=images.shape[-2:], mode="bilinear", align_corners=False)
        cos = torch.einsum(
            "bdhw,kd->bkhw",
            F.normalize(c, dim=1),
            F.normalize(state["cluster_probe.clusters"], dim=1),
        )
        return F.log_softmax(2 * cos, dim=1)


def test_convert_round_trip(tmp_path: Path) -> None:
    from stego.convert_official import convert_official
    from stego.pretrained import load

    ckpt = tmp_path / "potsdam_test.ckpt"
    state = _synthetic_checkpoint(ckpt)
    with pytest.warns(UserWarning, match="decoder.weight"):
        out = convert_official(ckpt, tmp_path / "model", backbone="tiny-vit")
    model = load(out)
    assert model.meta.n_clusters == K and model.meta.n_classes == N_CLASSES
    assert model.meta.dataset == "potsdam3" and len(model.meta.class_names) == 3
    images = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(1))
    ours = model(images).cluster_log_probs
    expected = _manual_log_probs(state, images)
    assert torch.allclose(ours, expected, atol=1e-5)
    assert torch.equal(model.predict(images), expected.argmax(1))


def test_convert_names_backbone_from_config(tmp_path: Path) -> None:
    from stego.convert_official import convert_official

    ckpt = tmp_path / "x.ckpt"
    _synthetic_checkpoint(ckpt)
    with pytest.raises(StegoError, match="dino-vits8"):  # config says ViT-S/8, weights are tiny
        convert_official(ckpt, tmp_path / "model")


def test_hyper_parameters_become_plain(tmp_path: Path) -> None:
    ckpt = tmp_path / "x.ckpt"
    _synthetic_checkpoint(ckpt)
    loaded = load_checkpoint(ckpt)
    plain = to_plain(loaded["hyper_parameters"])
    assert plain["cfg"]["model_type"] == "vit_small" and plain["cfg"]["dim"] == D
    assert to_plain(loaded["run_args"]) == {"seed": 0}
    assert loaded["data_dir"] == "/data/potsdam"
    assert "omegaconf" not in sys.modules


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", ["torch-zip", "plain-pickle"])
def test_malicious_pickle_refused(tmp_path: Path, fmt: str) -> None:
    marker = tmp_path / "pwned"
    payload = {"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"cfg": _Evil(marker)}}
    ckpt = tmp_path / "evil.ckpt"
    if fmt == "torch-zip":
        torch.save(payload, ckpt)
    else:
        ckpt.write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(StegoError, match=r"evil\.ckpt.*(posix|os)\.system"):
        load_checkpoint(ckpt)
    from stego.convert_official import convert_official

    with pytest.raises(StegoError, match="system"):
        convert_official(ckpt, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_other_dangerous_globals_refused(tmp_path: Path) -> None:
    class Eval:
        def __reduce__(self):
            return (eval, ("1+1",))

    ckpt = tmp_path / "e.pkl"
    ckpt.write_bytes(pickle.dumps({"a": Eval()}))
    with pytest.raises(StegoError, match="builtins.eval"):
        load_checkpoint(ckpt)
    safe = tmp_path / "ok.pt"
    torch.save({"w": torch.arange(3.0), "n": np.float64(2.0).item()}, safe)
    assert torch.equal(load_checkpoint(safe)["w"], torch.arange(3.0))


def test_cli_convert(tmp_path: Path) -> None:
    from stego.cli import main

    ckpt = tmp_path / "c.ckpt"
    _synthetic_checkpoint(ckpt)
    with pytest.warns(UserWarning):
        code = main(
            [
                "convert-official",
                str(ckpt),
                "--out",
                str(tmp_path / "m"),
                "--backbone",
                "tiny-vit",
                "--dataset",
                "cocostuff27",
            ]
        )
    assert code == 0 and (tmp_path / "m/config.json").is_file()
    assert (
        main(["convert-official", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "n")])
        == 2
    )
