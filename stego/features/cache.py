"""Cached frozen-backbone features, so training runs the backbone once instead of every epoch.

Layout of a cache folder (all files written atomically; shards renamed into place when full)::

    manifest.json          format, fingerprint (stego.features.fingerprint), feat_shape (C, h, w),
                           dtype, shard_size, num_shards, with_keys, complete
    feats-00000.npy        (n, C, h, w) float16 patch features of items [0, shard_size), memmappable
    global-00000.npy       (n, C) float32 L2-normalised global features (for the neighbour table)
    keys-00000.npy         (n, D, h, w) attention keys (only with_keys=True)
    .lock                  held while building

One backbone pass writes patch and global features. An interrupted build keeps its finished
shards; rerunning the same build resumes at the first missing shard. Reads are memory-mapped.
One module (~480 lines) because the writer, the reader and the cached training dataset all
follow the file layout above; where a split's cache lives is :mod:`stego.features.build`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from stego.atomic import atomic_write, file_lock
from stego.errors import StegoError
from stego.features.fingerprint import (
    backbone_fingerprint,
    check_fingerprint,
    item_paths,
    rebuild_command,
)
from stego.features.neighbors import NeighborTable, positive_index
from stego.features.shards import shard_name, write_shards
from stego.features.sizing import CacheSize
from stego.parallel import ONE_PROCESS, ProcessGroup

__all__ = ["FeatureCache", "CachedFeatureDataset", "positive_index"]

_FORMAT = "stego-feature-cache"
_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}


class FeatureCache:
    """A finished feature cache opened for memory-mapped reading (see module docstring)."""

    def __init__(self, root: Path, manifest: Mapping[str, Any]) -> None:
        self.root = root
        self.manifest = dict(manifest)
        self.fingerprint: dict[str, Any] = dict(manifest["fingerprint"])
        self.shard_size = int(manifest["shard_size"])
        self.feat_shape = tuple(int(s) for s in manifest["feat_shape"])
        self._maps: dict[tuple[str, int], np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.manifest["num_items"])

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen their own memmaps
        return {**self.__dict__, "_maps": {}}

    def _map(self, kind: str, shard: int) -> np.ndarray:
        key = (kind, shard)
        if key not in self._maps:
            self._maps[key] = _load_shard(self.root / shard_name(kind, shard), mmap=True)
        return self._maps[key]

    def _row(self, kind: str, i: int) -> Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a cache of {len(self)} items")
        i %= len(self)
        row = self._map(kind, i // self.shard_size)[i % self.shard_size]
        # copy as stored, then convert in torch: numpy's float16 -> float32 cast is ~10x slower
        return torch.from_numpy(np.array(row)).to(torch.float32)

    def __getitem__(self, i: int) -> Tensor:
        """(C, h, w) float32 patch features of item ``i``."""
        return self._row("feats", int(i))

    def keys(self, i: int) -> Tensor:
        """(D, h, w) float32 attention keys of item ``i`` (cache built with ``with_keys=True``)."""
        if not self.manifest.get("with_keys"):
            raise StegoError(f"feature cache {self.root} has no keys; rebuild it with --with-keys")
        return self._row("keys", int(i))

    def global_features(self) -> Tensor:
        """(N, C) float32 L2-normalised global features, in item order."""
        parts = [
            _load_shard(self.root / shard_name("global", s), mmap=False)
            for s in range(int(self.manifest["num_shards"]))
        ]
        return torch.from_numpy(np.concatenate(parts).astype(np.float32, copy=False))

    @classmethod
    def open(
        cls, out_dir: str | os.PathLike[str], expected_fingerprint: Mapping[str, Any] | None = None
    ) -> FeatureCache:
        """Open a complete cache; :class:`StegoError` if missing, unfinished or stale."""
        root = Path(out_dir)
        manifest = _read_manifest(root)
        if manifest is None:
            hint = (
                f" Build it with `{rebuild_command(expected_fingerprint, 'features')}`."
                if expected_fingerprint
                else ""
            )
            raise StegoError(f"no feature cache in {root} (manifest.json missing).{hint}")
        fp = manifest["fingerprint"]
        check_fingerprint(
            expected_fingerprint, fp, what="feature cache", path=root, command="features"
        )
        if not manifest.get("complete"):
            raise StegoError(
                f"feature cache {root} is unfinished; rerun "
                f"`{rebuild_command(fp, 'features')} --out {root}` to resume it"
            )
        return cls(root, manifest)

    @classmethod
    def size(
        cls,
        backbone: nn.Module,
        dataset: Dataset,
        out_dir: str | os.PathLike[str],
        *,
        dtype: torch.dtype = torch.float16,
        shard_size: int = 1024,
        with_keys: bool = False,
        device: str | torch.device = "cpu",
    ) -> CacheSize:
        """What :meth:`build` with these settings would write (one probe forward)."""
        feat_shape, keys_shape = _probe_shapes(backbone, dataset, device, with_keys)
        n = len(dataset)  # type: ignore[arg-type]
        settings = _settings(n, feat_shape, keys_shape, dtype, shard_size, with_keys)
        return CacheSize.of(Path(out_dir), _pending(Path(out_dir), settings), settings)

    @classmethod
    def build(
        cls,
        backbone: nn.Module,
        dataset: Dataset,
        out_dir: str | os.PathLike[str],
        *,
        fingerprint: Mapping[str, Any] | None = None,
        dataset_name: str = "",
        split: str = "",
        crop_type: str = "none",
        resolution: int = 224,
        data_root: str | os.PathLike[str] | None = None,
        interpolation: str = "bilinear",
        dtype: torch.dtype = torch.float16,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
        shard_size: int = 1024,
        num_workers: int = 0,
        progress: bool = True,
        with_keys: bool = False,
        group: ProcessGroup | None = None,
    ) -> FeatureCache:
        """Run ``backbone`` once over ``dataset`` and write (or resume) the cache in ``out_dir``.

        ``group``: the processes sharing the work (:func:`stego.parallel.launch`), each calling
        this: each writes a share of the missing shards, in batches that start at each shard's
        first item, so the files are those one process writes, byte for byte.

        ``fingerprint``: what the cache is computed from (a
        :class:`stego.features.split.PreparedSplit`'s); without it, ``dataset_name``, ``split``,
        ``crop_type``, ``resolution``, ``interpolation`` (and ``data_root``, for the rebuild hint)
        make one together with the backbone's name, weights digest and layer and the ordered
        item paths. Items must all have one image size.
        """
        if dtype not in _DTYPES:
            raise StegoError(f"cache dtype must be torch.float16 or torch.float32, got {dtype}")
        if shard_size < 1:
            raise StegoError(f"shard_size must be positive, got {shard_size}")
        root = Path(out_dir)
        root.mkdir(parents=True, exist_ok=True)
        group = group or ONE_PROCESS
        # the first process locks out other builds; the others follow it through barriers
        with file_lock(root / ".lock") if group.main else contextlib.nullcontext():
            n = len(dataset)  # type: ignore[arg-type]
            if n == 0:
                raise StegoError("the dataset is empty: nothing to cache")
            fp = dict(fingerprint) if fingerprint is not None else backbone_fingerprint(
                backbone,
                dataset=dataset_name,
                split=split,
                crop_type=crop_type,
                resolution=resolution,
                paths=item_paths(dataset),
                data_root=data_root,
                interpolation=interpolation,
            )
            feat_shape, keys_shape = _probe_shapes(backbone, dataset, device, with_keys)
            settings = _settings(n, feat_shape, keys_shape, dtype, shard_size, with_keys)
            old = _read_manifest(root)
            if old is not None:  # every process checks, so that all of them stop together
                _check_resumable(root, old, fp, settings)
            pending = _pending(root, settings)
            size = CacheSize.of(root, pending, settings)
            if progress and group.main:
                print(size.describe())
            size.check_room()
            group.barrier()  # all have read the folder before the first process changes it
            if group.main:
                _save_manifest(root, {**settings, "fingerprint": fp, "complete": False})
                for stale in root.glob(".*.tmp-*"):  # half-written shards of a killed build
                    stale.unlink(missing_ok=True)
            group.barrier()
            mine = group.share(pending)
            if mine:
                write_shards(
                    root,
                    backbone,
                    dataset,
                    mine,
                    settings,
                    _DTYPES[dtype],
                    batch_size=batch_size,
                    device=device,
                    num_workers=num_workers,
                    progress=progress and group.main,
                )
            group.barrier()
            manifest = {**settings, "fingerprint": fp, "complete": True}
            if group.main:
                _save_manifest(root, manifest)
            group.barrier()
        return cls(root, manifest)


def _load_shard(path: Path, *, mmap: bool) -> np.ndarray:
    """One ``.npy`` shard (memory-mapped when asked), never unpickling anything."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise StegoError(
            f"feature cache file {path} is unreadable or corrupt ({exc}); delete "
            f"{path.parent} and rebuild it with `stego features`"
        ) from exc


def _read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError covers JSON and UTF-8 decoding errors
        raise StegoError(f"cannot read {path}: {exc}; delete the folder and rebuild") from exc
    if manifest.get("format") != _FORMAT:
        raise StegoError(f"{path} is not a stego feature cache manifest")
    return manifest


def _save_manifest(root: Path, manifest: Mapping[str, Any]) -> None:
    with atomic_write(root / "manifest.json", "w") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=True)


def _check_resumable(
    root: Path, old: Mapping[str, Any], fp: Mapping[str, Any], settings: Mapping[str, Any]
) -> None:
    try:
        check_fingerprint(
            fp, old["fingerprint"], what="existing feature cache", path=root, command="features"
        )
    except StegoError as exc:
        raise StegoError(
            f"{exc} Delete {root} or choose another --out to build a new one."
        ) from None
    diffs = [
        f"{k}: existing {old.get(k)!r}, requested {settings[k]!r}"
        for k in ("feat_shape", "dtype", "shard_size", "with_keys", "keys_shape")
        if old.get(k) != settings[k]
    ]
    if diffs:
        raise StegoError(
            f"existing feature cache {root} was built with other settings: "
            + "; ".join(diffs)
            + f". Delete {root} or choose another --out."
        )


def _pending(root: Path, settings: Mapping[str, Any]) -> list[int]:
    """The shards of ``settings`` not (completely) written in ``root``."""
    return [
        s
        for s in range(settings["num_shards"])
        if not all((root / shard_name(kind, s)).is_file() for kind in ("feats", "global"))
    ]


def _probe_shapes(
    backbone: nn.Module, dataset: Dataset, device: str | torch.device, with_keys: bool
) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    image = torch.as_tensor(dataset[0]["image"])[None].to(device)  # (1, 3, H, W)
    backbone.eval().to(device)
    with torch.inference_mode():
        out = backbone(image, with_keys=True) if with_keys else backbone(image)
    keys = tuple(out.keys.shape[1:]) if with_keys and out.keys is not None else None
    if with_keys and keys is None:
        raise StegoError("with_keys=True but the backbone returned no keys")
    return tuple(out.feat.shape[1:]), keys


def _settings(
    n: int,
    feat_shape: tuple[int, ...],
    keys_shape: tuple[int, ...] | None,
    dtype: torch.dtype,
    shard_size: int,
    with_keys: bool,
) -> dict[str, Any]:
    """The manifest entries (without fingerprint and completeness) of a cache build."""
    return {
        "format": _FORMAT,
        "version": 1,
        "num_items": n,
        "feat_shape": list(feat_shape),
        "dtype": str(dtype).replace("torch.", ""),
        "shard_size": shard_size,
        "num_shards": -(-n // shard_size),
        "with_keys": with_keys,
        "keys_shape": list(keys_shape) if keys_shape else None,
    }


class CachedFeatureDataset(Dataset):
    """Training items from a feature cache: ``{"feat", "feat_pos", "index", "index_pos"}``.

    ``feat`` and ``feat_pos`` are (C, h, w) float32; the positive of item i in epoch e is
    :func:`stego.features.neighbors.positive_index` (neighbour ranks 1..num_neighbors, a pure
    function of (seed, epoch, index)), so it matches a live-backbone path using the same rule. Call
    :meth:`set_epoch` before each epoch (DataLoader workers must not be persistent).
    """

    def __init__(
        self,
        cache: FeatureCache,
        neighbor_indices: Tensor | NeighborTable,
        num_neighbors: int,
        seed: int = 0,
    ) -> None:
        idx = (
            neighbor_indices.indices
            if isinstance(neighbor_indices, NeighborTable)
            else neighbor_indices
        )
        if idx.ndim != 2 or idx.shape[0] != len(cache):
            raise StegoError(
                f"neighbour table has shape {tuple(idx.shape)} but the feature cache "
                f"has {len(cache)} items; rebuild one of them for the same split"
            )
        if not 1 <= num_neighbors <= idx.shape[1] - 1:
            raise StegoError(f"num_neighbors must be in 1..{idx.shape[1] - 1}, got {num_neighbors}")
        self.cache, self.neighbors = cache, idx.cpu().numpy()
        self.num_neighbors, self.seed, self.epoch = num_neighbors, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pos = positive_index(
            self.neighbors[index], self.num_neighbors, self.seed, self.epoch, index
        )
        return {
            "feat": self.cache[index],
            "feat_pos": self.cache[pos],
            "index": int(index),
            "index_pos": pos,
        }
