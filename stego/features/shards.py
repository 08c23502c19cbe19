"""The shard files of a feature cache, written in one backbone pass (layout:
:mod:`stego.features.cache`).

Each shard is filled through a memmap under a temporary name and renamed into place when full,
so a killed build leaves only whole shards. Batches start at a shard's first item and never
cross into the next shard: the bytes of a shard do not depend on which other shards are written
in the same run, so a resumed build or one shared by several processes writes the files one
uninterrupted process writes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from stego.atomic import atomic_write
from stego.errors import StegoError
from stego.features.extract import backbone_batches

__all__ = ["shard_name", "save_npy", "ShardWriter", "write_shards", "shard_batches"]


def shard_name(kind: str, i: int) -> str:
    return f"{kind}-{i:05d}.npy"


def save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_write(path) as handle:
        np.save(handle, array, allow_pickle=False)


class ShardWriter:
    """Fills one shard through a memmap under a temporary name; renames it when complete."""

    def __init__(
        self,
        root: Path,
        shard: int,
        rows: int,
        feat_shape: tuple[int, ...],
        dtype: Any,
        keys_shape: tuple[int, ...] | None,
    ) -> None:
        self.root, self.shard, self.rows, self.filled = root, shard, rows, 0
        kinds = {"feats": feat_shape, **({"keys": keys_shape} if keys_shape else {})}
        self.final = {kind: root / shard_name(kind, shard) for kind in kinds}
        self.tmp = {kind: root / f".{shard_name(kind, shard)}.tmp-{os.getpid()}" for kind in kinds}
        self.maps = {
            kind: np.lib.format.open_memmap(
                self.tmp[kind], mode="w+", dtype=dtype, shape=(rows, *shape)
            )
            for kind, shape in kinds.items()
        }
        self.glob: np.ndarray | None = None

    def write(self, row: int, feat: np.ndarray, glob: np.ndarray, keys: np.ndarray | None) -> None:
        n = feat.shape[0]
        self.maps["feats"][row : row + n] = feat
        if keys is not None:
            self.maps["keys"][row : row + n] = keys
        if self.glob is None:
            self.glob = np.zeros((self.rows, glob.shape[1]), dtype=np.float32)
        self.glob[row : row + n] = glob
        self.filled += n

    def finish(self) -> None:
        assert self.glob is not None and self.filled == self.rows
        save_npy(self.root / shard_name("global", self.shard), self.glob)
        for kind in [k for k in self.maps if k != "feats"] + ["feats"]:  # feats last: marks done
            mm = self.maps[kind]
            mm.flush()
            del mm
            with open(self.tmp[kind], "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(self.tmp[kind], self.final[kind])
        self.maps.clear()

    def discard(self) -> None:
        """Drop an unfinished shard (the build was interrupted)."""
        self.maps.clear()
        for tmp in self.tmp.values():
            tmp.unlink(missing_ok=True)


def shard_batches(shards: list[int], n: int, shard_size: int, batch_size: int) -> list[list[int]]:
    """Item positions of each batch of ``shards``: runs of ``batch_size`` from each shard's
    first item, the last of a shard shorter (of ``n`` items in shards of ``shard_size``)."""
    out = []
    for s in shards:
        end = min(n, (s + 1) * shard_size)
        starts = range(s * shard_size, end, batch_size)
        out += [list(range(b, min(b + batch_size, end))) for b in starts]
    return out


def write_shards(
    root: Path,
    backbone: nn.Module,
    dataset: Dataset,
    shards: list[int],
    settings: Mapping[str, Any],
    np_dtype: Any,
    *,
    batch_size: int,
    device: str | torch.device,
    num_workers: int,
    progress: bool,
) -> None:
    """Compute and write ``shards`` of the cache of ``settings`` (its manifest entries)."""
    n, size = int(settings["num_items"]), int(settings["shard_size"])
    feat_shape = tuple(settings["feat_shape"])
    keys_shape = tuple(settings["keys_shape"]) if settings["keys_shape"] else None
    writer: ShardWriter | None = None
    try:
        for batch in backbone_batches(
            backbone,
            dataset,
            device=device,
            num_workers=num_workers,
            progress=progress,
            with_keys=keys_shape is not None,
            desc="feature cache",
            batches=shard_batches(shards, n, size, batch_size),
        ):
            out, first = batch.output, int(batch.indices[0])
            if tuple(out.feat.shape[1:]) != feat_shape:
                raise StegoError(
                    f"backbone features of item {first} have shape "
                    f"{tuple(out.feat.shape[1:])}, expected {feat_shape}"
                )
            shard, row = divmod(first, size)
            if writer is None:
                rows = min(size, n - shard * size)
                writer = ShardWriter(root, shard, rows, feat_shape, np_dtype, keys_shape)
            writer.write(
                row,
                out.feat.to("cpu", torch.float32).numpy().astype(np_dtype),
                out.global_feat.to("cpu", torch.float32).numpy(),
                out.keys.to("cpu", torch.float32).numpy().astype(np_dtype) if keys_shape else None,
            )
            if writer.filled == writer.rows:
                writer.finish()
                writer = None
    finally:
        if writer is not None:
            writer.discard()
