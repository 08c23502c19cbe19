"""Untrusted files: a pickle that would run code is refused everywhere stego reads a file.

The "evil" object's ``__reduce__`` calls ``pathlib.Path(marker).touch()`` (or
``os.system("touch marker")``); each test checks the load is refused AND the marker was never
created, i.e. the callable was never resolved, let alone called.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from stego.cli import main
from stego.errors import StegoError


@pytest.fixture(params=["touch", "system"])
def evil(request, tmp_path, helpers):
    marker = tmp_path / f"PWNED-{request.param}"
    obj = helpers.Evil(marker) if request.param == "touch" else helpers.EvilSystem(marker)
    return obj, marker


def test_evil_object_really_is_evil(evil, tmp_path) -> None:
    """Sanity check of the fixture: plain pickle.loads runs the payload."""
    obj, marker = evil
    pickle.loads(pickle.dumps(obj))
    assert marker.exists()


# ----------------------------------------------------------------------------- backbone weights


def test_backbone_weights_pth_refused(evil, tmp_path) -> None:
    from stego.models.backbone import build_backbone

    obj, marker = evil
    path = tmp_path / "weights.pth"
    torch.save({"pos_embed": torch.zeros(1, 2, 3), "payload": obj}, path)
    with pytest.raises(StegoError) as info:
        build_backbone("tiny-vit", weights=path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_backbone_weights_plain_pickle_refused(evil, tmp_path) -> None:
    from stego.models.backbone import build_backbone

    obj, marker = evil
    path = tmp_path / "weights.pth"
    path.write_bytes(pickle.dumps({"payload": obj}))
    with pytest.raises(StegoError):
        build_backbone("tiny-vit", weights=path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- Lightning ckpt


def test_lightning_checkpoint_in_evaluation_refused(evil, tmp_path) -> None:
    from stego.eval.loading import load_for_eval

    obj, marker = evil
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"head.x": torch.zeros(1)}, "hyper_parameters": {"p": obj}}, path)
    with pytest.raises(StegoError) as info:
        load_for_eval(path)
    assert str(path) in str(info.value)
    assert not marker.exists()
    run = tmp_path / "run"  # the same file found as a run folder's checkpoints/last.ckpt
    (run / "checkpoints").mkdir(parents=True)
    path.rename(run / "checkpoints" / "last.ckpt")
    with pytest.raises(StegoError):
        load_for_eval(run)
    assert not marker.exists()


def test_evil_checkpoint_cli_error_is_one_line(tmp_path, helpers, capsys) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"p": helpers.Evil(marker)}}, path)
    code = main(["eval", "--checkpoint", str(path), "--data-root", str(tmp_path), "--out",
                 str(tmp_path / "e"), "--dataset", "camvid", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and not marker.exists()
    assert err.count("\n") == 0 and "\x1b[" not in err, err


# ----------------------------------------------------------------------------- convert-official


def test_safe_pickle_refuses_zip_checkpoint(evil, tmp_path) -> None:
    from stego.models.safe_pickle import load_checkpoint

    obj, marker = evil
    path = tmp_path / "official.ckpt"
    torch.save({"state_dict": {"net.model.cls_token": torch.zeros(1, 1, 4)},
                "hyper_parameters": {"cfg": obj}}, path)  # fmt: skip
    with pytest.raises(StegoError, match="refused to load the Python global") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_safe_pickle_refuses_plain_pickle(evil, tmp_path, protocol) -> None:
    from stego.models.safe_pickle import load_checkpoint

    obj, marker = evil
    path = tmp_path / "official.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": {}, "payload": obj}, protocol=protocol))
    with pytest.raises(StegoError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_safe_pickle_refuses_builtins_eval_and_getattr(tmp_path) -> None:
    """Allowlisted modules with dangerous members: builtins.eval / getattr, torch internals."""
    from stego.models.safe_pickle import load_checkpoint

    marker = tmp_path / "PWNED"
    payloads = {
        "eval": b"cbuiltins\neval\n(V__import__('pathlib').Path('" + str(marker).encode()
        + b"').touch()\ntR.",
        "getattr": b"cbuiltins\ngetattr\n(cbuiltins\nstr\nVjoin\ntR.",
        "torch.load": b"ctorch\nload\n(V/etc/passwd\ntR.",
        "torch.hub": b"ctorch.hub\nload\n(Vx\nVy\ntR.",
    }
    for name, data in payloads.items():
        path = tmp_path / f"{name}.ckpt"
        path.write_bytes(data)
        with pytest.raises(StegoError, match="refused|cannot read"):
            load_checkpoint(path)
    assert not marker.exists()


def test_convert_official_refuses(evil, tmp_path) -> None:
    from stego.models.convert_official import convert_official

    obj, marker = evil
    path = tmp_path / "official.ckpt"
    torch.save({"state_dict": {"net.model.cls_token": torch.zeros(1, 1, 4)},
                "hyper_parameters": {"cfg": {"x": obj}}}, path)  # fmt: skip
    with pytest.raises(StegoError, match="refused"):
        convert_official(path, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_convert_official_cli_refuses_in_one_line(tmp_path, helpers, capsys) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / "official.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": {}, "p": helpers.Evil(marker)}))
    code = main(["convert-official", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "refused" in err
    assert not marker.exists()


class _DefaultDict:
    """Pickles as ``collections.defaultdict(factory)``, the way omegaconf's resolver cache does."""

    def __init__(self, factory) -> None:
        self.factory = factory

    def __reduce__(self):
        import collections

        return (collections.defaultdict, (self.factory,) if self.factory else ())


@pytest.mark.parametrize("factory", [os.system, eval, str, getattr])
def test_defaultdict_with_unsafe_factory_refused(tmp_path, factory) -> None:
    """Only dict / list / no factory: anything else would run on the first missing key."""
    from stego.models.safe_pickle import load_checkpoint

    path = tmp_path / "dd.ckpt"
    torch.save({"state_dict": {}, "cache": _DefaultDict(factory)}, path)
    name = "system" if factory is os.system else factory.__name__
    with pytest.raises(StegoError, match=rf"refused.*{name}") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("factory", [dict, list, None])
def test_defaultdict_with_safe_factory_loads(tmp_path, factory) -> None:
    from stego.models.safe_pickle import load_checkpoint

    path = tmp_path / "dd.ckpt"
    torch.save({"cache": _DefaultDict(factory), "w": torch.ones(2)}, path)
    cache = load_checkpoint(path)["cache"]
    assert isinstance(cache, defaultdict) and cache.default_factory is factory and not cache


def test_lightning_callback_class_is_only_a_name(tmp_path, monkeypatch) -> None:
    """Lightning 1.x keys `callbacks` by class: naming one loads, building one is refused, and
    other Lightning globals are refused. A stand-in class registered as Lightning's module while
    saving makes torch.save record the global Lightning writes."""
    import types

    from stego.models.safe_pickle import load_checkpoint, to_plain

    module = "pytorch_lightning.callbacks.model_checkpoint"
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    stand_in = type("ModelCheckpoint", (), {"__module__": module})
    sys.modules[module].ModelCheckpoint = stand_in
    torch.save({"callbacks": {stand_in: {"monitor": "test/cluster/mIoU"}}}, tmp_path / "key.ckpt")
    monkeypatch.undo()
    name = f"{module}.ModelCheckpoint"
    loaded = to_plain(load_checkpoint(tmp_path / "key.ckpt"))
    assert loaded == {"callbacks": {name: {"monitor": "test/cluster/mIoU"}}}
    (tmp_path / "built.ckpt").write_bytes(f"c{module}\nModelCheckpoint\n)R.".encode())
    with pytest.raises(StegoError, match="refused to create an object of " + name):
        load_checkpoint(tmp_path / "built.ckpt")
    (tmp_path / "trainer.ckpt").write_bytes(b"cpytorch_lightning.trainer.trainer\nTrainer\n)R.")
    with pytest.raises(StegoError, match="refused.*Trainer"):
        load_checkpoint(tmp_path / "trainer.ckpt")


def test_predict_original_checkpoint_refused_in_one_line(evil, tmp_path, capsys) -> None:
    """`stego predict --checkpoint X.ckpt` reads an original checkpoint: still no code runs."""
    obj, marker = evil
    path = tmp_path / "official.ckpt"
    torch.save({"state_dict": {"net.model.cls_token": torch.zeros(1, 1, 4)},
                "hyper_parameters": {"cfg": {"x": obj}}}, path)  # fmt: skip
    (tmp_path / "img").mkdir()
    code = main(["predict", str(tmp_path / "img"), "--checkpoint", str(path), "--out",
                 str(tmp_path / "out"), "--workers", "0", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "refused" in err
    assert not marker.exists()


# ----------------------------------------------------------------------------- neighbour tables


def test_neighbor_npz_object_array_refused(evil, tmp_path) -> None:
    from stego.features.neighbors import NeighborTable

    obj, marker = evil
    path = tmp_path / "nns_train.npz"
    np.savez(path, nns=np.array([obj, obj], dtype=object))
    with pytest.raises(StegoError) as info:
        NeighborTable.load(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_neighbor_safetensors_with_pickle_inside_refused(evil, tmp_path) -> None:
    from stego.features.neighbors import NeighborTable

    obj, marker = evil
    path = tmp_path / "neighbors_k5.safetensors"
    torch.save({"indices": obj}, path)
    with pytest.raises(StegoError, match="cannot read neighbour table"):
        NeighborTable.load(path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- feature caches


@pytest.fixture
def tiny_cache(tmp_path, helpers):
    from stego.data import PairTransform, build_dataset
    from stego.features.cache import FeatureCache
    from stego.models.backbone import build_backbone

    images = helpers.write_folder(tmp_path / "img", 6, size=(32, 32))
    ds = build_dataset("folder", images, transform=PairTransform(32, crop="center"))
    backbone = build_backbone("tiny-vit", pretrained=False)
    root = tmp_path / "cache"
    FeatureCache.build(backbone, ds, root, dataset_name="folder", split="all", resolution=32,
                       shard_size=4, progress=False)  # fmt: skip
    return root


def _poison_cache(root: Path, obj) -> None:
    np.save(root / "feats-00000.npy", np.array([obj] * 4, dtype=object), allow_pickle=True)
    np.save(root / "global-00001.npy", np.array([obj] * 2, dtype=object), allow_pickle=True)


def test_feature_cache_object_arrays_never_unpickled(evil, tiny_cache) -> None:
    from stego.features.cache import FeatureCache

    obj, marker = evil
    _poison_cache(tiny_cache, obj)
    cache = FeatureCache.open(tiny_cache)
    with pytest.raises((StegoError, ValueError)):
        cache[0]
    with pytest.raises((StegoError, ValueError)):
        cache.global_features()
    assert not marker.exists()


def test_feature_cache_tampered_shard_is_a_stego_error(tiny_cache, helpers, tmp_path) -> None:
    from stego.features.cache import FeatureCache

    _poison_cache(tiny_cache, helpers.Evil(tmp_path / "PWNED"))
    cache = FeatureCache.open(tiny_cache)
    with pytest.raises(StegoError, match="feats-00000.npy"):
        cache[0]
    with pytest.raises(StegoError, match="global-00001.npy"):
        cache.global_features()


def test_feature_cache_manifest_is_json_only(evil, tiny_cache) -> None:
    from stego.features.cache import FeatureCache

    obj, marker = evil
    (tiny_cache / "manifest.json").write_bytes(pickle.dumps({"format": obj}))
    with pytest.raises(StegoError):
        FeatureCache.open(tiny_cache)
    assert not marker.exists()


def test_feature_cache_binary_manifest_is_a_stego_error(tiny_cache, helpers, tmp_path) -> None:
    from stego.features.cache import FeatureCache

    (tiny_cache / "manifest.json").write_bytes(pickle.dumps({"f": helpers.Evil(tmp_path / "P")}))
    with pytest.raises(StegoError, match="manifest.json"):
        FeatureCache.open(tiny_cache)


# ----------------------------------------------------------------------------- model folders


@pytest.fixture
def model_dir(tmp_path, helpers):
    from stego.models.pretrained import save_pretrained

    return save_pretrained(helpers.tiny_segmenter(), tmp_path / "model")


def test_model_dir_with_pickle_weights_never_unpickled(evil, model_dir) -> None:
    from stego.models.pretrained import load

    obj, marker = evil
    torch.save({"head.linear.weight": obj}, model_dir / "model.safetensors")
    with pytest.raises(StegoError):
        load(model_dir)
    assert not marker.exists()


def test_model_dir_with_pickle_weights_is_a_stego_error(model_dir, helpers, tmp_path) -> None:
    from stego.models.pretrained import load

    torch.save({"x": helpers.Evil(tmp_path / "PWNED")}, model_dir / "model.safetensors")
    with pytest.raises(StegoError, match="model.safetensors"):
        load(model_dir)


def test_model_dir_config_is_json_only(evil, model_dir) -> None:
    from stego.models.pretrained import load

    obj, marker = evil
    (model_dir / "config.json").write_bytes(pickle.dumps({"meta": obj}))
    with pytest.raises(StegoError):
        load(model_dir)
    assert not marker.exists()


def test_model_dir_binary_config_is_a_stego_error(model_dir, helpers, tmp_path) -> None:
    from stego.models.pretrained import load

    (model_dir / "config.json").write_bytes(pickle.dumps({"m": helpers.Evil(tmp_path / "P")}))
    with pytest.raises(StegoError, match="config.json"):
        load(model_dir)
