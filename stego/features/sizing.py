"""How big and how long: the numbers printed before a long backbone pass.

A feature cache of the paper's COCO-Stuff setting (five-crops at ViT-B/8) is hundreds of GB and
hours of GPU time, so ``stego features`` says both before it starts (``--dry-run``: and stops),
and a cache that cannot fit is refused at once, naming the ways around it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from stego.atomic import check_free_space, format_bytes

__all__ = ["CacheSize", "NO_ROOM_FIX", "seconds_per_item", "format_duration", "time_estimate"]

# What to do when the feature cache does not fit: training runs without it, or it goes elsewhere.
NO_ROOM_FIX = (
    "Train without a cache with `stego train --live` (the backbone runs at every step), or put "
    "the cache on a disk with room with `--cache-dir DIR` (`stego train --set "
    "data.cache_dir=DIR`); it is stored as float16 already, the smallest float type"
)


@dataclass(frozen=True)
class CacheSize:
    """The size of a feature cache in ``root``: ``items`` rows of ``bytes_per_item`` each, of
    which ``todo`` are still to write, in ``shards`` files (``pending`` still missing)."""

    root: Path
    items: int
    todo: int
    bytes_per_item: int
    feat_shape: tuple[int, ...]
    dtype: str
    shards: int
    pending: int

    @classmethod
    def of(cls, root: Path, pending: list[int], settings: Mapping[str, Any]) -> CacheSize:
        """The size of a cache whose manifest entries are ``settings`` (:mod:`stego.features.
        cache`), in ``root``, with the shards ``pending`` still missing."""
        itemsize = np.dtype(settings["dtype"]).itemsize
        feat, keys = settings["feat_shape"], settings["keys_shape"] or [0]
        per_item = (int(np.prod(feat)) + int(np.prod(keys))) * itemsize + feat[0] * 4  # + global
        n, size = int(settings["num_items"]), int(settings["shard_size"])
        return cls(
            root=root,
            items=n,
            todo=sum(min(size, n - s * size) for s in pending),
            bytes_per_item=per_item,
            feat_shape=tuple(feat),
            dtype=settings["dtype"],
            shards=int(settings["num_shards"]),
            pending=len(pending),
        )

    @property
    def total_bytes(self) -> int:
        return self.items * self.bytes_per_item

    @property
    def todo_bytes(self) -> int:
        return self.todo * self.bytes_per_item

    def describe(self) -> str:
        return (
            f"feature cache {self.root}: {self.items} items x {self.feat_shape} {self.dtype} = "
            f"{format_bytes(self.total_bytes)} on disk ({format_bytes(self.todo_bytes)} still to "
            f"write, {self.pending}/{self.shards} shards)"
        )

    def check_room(self) -> None:
        """:class:`stego.errors.StegoError` now when the rest cannot fit on the disk."""
        if self.todo:
            check_free_space(self.root, self.todo_bytes, "the feature cache", fix=NO_ROOM_FIX)


def seconds_per_item(
    backbone: nn.Module, dataset: Dataset, *, device: str | torch.device, batch_size: int
) -> float:
    """Seconds per item of a backbone pass, measured on one batch of the first items (loading
    and decoding included, one process). The backbone has been run once (warm)."""
    n = min(batch_size, len(dataset))  # type: ignore[arg-type]
    start = time.perf_counter()
    images = torch.stack([torch.as_tensor(dataset[i]["image"]) for i in range(n)]).to(device)
    with torch.inference_mode():
        backbone(images)
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def format_duration(seconds: float) -> str:
    """``42 s``, ``7 min``, ``3.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def time_estimate(todo: int, per_item: float, processes: int, device: Any) -> str:
    """The line saying how long ``todo`` items take at ``per_item`` seconds in ``processes``."""
    seconds = todo * per_item / max(1, processes)
    on = f"{processes} processes" if processes > 1 else str(device)
    return (
        f"estimated time: about {format_duration(seconds)} for {todo} items on {on} "
        f"({1 / per_item:.1f} items/s per process, measured on one batch)"
    )
