"""Tests of stego.features.neighbors: exact top-k, chunking, faiss, groups, memory, tables,
positives."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from stego.errors import StegoError
from stego.features.fingerprint import backbone_fingerprint, items_digest, make_fingerprint
from stego.features.neighbors import (
    NeighborTable,
    chunk_rows,
    collect_global_features,
    global_features,
    original_table_path,
    positive_index,
    sample_positive,
    topk_cosine,
)

HAS_FAISS = importlib.util.find_spec("faiss") is not None


class StubBackbone(nn.Module):
    """Backbone contract stand-in: fixed random 1x1 projection of a 4x-downsampled image."""

    name, weights_digest, patch_size, embed_dim, layer = "stub", "stub0001", 4, 8, 1

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", torch.randn(8, 3, generator=g))
        self.dropout = nn.Dropout(0.5)  # must be off during feature extraction

    def forward(self, images: torch.Tensor, *, with_keys: bool = False):
        from collections import namedtuple

        out = namedtuple("BackboneOutput", "feat keys global_feat")
        x = F.avg_pool2d(images, 4)  # (B, 3, h, w)
        feat = self.dropout(torch.einsum("oc,bchw->bohw", self.proj, x - 0.5))  # (B, 8, h, w)
        return out(feat, feat * 2 if with_keys else None, F.normalize(feat.mean((2, 3)), dim=1))


class TinyDataset(Dataset):
    def __init__(self, n: int = 20, size: int = 16, seed: int = 0, odd: int | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = [torch.rand(3, size, size, generator=g) for _ in range(n)]
        if odd is not None:
            self.images[odd] = torch.rand(3, size, size + 4, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "index": i, "path": f"/data/imgs/{i:04d}.png"}


def brute_force(feats: torch.Tensor, k: int, groups: torch.Tensor | None = None) -> np.ndarray:
    x = F.normalize(feats.double(), dim=1).numpy()
    sims = x @ x.T
    out = np.zeros((len(x), k), dtype=np.int64)
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        if groups is not None:
            keep &= groups.numpy() != int(groups[i])
        others = np.nonzero(keep)[0]
        order = np.lexsort((others, -sims[i, others]))
        out[i] = np.concatenate([[i], others[order[: k - 1]]])
    return out


@pytest.fixture(scope="module")
def feats() -> torch.Tensor:
    return torch.randn(500, 32, generator=torch.Generator().manual_seed(0))


def test_topk_equals_brute_force(feats):
    ref = brute_force(feats, 30)
    assert np.array_equal(topk_cosine(feats, 30).numpy(), ref)


def test_chunked_unchunked_faiss_agree(feats):
    full = topk_cosine(feats, 30, chunk_size=len(feats))
    assert torch.equal(topk_cosine(feats, 30, chunk_size=7), full)
    assert torch.equal(topk_cosine(feats, 30, max_memory_bytes=1), full)  # one row per chunk
    if HAS_FAISS:
        assert torch.equal(topk_cosine(feats, 30, backend="faiss"), full)
        assert torch.equal(topk_cosine(feats, 30, backend="faiss", chunk_size=33), full)


def test_row_block_equals_the_same_rows_of_the_full_table(feats):
    full = topk_cosine(feats, 30)
    groups = torch.arange(len(feats)) // 5
    grouped = topk_cosine(feats, 30, exclude_groups=groups)
    for backend in ("torch", "faiss") if HAS_FAISS else ("torch",):
        part = topk_cosine(feats, 30, rows=(13, 57), chunk_size=9, backend=backend)
        assert torch.equal(part, full[13:57])
        part = topk_cosine(feats, 30, rows=(40, 41), exclude_groups=groups, backend=backend)
        assert torch.equal(part, grouped[40:41])
    with pytest.raises(StegoError, match="rows"):
        topk_cosine(feats, 30, rows=(5, 5))


def test_ties_lower_index_first():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    x[10] = x[3]
    x[40] = x[3]
    x[20:30] = x[5]  # ten identical items: ties cross the top-k boundary
    ref = brute_force(x, 5)
    assert list(ref[3, :3]) == [3, 10, 40] and list(ref[40, :3]) == [40, 3, 10]
    assert np.array_equal(topk_cosine(x, 5).numpy(), ref)
    assert np.array_equal(topk_cosine(x, 5, chunk_size=3).numpy(), ref)
    if HAS_FAISS:
        assert np.array_equal(topk_cosine(x, 5, backend="faiss").numpy(), ref)


def test_exclude_groups(feats):
    groups = torch.arange(len(feats)) // 5  # five sibling crops per image
    ref = brute_force(feats, 10, groups)
    got = topk_cosine(feats, 10, exclude_groups=groups, chunk_size=64)
    assert np.array_equal(got.numpy(), ref)
    assert torch.equal(got[:, 0], torch.arange(len(feats)))
    assert not (groups[got[:, 1:]] == groups[:, None]).any()
    if HAS_FAISS:
        assert torch.equal(topk_cosine(feats, 10, exclude_groups=groups, backend="faiss"), got)


def test_too_many_excluded_is_an_error():
    x = torch.randn(10, 4)
    with pytest.raises(StegoError, match="eligible neighbours"):
        topk_cosine(x, 8, exclude_groups=torch.arange(10) // 5)


def test_bad_arguments():
    with pytest.raises(StegoError, match="k must be"):
        topk_cosine(torch.randn(5, 3), 6)
    with pytest.raises(StegoError, match="unknown neighbour backend"):
        topk_cosine(torch.randn(5, 3), 2, backend="annoy")
    with pytest.raises(StegoError, match="NaN"):
        topk_cosine(torch.full((5, 3), float("nan")), 2)


def test_missing_faiss_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(StegoError, match="pip install"):
        topk_cosine(torch.randn(20, 4), 3, backend="faiss")


@pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")
def test_faiss_approximate_recall():
    x = torch.randn(4000, 16, generator=torch.Generator().manual_seed(2))
    exact = topk_cosine(x, 10)
    approx = topk_cosine(x, 10, backend="faiss", approximate=True)
    assert torch.equal(approx[:, 0], torch.arange(4000))
    recall = np.mean(
        [
            len(set(a) & set(b)) / 9
            for a, b in zip(exact[:, 1:].tolist(), approx[:, 1:].tolist(), strict=True)
        ]
    )
    assert recall > 0.8


def test_chunk_budget():
    rows = chunk_rows(20_000, 30, 8 * 2**20)
    assert rows * (20_000 * 5 + 30 * 32) <= 8 * 2**20 and rows >= 1


MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, torch
    def peak_rss():  # VmHWM: ru_maxrss also counts the parent's memory before exec
        try:
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    from stego.features.neighbors import topk_cosine
    torch.set_num_threads(1)  # one thread, one malloc arena: measures the algorithm, not glibc
    x = torch.randn(20_000, 64, generator=torch.Generator().manual_seed(0))
    topk_cosine(x[:2000], 30, max_memory_bytes=8 * 2**20)  # warm up kernels and threads
    with open("/proc/self/statm") as f:
        rss_before = int(f.read().split()[1]) * resource.getpagesize()
    out = topk_cosine(x, 30, max_memory_bytes=8 * 2**20)
    peak = peak_rss()
    assert out.shape == (20_000, 30) and bool((out[:, 0] == torch.arange(20_000)).all())
    print(max(0, peak - rss_before))
    """
)


@pytest.mark.slow
def test_memory_stays_bounded_for_large_n():
    """N=20,000, C=64: the full similarity matrix would be 1.6 GB; with an 8 MB chunk budget
    (~80 query rows per chunk, 250 chunks) the extra peak RSS must stay below budget + normalised
    copy (N*C*4 = 5 MB) + result (N*k*8 = 4.8 MB) + 40 MB slack for the allocator, BLAS and
    top-k buffers, i.e. under 60 MB (measured: about 15 MB)."""
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=300, env=env
    )
    assert res.returncode == 0, res.stderr
    extra = int(res.stdout.strip().splitlines()[-1])
    assert extra < 60 * 2**20, f"peak extra memory {extra / 2**20:.1f} MB"


def fp(**over):
    base = make_fingerprint(
        backbone="dino-vits8",
        weights_digest="abcd1234",
        layer=12,
        dataset="cocostuff27",
        split="train",
        crop_type="five",
        resolution=224,
        paths=[f"/d/{i}.jpg" for i in range(6)],
        data_root="/data",
    )
    return {**base, **over}


def test_table_roundtrip_and_stale_fingerprint(tmp_path):
    table = NeighborTable(topk_cosine(torch.randn(6, 4), 3), fp())
    path = table.save(tmp_path / "t" / "neighbors_k3.safetensors")
    loaded = NeighborTable.load(path, expected_fingerprint=fp())
    assert torch.equal(loaded.indices, table.indices) and loaded.fingerprint == fp()
    with pytest.raises(StegoError) as err:
        NeighborTable.load(path, expected_fingerprint=fp(weights_digest="ffff0000", resolution=320))
    msg = str(err.value)
    assert "weights_digest: expected 'ffff0000', found 'abcd1234'" in msg
    assert (
        "resolution: expected 320, found 224" in msg and "backbone" not in msg.split("Rebuild")[0]
    )
    assert (
        "stego knn --dataset cocostuff27 --data-root /data --split train --backbone dino-vits8"
        in msg
    )
    moved = fp(items_sha256=items_digest([f"/d/{i}.jpg" for i in (1, 0, 2, 3, 4, 5)]))
    with pytest.raises(StegoError, match="ordered item list"):
        NeighborTable.load(path, expected_fingerprint=moved)
    with pytest.raises(StegoError, match="does not exist"):
        NeighborTable.load(tmp_path / "missing.safetensors", expected_fingerprint=fp())


def test_items_digest_ignores_data_root_location():
    a = items_digest([f"/old/root/imgs/{i}.jpg" for i in range(3)])
    assert a == items_digest([f"/new/place/imgs/{i}.jpg" for i in range(3)])
    assert a != items_digest([f"/new/place/imgs/{i}.jpg" for i in (0, 2, 1)])


def test_original_npz(tmp_path):
    nns = np.stack([np.roll(np.arange(40), -i)[:30] for i in range(40)])
    path = tmp_path / "nns" / "nns_vit_small_cocostuff27_train_five_224.npz"
    path.parent.mkdir()
    np.savez(path, nns=nns)
    table = NeighborTable.load(path, expected_fingerprint={"num_items": 40})
    assert table.indices.dtype == torch.int64 and np.array_equal(table.indices.numpy(), nns)
    with pytest.raises(StegoError, match="has 40 rows but the dataset has 41 items"):
        NeighborTable.load(path, expected_fingerprint=fp(num_items=41))
    np.savez(tmp_path / "obj.npz", nns=np.array([object()] * 3))
    with pytest.raises(StegoError):
        NeighborTable.load(tmp_path / "obj.npz")


def test_original_table_path_uses_the_originals_names(tmp_path):
    # precompute_knns.py writes nns/nns_{cfg.model_type}_{dataset_name}_{image_set}_{crop_type}_
    # {res}.npz with dataset_name in cocostuff27 / cityscapes / potsdam and crop_type five / None
    cases = [
        ("dino-vits8", "cityscapes27", "val", "none", "vit_small_cityscapes_val_None"),
        ("dino-vitb8", "cityscapes27", "train", "five", "vit_base_cityscapes_train_five"),
        ("dino-vits16", "potsdam3", "train", "none", "vit_small_potsdam_train_None"),
        ("dino-vits8", "cocostuff27", "train", "five", "vit_small_cocostuff27_train_five"),
    ]
    for backbone, dataset, split, crop, name in cases:
        assert original_table_path(tmp_path, backbone, dataset, split, crop, 224) == (
            tmp_path / "nns" / f"nns_{name}_224.npz"
        )


@pytest.mark.parametrize("split", ["train", "val"])
def test_original_full_image_cityscapes_tables_are_refused(tmp_path, split):
    nns = np.stack([np.roll(np.arange(40), -i)[:30] for i in range(40)])
    path = original_table_path(tmp_path, "dino-vitb8", "cityscapes27", split, "none", 224)
    path.parent.mkdir()
    np.savez_compressed(path, nns=nns)  # as precompute_knns.py saves it
    for expected in (None, {"num_items": 40}):
        hint = rf"os\.listdir order .*`stego knn --dataset cityscapes27 .*--split {split}"
        with pytest.raises(StegoError, match=hint):
            NeighborTable.load(path, expected_fingerprint=expected)
    # the same rows under another name, said by the fingerprint to be full-image Cityscapes
    other = tmp_path / "renamed.npz"
    np.savez_compressed(other, nns=nns)
    with pytest.raises(StegoError, match="full-image Cityscapes"):
        full = fp(dataset="cityscapes27", crop_type="none", num_items=40)
        NeighborTable.load(other, expected_fingerprint=full)
    # five-crop tables are numbered crop files, read in that order: accepted
    five = original_table_path(tmp_path, "dino-vitb8", "cityscapes27", split, "five", 224)
    np.savez_compressed(five, nns=nns)
    crops = fp(dataset="cityscapes27", crop_type="five", num_items=40)
    table = NeighborTable.load(five, expected_fingerprint=crops)
    assert np.array_equal(table.indices.numpy(), nns)


def test_sample_positive_ranks():
    idx = torch.arange(100).repeat(4, 1)  # rank r holds value r
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_positive(idx, 5, g) for _ in range(200)])
    assert draws.min() == 1 and draws.max() == 5 and len(draws.unique()) == 5
    a = sample_positive(idx, 7, torch.Generator().manual_seed(3))
    assert torch.equal(a, sample_positive(idx, 7, torch.Generator().manual_seed(3)))
    with pytest.raises(StegoError):
        sample_positive(idx, 100, g)


def test_positive_index_is_a_pure_rule():
    row = list(range(100, 130))
    draws = [positive_index(row, 7, seed=1, epoch=e, index=i) for e in range(20) for i in range(20)]
    assert set(draws) == set(range(101, 108))
    assert positive_index(row, 7, 1, 3, 5) == positive_index(np.array(row), 7, 1, 3, 5)
    assert len({positive_index(row, 29, 0, e, 0) for e in range(10)}) > 3


def test_global_features_in_eval_mode():
    bb, ds = StubBackbone(), TinyDataset(12)
    bb.train()
    got = global_features(bb, ds, batch_size=5, device="cpu", progress=False)
    bb.eval()
    with torch.no_grad():
        ref = bb(torch.stack([ds[i]["image"] for i in range(12)])).global_feat
    assert torch.allclose(got, ref, atol=1e-6)
    res = collect_global_features(StubBackbone(), ds, batch_size=4, progress=False)
    assert res.paths == [f"/data/imgs/{i:04d}.png" for i in range(12)]
    fp_ = backbone_fingerprint(
        bb, dataset="tiny", split="train", crop_type="none", resolution=16, paths=res.paths
    )
    assert fp_["backbone"] == "stub" and fp_["num_items"] == 12 and json.dumps(fp_)


def test_mixed_image_sizes_are_refused():
    with pytest.raises(StegoError, match="one image size"):
        global_features(StubBackbone(), TinyDataset(8, odd=6), batch_size=3, progress=False)


def test_with_tiny_vit():
    from stego.models.backbone import build_backbone

    bb = build_backbone("tiny-vit", pretrained=False)
    feats = global_features(bb, TinyDataset(10, size=32), batch_size=4, progress=False)
    assert feats.shape == (10, bb.embed_dim)
    assert torch.allclose(feats.norm(dim=1), torch.ones(10), atol=1e-4)
    assert torch.equal(topk_cosine(feats, 4)[:, 0], torch.arange(10))


def test_knn_command_reuses_the_feature_cache(tmp_path) -> None:
    """`stego knn` after `stego features` takes the cache's global features: same table, and no
    second backbone pass (the cache's global features are deliberately altered to prove it)."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    from stego.cli import main

    rng = np.random.default_rng(0)
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
    common = [
        "--dataset",
        "folder",
        "--data-root",
        str(images),
        "--split",
        "all",
        "--backbone",
        "tiny-vit",
        "--resolution",
        "32",
        "--cache-dir",
        str(tmp_path / "c"),
        "--num-workers",
        "0",
        "--quiet",
    ]
    assert main(["features", *common]) == 0
    assert main(["knn", *common, "--k", "3", "--out", str(tmp_path / "a.safetensors")]) == 0
    (shard,) = list((tmp_path / "c").rglob("global-*.npy"))
    feats = np.load(shard)
    np.save(shard, feats[::-1].copy())  # reversed order: neighbours must follow the cache
    assert main(["knn", *common, "--k", "3", "--out", str(tmp_path / "b.safetensors")]) == 0
    a = load_file(str(tmp_path / "a.safetensors"))["indices"]
    b = load_file(str(tmp_path / "b.safetensors"))["indices"]
    assert not (a == b).all()
    assert ((5 - b.flip(0)) == a).all()  # the same table on reversed items


def test_features_and_knn_take_the_interpolation_of_the_preset(tmp_path, capsys) -> None:
    """`--interpolation` defaults to the --preset's (potsdam3: nearest, as the original) and
    else to bilinear; each gets its own artefacts, and knn refuses a cache of the other."""
    import numpy as np
    from PIL import Image

    from stego.cli import main
    from stego.features.cache import FeatureCache

    rng = np.random.default_rng(0)
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images / f"{i}.png")
    common = ["--dataset", "folder", "--data-root", str(images), "--split", "all", "--backbone",
              "tiny-vit", "--resolution", "32", "--cache-dir", str(tmp_path / "c"),
              "--num-workers", "0", "--quiet"]  # fmt: skip
    assert main(["features", *common]) == 0
    assert main(["features", *common, "--preset", "potsdam3"]) == 0
    assert main(["knn", *common, "--preset", "potsdam3", "--k", "3"]) == 0
    split = tmp_path / "c" / "folder"
    assert sorted(p.name for p in split.iterdir()) == ["all_none_32", "all_none_32_nearest"]
    (nearest,) = (split / "all_none_32_nearest").iterdir()
    cache = FeatureCache.open(nearest / "features")
    assert cache.fingerprint["interpolation"] == "nearest"
    table = NeighborTable.load(nearest / "neighbors_k3.safetensors", cache.fingerprint)
    assert torch.equal(table.indices, topk_cosine(cache.global_features(), 3))
    assert not list((split / "all_none_32").glob("neighbors_*"))
    capsys.readouterr()
    # an explicit flag wins over the preset; a cache of the other interpolation is refused
    code = main(["knn", *common, "--preset", "potsdam3", "--interpolation", "bilinear",
                 "--features", str(nearest / "features"), "--k", "3"])  # fmt: skip
    assert code == 2
    assert "interpolation: expected 'bilinear', found 'nearest'" in capsys.readouterr().err
