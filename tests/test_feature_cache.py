"""Tests of stego.features.cache: build, reopen, resume, disk-space refusal, cached positives."""

from __future__ import annotations

import json
import pickle
import shutil
import threading
from collections import namedtuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import stego.atomic
from stego.errors import StegoError
from stego.features.cache import CachedFeatureDataset, FeatureCache
from stego.features.fingerprint import backbone_fingerprint, item_paths
from stego.features.neighbors import NeighborTable, global_features, positive_index, topk_cosine

BackboneOutput = namedtuple("BackboneOutput", "feat keys global_feat")


class StubBackbone(nn.Module):
    """Backbone contract stand-in: fixed random 1x1 projection of a 4x-downsampled image.

    ``fail_on_call``: raise on that forward call (the cache makes one probe call first).
    """

    name, weights_digest, patch_size, embed_dim, layer = "stub", "stub0001", 4, 8, 1

    def __init__(self, seed: int = 0, fail_on_call: int | None = None) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", torch.randn(8, 3, generator=g))
        self.fail_on_call, self.calls = fail_on_call, 0

    def forward(self, images: torch.Tensor, *, with_keys: bool = False) -> BackboneOutput:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash")
        x = F.avg_pool2d(images, 4)  # (B, 3, h, w)
        feat = torch.einsum("oc,bchw->bohw", self.proj, x - 0.5)  # (B, 8, h, w)
        return BackboneOutput(
            feat, feat * 2 if with_keys else None, F.normalize(feat.mean((2, 3)), dim=1)
        )


class TinyDataset(Dataset):
    def __init__(self, n: int = 30, size: int = 16, odd: int | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = [torch.rand(3, size, size, generator=g) for _ in range(n)]
        if odd is not None:
            self.images[odd] = torch.rand(3, size + 4, size, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "index": i, "path": f"/data/imgs/{i:04d}.png"}


WHERE = {
    "dataset_name": "tiny",
    "split": "train",
    "crop_type": "none",
    "resolution": 16,
    "data_root": "/data",
}


def build(root, backbone=None, dataset=None, **kw):
    opts = {"batch_size": 5, "shard_size": 8, "progress": False, **WHERE, **kw}
    return FeatureCache.build(backbone or StubBackbone(), dataset or TinyDataset(), root, **opts)


def direct_feats(ds: Dataset) -> torch.Tensor:
    with torch.no_grad():
        return StubBackbone()(torch.stack([ds[i]["image"] for i in range(len(ds))])).feat


def test_build_and_reopen(tmp_path):
    ds = TinyDataset()
    built = build(tmp_path / "c", dataset=ds)
    cache = FeatureCache.open(tmp_path / "c", expected_fingerprint=built.fingerprint)
    assert len(cache) == 30 and cache.feat_shape == (8, 4, 4)
    ref = direct_feats(ds)
    got = torch.stack([cache[i] for i in range(30)])
    assert got.dtype == torch.float32 and torch.allclose(got, ref, atol=2e-3, rtol=1e-3)
    assert torch.allclose(
        cache.global_features(),
        global_features(StubBackbone(), ds, batch_size=7, progress=False),
        atol=1e-6,
    )
    shards = sorted(p.name for p in (tmp_path / "c").glob("feats-*.npy"))
    assert shards == [f"feats-{i:05d}.npy" for i in range(4)]  # 8 + 8 + 8 + 6 items
    assert np.load(tmp_path / "c" / "feats-00003.npy", mmap_mode="r").dtype == np.float16
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["fingerprint"]["num_items"] == 30
    assert torch.equal(cache[-1], cache[29])
    with pytest.raises(IndexError):
        cache[30]


def test_cache_pickles_without_data(tmp_path):
    cache = build(tmp_path / "c")
    _ = cache[3]
    blob = pickle.dumps(cache)
    assert len(blob) < 10_000  # memmaps are reopened in the worker, not copied
    assert torch.equal(pickle.loads(blob)[3], cache[3])


def test_with_keys(tmp_path):
    cache = build(tmp_path / "c", with_keys=True)
    assert torch.allclose(cache.keys(2), 2 * cache[2], atol=4e-3)
    with pytest.raises(StegoError, match="no keys"):
        build(tmp_path / "d").keys(0)


def test_interrupted_build_resumes_to_the_same_result(tmp_path):
    ref = build(tmp_path / "ref")
    # call 1 is the shape probe, calls 2.. are batches of up to 5 from each shard's first item:
    # call 4 (items 8-12) fails, after shard 0 (items 0-7) was completed.
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(tmp_path / "c", backbone=StubBackbone(fail_on_call=4))
    root = tmp_path / "c"
    assert (root / "feats-00000.npy").is_file() and not (root / "feats-00001.npy").exists()
    assert not list(root.glob(".*.tmp-*"))
    with pytest.raises(StegoError, match="unfinished"):
        FeatureCache.open(root)
    resumed_backbone = StubBackbone()
    resumed = build(root, backbone=resumed_backbone)
    assert resumed_backbone.calls == 1 + 6  # probe + shards of 8, 8, 6 items in batches of 5
    for name in sorted(p.name for p in (tmp_path / "ref").glob("*.npy")):
        assert np.array_equal(np.load(root / name), np.load(tmp_path / "ref" / name)), name
    assert resumed.fingerprint == ref.fingerprint
    again = StubBackbone()
    build(root, backbone=again)
    assert again.calls == 1  # everything done: only the probe


def test_free_space_refusal(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(stego.atomic.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(StegoError, match="not enough disk space") as refused:
        build(tmp_path / "c")
    assert not list((tmp_path / "c").glob("feats-*"))
    # the size, and the ways around it: no cache, or a cache elsewhere
    assert "needs about 8.6 KB" in str(refused.value)  # 30 x (8x4x4 float16 + 8 float32)
    assert "stego train --live" in str(refused.value) and "--cache-dir" in str(refused.value)


def test_stale_cache_names_the_difference(tmp_path):
    root = tmp_path / "c"
    cache = build(root)
    expected = {**cache.fingerprint, "weights_digest": "other123"}
    with pytest.raises(StegoError) as err:
        FeatureCache.open(root, expected_fingerprint=expected)
    assert "weights_digest: expected 'other123', found 'stub0001'" in str(err.value)
    assert "stego features --dataset tiny --data-root /data" in str(err.value)
    other = StubBackbone(seed=1)
    other.weights_digest = "seed1"
    with pytest.raises(StegoError, match="weights_digest.*Delete"):
        build(root, backbone=other)
    with pytest.raises(StegoError, match="shard_size"):
        build(root, shard_size=16)
    with pytest.raises(StegoError, match="no feature cache"):
        FeatureCache.open(tmp_path / "missing")


def test_mixed_image_sizes_are_refused(tmp_path):
    with pytest.raises(StegoError, match="one image size"):
        build(tmp_path / "c", dataset=TinyDataset(odd=17))


def test_concurrent_builds_do_not_corrupt(tmp_path):
    errors: list[BaseException] = []

    def work() -> None:
        try:
            build(tmp_path / "c")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ref = build(tmp_path / "ref")
    cache = FeatureCache.open(tmp_path / "c", ref.fingerprint)
    assert all(torch.equal(cache[i], ref[i]) for i in range(30))


def test_cached_positives_follow_the_live_rule(tmp_path):
    ds = TinyDataset()
    cache = build(tmp_path / "c", dataset=ds)
    table = NeighborTable(topk_cosine(cache.global_features(), 6), cache.fingerprint)
    data = CachedFeatureDataset(cache, table, num_neighbors=4, seed=7)
    live = StubBackbone()
    for epoch in (0, 1):
        data.set_epoch(epoch)
        for i in range(len(ds)):
            item = data[i]
            pos = positive_index(table.indices[i], 4, seed=7, epoch=epoch, index=i)
            assert item["index"] == i and item["index_pos"] == pos
            assert pos in table.indices[i, 1:5].tolist()
            with torch.no_grad():
                live_pos = live(ds[pos]["image"][None]).feat[0]  # the live-backbone path
            assert torch.allclose(item["feat_pos"], live_pos, atol=2e-3, rtol=1e-3)
            assert torch.equal(item["feat"], cache[i])
    data.set_epoch(0)
    first = [data[i]["index_pos"] for i in range(30)]
    data.set_epoch(1)
    assert first != [data[i]["index_pos"] for i in range(30)]
    with pytest.raises(StegoError, match="num_neighbors"):
        CachedFeatureDataset(cache, table, num_neighbors=6)
    with pytest.raises(StegoError, match="feature cache"):
        CachedFeatureDataset(cache, table.indices[:10], num_neighbors=2)


def test_fingerprint_matches_the_neighbour_table(tmp_path):
    ds = TinyDataset()
    cache = build(tmp_path / "c", dataset=ds)
    fp = backbone_fingerprint(
        StubBackbone(),
        dataset="tiny",
        split="train",
        crop_type="none",
        resolution=16,
        paths=item_paths(ds),
        data_root="/data",
    )
    assert cache.fingerprint == fp


# --------------------------------------------------------------------------- image interpolation
def test_caches_without_the_interpolation_key_read_as_bilinear(tmp_path):
    """Caches and tables written before the fingerprint recorded the interpolation were all
    bilinear: they still open for a bilinear run, without a rebuild, and refuse a nearest one."""
    from stego.features.fingerprint import artifact_dir

    ds = TinyDataset()
    root = tmp_path / "c"
    build(root, dataset=ds)
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["fingerprint"]["interpolation"]  # as such a cache's manifest reads
    (root / "manifest.json").write_text(json.dumps(manifest))
    fp = backbone_fingerprint(StubBackbone(), dataset="tiny", split="train", crop_type="none",
                              resolution=16, paths=item_paths(ds), data_root="/data")
    assert fp["interpolation"] == "bilinear"
    FeatureCache.open(root, fp)
    stamps = {p.name: p.stat().st_mtime_ns for p in root.glob("*.npy")}
    build(root, dataset=ds)  # the same build again: no shard is written anew
    assert {p.name: p.stat().st_mtime_ns for p in root.glob("*.npy")} == stamps
    nearest = {**fp, "interpolation": "nearest"}
    with pytest.raises(StegoError, match="interpolation: expected 'nearest', found 'bilinear'"):
        FeatureCache.open(root, nearest)
    old_fp = {k: v for k, v in fp.items() if k != "interpolation"}
    NeighborTable(torch.zeros(30, 2, dtype=torch.int64), old_fp).save(tmp_path / "t.safetensors")
    NeighborTable.load(tmp_path / "t.safetensors", fp)
    with pytest.raises(StegoError, match="interpolation"):
        NeighborTable.load(tmp_path / "t.safetensors", nearest)
    # bilinear artefacts keep their folder; nearest ones get their own beside it
    assert artifact_dir("/data", old_fp) == artifact_dir("/data", fp)
    assert artifact_dir("/data", nearest) == artifact_dir("/data", fp).parent.parent / (
        artifact_dir("/data", fp).parent.name + "_nearest") / artifact_dir("/data", fp).name


def test_nearest_run_does_not_reuse_a_bilinear_cache(tmp_path):
    """The split's artefacts as training and the commands open them (stego.features.split):
    after a bilinear build, a nearest run builds its own cache and table, holding the features
    of the nearest-resized images."""
    from PIL import Image

    from stego.features.split import PreparedSplit, SplitSpec
    from stego.models.backbone import build_backbone

    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i in range(6):  # 48x40 noise: the two resizes to 32 differ everywhere
        pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "imgs" / f"{i}.png")
    backbone = build_backbone("tiny-vit")
    run = {"device": "cpu", "batch_size": 4, "num_workers": 0, "progress": False}
    specs = {
        how: SplitSpec("folder", tmp_path / "imgs", "all", resolution=32, interpolation=how,
                       cache_dir=tmp_path / "cache")
        for how in ("bilinear", "nearest")
    }
    splits = {how: PreparedSplit(spec, backbone) for how, spec in specs.items()}
    data = {how: split.dataset for how, split in splits.items()}
    caches = {how: split.feature_cache(True, **run) for how, split in splits.items()}
    assert caches["nearest"].root != caches["bilinear"].root
    assert caches["nearest"].root.parent.parent.name == "all_none_32_nearest"
    assert caches["bilinear"].root.parent.parent.name == "all_none_32"
    assert caches["nearest"].fingerprint["interpolation"] == "nearest"
    with torch.no_grad():
        images = torch.stack([data["nearest"][i]["image"] for i in range(6)])
        direct = backbone(images).feat  # (6, C, h, w) of the nearest-resized images
    rows = {how: torch.stack([c[i] for i in range(6)]) for how, c in caches.items()}
    assert torch.allclose(rows["nearest"], direct, atol=2e-2, rtol=1e-2)
    assert not torch.allclose(rows["bilinear"], direct, atol=2e-2, rtol=1e-2)
    for how in specs:
        splits[how].neighbor_table(3, cache=caches[how], **run)
    tables = sorted((tmp_path / "cache").rglob("neighbors_k3.safetensors"))
    assert [NeighborTable.load(t).fingerprint["interpolation"] for t in tables] == [
        "bilinear", "nearest"]
    with pytest.raises(StegoError, match="interpolation"):  # never read under the other name
        FeatureCache.open(caches["bilinear"].root, splits["nearest"].fingerprint)
