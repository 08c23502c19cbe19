"""convert_official on checkpoints written the way the original STEGO code writes them.

Where the fixture's layout comes from (the original repository, ``src/``):

- ``LitUnsupervisedSegmenter.__init__(n_classes, cfg)`` ends with ``save_hyperparameters()``, so
  Lightning 1.x stores ``hyper_parameters = {"n_classes": n, "cfg": <DictConfig>}``; ``cfg`` is
  the Hydra-composed ``configs/train_config.yml`` (the keys of ``_TRAIN_CONFIG`` below). We build
  it with the real omegaconf (``OmegaConf.create``) and let ``torch.save`` pickle it.
- Its modules, in registration order: ``net`` (``DinoFeaturizer``: ``model`` = DINO's
  ``VisionTransformer`` with ``num_classes=0``, ``cluster1`` = ``Sequential(Conv2d(C, D, 1))``,
  ``cluster2`` = ``Sequential(Conv2d(C, C, 1), ReLU, Conv2d(C, D, 1))``),
  ``train_cluster_probe`` / ``cluster_probe`` (``ClusterLookup``: ``clusters`` (K, D)),
  ``linear_probe`` (``Conv2d(D, n, 1)``), ``decoder`` (``Conv2d(D, C, 1)``).
- Lightning 1.x (``CheckpointConnector.dump_checkpoint``) adds ``epoch``, ``global_step``,
  ``pytorch-lightning_version``, ``callbacks`` keyed by the callback *class*, one
  ``optimizer_states`` entry per optimizer (the original has three Adams), ``lr_schedulers``
  and ``hparams_name``.

The tiny ViT has the registry's ``tiny-vit`` shapes (32 wide, 2 blocks, 2 heads, patch 8, 4x4
position grid); the ``stego predict`` test uses the real ViT-S/8 shapes. The expected cluster ids
come from :func:`_original_log_probs`, a re-implementation of the original's forward written
from its source with raw tensors (no timm, no stego). Images are at the position grid's own
size, so DINO's position-embedding resize (tested in test_backbones) does not enter.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import pickletools
import sys
import types
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stego.errors import StegoError
from stego.models.safe_pickle import load_checkpoint, to_plain

omegaconf = pytest.importorskip("omegaconf")  # the dev extra; real DictConfig pickles

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
TINY = dict(dim=32, depth=2, heads=2, hidden=64, patch=8, grid=4)  # the tiny-vit registry entry
VIT_S8 = dict(dim=384, depth=12, heads=6, hidden=1536, patch=8, grid=28)  # DINO ViT-S/8 at 224

# The keys of the original's configs/train_config.yml with its Potsdam values (reference
# section 5 / presets); "stabalize" is the original's spelling.
_TRAIN_CONFIG = {
    "output_root": "../", "pytorch_data_dir": "/datadrive/pytorch-data/",
    "experiment_name": "exp1", "log_dir": "potsdam", "azureml_logging": False,
    "submitting_to_aml": False, "num_workers": 24, "max_steps": 5000, "batch_size": 16,
    "num_neighbors": 7, "dataset_name": "potsdam", "dir_dataset_name": None,
    "dir_dataset_n_classes": 5, "has_labels": False, "crop_type": None, "crop_ratio": 0.5,
    "res": 224, "loader_crop_type": "center", "extra_clusters": 0, "use_true_labels": False,
    "use_recalibrator": False, "model_type": "vit_small", "arch": "dino", "use_fit_model": False,
    "dino_feat_type": "feat", "projection_type": "nonlinear", "dino_patch_size": 8,
    "granularity": 1, "continuous": True, "dim": 70, "dropout": True, "zero_clamp": True,
    "lr": 5e-4, "pretrained_weights": None, "use_salience": False, "stabalize": False,
    "stop_at_zero": True, "pointwise": True, "feature_samples": 11, "neg_samples": 5,
    "aug_alignment_weight": 0.0, "correspondence_weight": 1.0, "neg_inter_weight": 0.63,
    "pos_inter_weight": 0.25, "pos_intra_weight": 0.67, "neg_inter_shift": 0.76,
    "pos_inter_shift": 0.02, "pos_intra_shift": 0.08, "rec_weight": 0.0, "repulsion_weight": 0.0,
    "crf_weight": 0.0, "alpha": 0.5, "beta": 0.15, "gamma": 0.05, "w1": 10.0, "w2": 3.0,
    "shift": 0.0, "crf_samples": 1000, "color_space": "rgb", "reset_probe_steps": None,
    "n_images": 5, "scalar_log_freq": 10, "checkpoint_freq": 50, "val_freq": 100,
    "hist_freq": 100,
}  # fmt: skip
# What the released checkpoints' configs change (reference section 5). Cityscapes asks for 3
# extra clusters here (released: 0) so that K = n_classes + extra_clusters is exercised.
_DATASETS = {
    "potsdam": (3, {}),
    "cocostuff27": (27, dict(model_type="vit_base", dim=90, crop_type="five", batch_size=32,
                             max_steps=7000, neg_inter_weight=0.1538476246415498,
                             pos_inter_weight=1.0, pos_intra_weight=0.1, neg_inter_shift=1.0,
                             pos_inter_shift=0.2, pos_intra_shift=0.12)),
    "cityscapes": (27, dict(model_type="vit_base", dim=100, crop_type="five", batch_size=32,
                            max_steps=7000, pointwise=False, extra_clusters=3,
                            neg_inter_weight=0.9058762625226623,
                            pos_inter_weight=0.577453483136995, pos_intra_weight=1.0,
                            neg_inter_shift=0.31361241889448443,
                            pos_inter_shift=0.1754346515479633, pos_intra_shift=0.45828472207)),
}  # fmt: skip


def train_config(dataset: str = "potsdam") -> tuple[int, dict]:
    n_classes, changes = _DATASETS[dataset]
    return n_classes, {**_TRAIN_CONFIG, "dataset_name": dataset, "log_dir": dataset, **changes}


def original_state(
    vit: dict, code_dim: int, n_classes: int, n_clusters: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The original's state_dict: random values, far from any initialisation."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    c, h, p = vit["dim"], vit["hidden"], vit["patch"]
    state: dict[str, torch.Tensor] = OrderedDict()
    state["net.model.cls_token"] = r(1, 1, c, scale=0.5)
    state["net.model.pos_embed"] = r(1, 1 + vit["grid"] ** 2, c, scale=0.5)
    state["net.model.patch_embed.proj.weight"] = r(c, 3, p, p, scale=2 / (3 * p * p) ** 0.5)
    state["net.model.patch_embed.proj.bias"] = r(c, scale=0.1)
    for i in range(vit["depth"]):
        b = f"net.model.blocks.{i}."
        for name, out, inp in (("attn.qkv", 3 * c, c), ("attn.proj", c, c),
                               ("mlp.fc1", h, c), ("mlp.fc2", c, h)):  # fmt: skip
            state[f"{b}{name}.weight"] = r(out, inp, scale=inp**-0.5)
            state[f"{b}{name}.bias"] = r(out, scale=0.1)
        for norm in ("norm1", "norm2"):
            state[f"{b}{norm}.weight"] = 1 + r(c, scale=0.2)
            state[f"{b}{norm}.bias"] = r(c, scale=0.1)
    state["net.model.norm.weight"] = 1 + r(c, scale=0.2)
    state["net.model.norm.bias"] = r(c, scale=0.1)
    for name, out, inp in (("net.cluster1.0", code_dim, c), ("net.cluster2.0", c, c),
                           ("net.cluster2.2", code_dim, c)):  # fmt: skip
        state[f"{name}.weight"] = r(out, inp, 1, 1, scale=inp**-0.5)
        state[f"{name}.bias"] = r(out, scale=0.1)
    state["train_cluster_probe.clusters"] = r(n_classes, code_dim)
    state["cluster_probe.clusters"] = r(n_clusters, code_dim)
    state["linear_probe.weight"] = r(n_classes, code_dim, 1, 1)
    state["linear_probe.bias"] = r(n_classes)
    state["decoder.weight"] = r(c, code_dim, 1, 1)
    state["decoder.bias"] = r(c)
    return state


@contextlib.contextmanager
def lightning_callback_class() -> Iterator[type]:
    """A stand-in for Lightning's ModelCheckpoint, importable as
    ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`` while saving only.

    Lightning is not a test dependency; pickle records a class by module and qualname, so the
    stand-in makes ``torch.save`` write exactly the global Lightning 1.x writes."""
    names = ("pytorch_lightning", "pytorch_lightning.callbacks",
             "pytorch_lightning.callbacks.model_checkpoint")  # fmt: skip
    before = {name: sys.modules.get(name) for name in names}
    modules = [types.ModuleType(name) for name in names]
    stand_in = type("ModelCheckpoint", (), {"__module__": names[-1]})
    modules[0].callbacks, modules[1].model_checkpoint = modules[1], modules[2]
    modules[2].ModelCheckpoint = stand_in
    sys.modules.update(zip(names, modules, strict=True))
    try:
        yield stand_in
    finally:
        for name, module in before.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def save_lightning_checkpoint(path: Path, state: dict, hparams: dict) -> None:
    """``torch.save`` of the dict Lightning 1.x writes for the original's module."""
    groups = (["net.cluster"], ["linear_probe."], ["cluster_probe."])  # its three Adams
    optimizer_states = []
    for prefixes in groups:
        params = [torch.nn.Parameter(v.clone()) for k, v in state.items()
                  if k.startswith(tuple(prefixes))]  # fmt: skip
        opt = torch.optim.Adam(params, lr=5e-4)
        sum(p.square().sum() for p in params).backward()
        opt.step()
        optimizer_states.append(opt.state_dict())
    with lightning_callback_class() as model_checkpoint:
        torch.save(
            {
                "epoch": 11,
                "global_step": 5000,
                "pytorch-lightning_version": "1.4.9",
                "state_dict": state,
                "callbacks": {
                    model_checkpoint: {
                        "monitor": "test/cluster/mIoU",
                        "best_model_score": torch.tensor(61.2),
                        "best_model_path": "checkpoints/potsdam/epoch=11-step=4799.ckpt",
                        "current_score": torch.tensor(60.8),
                        "dirpath": "checkpoints/potsdam",
                    }
                },
                "optimizer_states": optimizer_states,
                "lr_schedulers": [],
                "hparams_name": "kwargs",
                "hyper_parameters": hparams,
            },
            path,
        )


def write_original(
    path: Path, dataset: str = "potsdam", vit: dict = TINY, cfg: object = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """An original checkpoint at ``path``; returns (state_dict, plain train config)."""
    n_classes, values = train_config(dataset)
    n_clusters = n_classes + values["extra_clusters"]
    state = original_state(vit, values["dim"], n_classes, n_clusters)
    if cfg is None:
        cfg = omegaconf.OmegaConf.create(values)
    save_lightning_checkpoint(path, state, {"n_classes": n_classes, "cfg": cfg})
    return state, values


def _original_log_probs(state: dict, images: torch.Tensor, heads: int) -> torch.Tensor:
    """The original's evaluation forward, images (B, 3, H, W) in [0, 1] -> (B, K, H, W).

    DINO ViT (LayerNorm eps 1e-6, exact GELU), last block after the final norm, patch tokens;
    code = cluster1(f) + cluster2(f); mean of the image's and its mirror's code; bilinear to the
    image size; log_softmax(2 * cosine to the L2-normalised cluster centres)."""
    w = {k[len("net.model.") :]: v for k, v in state.items() if k.startswith("net.model.")}
    patch = w["patch_embed.proj.weight"].shape[-1]

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], eps=1e-6)

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    def code(img: torch.Tensor) -> torch.Tensor:
        b, _, hh, ww = img.shape
        x = F.conv2d((img - MEAN) / STD, w["patch_embed.proj.weight"],
                     w["patch_embed.proj.bias"], stride=patch)  # fmt: skip
        x = torch.cat([w["cls_token"].expand(b, -1, -1), x.flatten(2).transpose(1, 2)], 1)
        assert x.shape[1] == w["pos_embed"].shape[1], "keep images at the position grid size"
        x = x + w["pos_embed"]  # (B, N, C)
        n, c = x.shape[1:]
        for i in range(sum(k.endswith("attn.qkv.weight") for k in w)):
            qkv = lin(norm(x, f"blocks.{i}.norm1"), f"blocks.{i}.attn.qkv")
            q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
            att = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(-1)
            x = x + lin((att @ v).transpose(1, 2).reshape(b, n, c), f"blocks.{i}.attn.proj")
            hid = F.gelu(lin(norm(x, f"blocks.{i}.norm2"), f"blocks.{i}.mlp.fc1"))
            x = x + lin(hid, f"blocks.{i}.mlp.fc2")
        f = norm(x, "norm")[:, 1:].transpose(1, 2).reshape(b, c, hh // patch, ww // patch)
        s = state
        out = F.conv2d(f, s["net.cluster1.0.weight"], s["net.cluster1.0.bias"])
        hid = F.relu(F.conv2d(f, s["net.cluster2.0.weight"], s["net.cluster2.0.bias"]))
        return out + F.conv2d(hid, s["net.cluster2.2.weight"], s["net.cluster2.2.bias"])

    with torch.no_grad():
        c = (code(images) + code(images.flip(3)).flip(3)) / 2
        c = F.interpolate(c, images.shape[-2:], mode="bilinear", align_corners=False)
        cos = torch.einsum("bchw,kc->bkhw", F.normalize(c, dim=1),
                           F.normalize(state["cluster_probe.clusters"], dim=1))  # fmt: skip
        return torch.log_softmax(2 * cos, dim=1)


def _agreement(model, state: dict, heads: int, side: int, n: int = 6) -> float:
    images = torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(3))
    expected = _original_log_probs(state, images, heads)
    with torch.no_grad():
        ours = model(images).cluster_log_probs
    assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()
    return (model.predict(images) == expected.argmax(1)).double().mean().item()


@pytest.fixture
def block_omegaconf_and_lightning(monkeypatch):
    """Call after writing the checkpoint: from then on until the test ends, importing omegaconf
    or Lightning fails, which proves loading never imports them."""

    def block() -> None:
        for name in ("omegaconf", "pytorch_lightning", "lightning"):
            for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                monkeypatch.delitem(sys.modules, loaded)
            monkeypatch.setitem(sys.modules, name, None)

    return block


# ----------------------------------------------------------------------------- the fixture


def test_fixture_pickles_what_the_original_pickles(tmp_path: Path) -> None:
    """The globals named by the pickle are the ones issue #15 lists for a real checkpoint."""
    ckpt = tmp_path / "potsdam.ckpt"
    write_original(ckpt)
    with zipfile.ZipFile(ckpt) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    ops = list(pickletools.genops(data))
    found = {str(arg).replace(" ", ".") for op, arg, _ in ops if op.name == "GLOBAL"}
    assert ops[0][1] == 2  # torch.save's protocol
    assert {g for g in found if not g.startswith("torch")} == {
        "__builtin__.dict", "collections.defaultdict", "omegaconf.base.ContainerMetadata",
        "omegaconf.base.Metadata", "omegaconf.dictconfig.DictConfig", "omegaconf.nodes.AnyNode",
        "typing.Any", "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
        "collections.OrderedDict",
    }  # fmt: skip
    with pytest.raises(pickle.UnpicklingError):  # why the restricted unpickler is needed
        torch.load(ckpt, weights_only=True)


def test_checkpoint_loads_as_plain_data(tmp_path: Path, block_omegaconf_and_lightning) -> None:
    from stego.models.convert_official import official_config

    ckpt = tmp_path / "potsdam.ckpt"
    state, values = write_original(ckpt)
    block_omegaconf_and_lightning()
    loaded = load_checkpoint(ckpt)
    assert official_config(loaded) == {"n_classes": 3, **values}
    plain = to_plain(loaded)
    callbacks = plain["callbacks"]["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"]
    assert callbacks["monitor"] == "test/cluster/mIoU"
    assert len(plain["optimizer_states"]) == 3 and plain["global_step"] == 5000
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in state.items())


# ----------------------------------------------------------------------------- conversion


def test_original_checkpoint_converts_and_predicts_its_ids(
    tmp_path: Path, block_omegaconf_and_lightning, recwarn
) -> None:
    from stego.models.convert_official import convert_official
    from stego.models.pretrained import load

    ckpt = tmp_path / "potsdam_test.ckpt"
    state, values = write_original(ckpt)
    block_omegaconf_and_lightning()
    lines: list[str] = []
    out = convert_official(ckpt, tmp_path / "model", backbone="tiny-vit", log=lines.append)
    assert lines == ["potsdam_test.ckpt: ignored decoder, train_cluster_probe: not needed for "
                     "inference"]  # fmt: skip
    assert not [w for w in recwarn if "ignoring" in str(w.message)]
    model = load(out)
    assert (model.meta.code_dim, model.meta.n_clusters, model.meta.n_classes) == (70, 3, 3)
    assert model.meta.dataset == "potsdam3" and model.meta.head_kind == "nonlinear"
    agreement = _agreement(model, state, TINY["heads"], side=32)
    print(f"pixel agreement with the original's forward: {agreement:.5f}")
    assert agreement >= 0.999
    import json

    official = json.loads((out / "config.json").read_text())["train_config"]["official"]
    assert official["pos_inter_shift"] == 0.02 and official["stabalize"] is False


@pytest.mark.parametrize("dataset", list(_DATASETS))
def test_released_configs(tmp_path: Path, dataset: str) -> None:
    """Potsdam (ViT-S/8, D 70), COCO-Stuff (ViT-B/8, D 90), Cityscapes (ViT-B/8, D 100, extra
    clusters); a tiny ViT stands in for the backbone, whose name comes from the config."""
    from stego.data import dataset_info
    from stego.models.convert_official import _backbone_name, load_official

    ckpt = tmp_path / f"{dataset}.ckpt"
    state, values = write_original(ckpt, dataset)
    n_classes = _DATASETS[dataset][0]
    vit = {k[10:]: v for k, v in state.items() if k.startswith("net.model.")}
    expected_name = "dino-vitb8" if values["model_type"] == "vit_base" else "dino-vits8"
    assert _backbone_name(values, vit, ckpt) == expected_name
    model = load_official(ckpt, backbone="tiny-vit").model
    meta = model.meta
    assert (meta.code_dim, meta.n_classes) == (values["dim"], n_classes)
    assert meta.n_clusters == n_classes + values["extra_clusters"]
    assert meta.class_names == list(dataset_info(dataset).class_names)
    assert _agreement(model, state, TINY["heads"], side=32, n=2) >= 0.999


def test_config_with_namespace_and_paths(tmp_path: Path) -> None:
    """Configs kept as argparse.Namespace, or holding pathlib paths (DictConfig AnyNode)."""
    from stego.models.convert_official import load_official, official_config

    _, values = train_config("potsdam")
    namespace = argparse.Namespace(**{**values, "pytorch_data_dir": Path("/data/pytorch")})
    with_path = omegaconf.OmegaConf.create({**values, "output_root": Path("/runs")})
    for cfg, key, expected in ((namespace, "pytorch_data_dir", "/data/pytorch"),
                               (with_path, "output_root", "/runs")):  # fmt: skip
        ckpt = tmp_path / f"{type(cfg).__name__}.ckpt"
        state, _ = write_original(ckpt, cfg=cfg)
        assert official_config(load_checkpoint(ckpt))[key] == expected
        model = load_official(ckpt, backbone="tiny-vit").model
        assert _agreement(model, state, TINY["heads"], side=32, n=2) >= 0.999


def test_bare_cluster1_names_and_plain_config(tmp_path: Path) -> None:
    from stego.models.convert_official import load_official

    _, values = train_config("potsdam")
    state = original_state(TINY, 70, 3, 3)
    bare = OrderedDict((k.replace("cluster1.0.", "cluster1."), v) for k, v in state.items())
    ckpt = tmp_path / "bare.ckpt"
    torch.save({"state_dict": bare, "hyper_parameters": {"n_classes": 3, "cfg": values}}, ckpt)
    model = load_official(ckpt, backbone="tiny-vit").model
    assert _agreement(model, state, TINY["heads"], side=32, n=2) >= 0.999


def test_unknown_weights_are_warned(tmp_path: Path) -> None:
    from stego.models.convert_official import load_official

    state = original_state(TINY, 70, 3, 3)
    state["net.recalibrator.weight"] = torch.zeros(2)
    ckpt = tmp_path / "extra.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"cfg": train_config()[1]}}, ckpt)
    with pytest.warns(UserWarning, match=r"1 weights .*net\.recalibrator\.weight"):
        load_official(ckpt, backbone="tiny-vit")


def test_config_backbone_must_fit_the_weights(tmp_path: Path) -> None:
    from stego.models.convert_official import convert_official

    ckpt = tmp_path / "x.ckpt"
    write_original(ckpt)
    with pytest.raises(StegoError, match="dino-vits8"):  # config says ViT-S/8, weights are tiny
        convert_official(ckpt, tmp_path / "model")


def test_cli_convert(tmp_path: Path, capsys) -> None:
    from stego.cli import main

    ckpt = tmp_path / "c.ckpt"
    write_original(ckpt)
    args = ["convert-official", str(ckpt), "--out", str(tmp_path / "m"), "--backbone", "tiny-vit"]
    assert main([*args, "--dataset", "cocostuff27"]) == 0
    stdout = capsys.readouterr().out.splitlines()
    assert stdout[0] == "c.ckpt: ignored decoder, train_cluster_probe: not needed for inference"
    assert (tmp_path / "m/config.json").is_file()
    assert main(["convert-official", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path)]) == 2


def _predict_original(tmp_path: Path, vit: dict, side: int, capsys) -> float:
    """Run `stego predict --checkpoint X.ckpt` on two images; agreement with the original."""
    from stego.cli import main

    ckpt = tmp_path / "potsdam_orig.ckpt"
    state, _ = write_original(ckpt, vit=vit)
    rgb = np.random.default_rng(0).integers(0, 256, (2, side, side, 3), dtype=np.uint8)
    for i, picture in enumerate(rgb):
        Image.fromarray(picture).save(tmp_path / f"img{i}.png")
    code = main(["predict", str(tmp_path / "img0.png"), str(tmp_path / "img1.png"),
                 "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--workers", "0", "--quiet"])  # fmt: skip
    assert code == 0
    assert "potsdam_orig.ckpt: ignored decoder, train_cluster_probe" in capsys.readouterr().out
    images = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255
    expected = _original_log_probs(state, images, vit["heads"]).argmax(1).numpy()
    ours = np.stack([np.array(Image.open(tmp_path / f"out/labels/img{i}.png")) for i in (0, 1)])
    return float((ours == expected).mean())


def test_predict_reads_an_original_checkpoint(tmp_path: Path, capsys, monkeypatch) -> None:
    """`stego predict --checkpoint X.ckpt`, with the tiny ViT in place of the config's ViT-S/8."""
    import stego.models.convert_official

    monkeypatch.setattr(stego.models.convert_official, "_backbone_name", lambda *a: "tiny-vit")
    assert _predict_original(tmp_path, TINY, 32, capsys) >= 0.999


@pytest.mark.slow
def test_predict_reads_an_original_vit_s8_checkpoint(tmp_path: Path, capsys) -> None:
    """The same on the original's real ViT-S/8 layout (random weights; ~20 s on 2 CPU cores)."""
    agreement = _predict_original(tmp_path, VIT_S8, 224, capsys)
    print(f"stego predict on the ViT-S/8 checkpoint: pixel agreement {agreement:.5f}")
    assert agreement >= 0.999


# ----------------------------------------------------------------------------- refusals


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
    from stego.models.convert_official import convert_official

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
