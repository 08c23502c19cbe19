"""Training data for STEGO: (image, nearest-neighbour image) pairs in a seeded, resumable order.

The order is an infinite stream of dataset positions: epoch ``e`` visits the training indices in
``randperm(N)`` seeded by (seed, e); global step ``s`` takes stream positions
``[s*B, (s+1)*B)`` (B = global batch) and rank ``r`` of ``W`` processes takes its contiguous
``B/W`` slice. So the batch of a step depends only on (seed, step), never on how many steps ran
before in this process: resuming at step ``s`` replays exactly, and W processes together see the
same global batch as one. The sampler yields ``(index, epoch)`` keys; the pair datasets draw the
positive of ``index`` with :func:`stego.features.neighbors.positive_index` (a pure function of
seed, epoch and index), so the live-backbone and cached-feature paths pair the same images.

The split itself, its feature cache and its neighbour table come from
:mod:`stego.features.build` (shared with ``stego features`` / ``stego knn``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from stego.errors import StegoError
from stego.features.neighbors import _splitmix64, positive_index

__all__ = [
    "StepSampler",
    "ShardSampler",
    "LivePairDataset",
    "CachedPairDataset",
    "split_holdout",
    "mix_seed",
    "usable_workers",
]

Key = tuple[int, int]  # (dataset index, data epoch)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64 chain): independent streams per (seed, step, ...)."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & ((1 << 64) - 1)))
    return h & ((1 << 63) - 1)


class StepSampler(Sampler[Key]):
    """Infinite stream of ``(index, epoch)`` keys for one rank (see the module docstring).

    Args:
        indices: dataset positions to train on (e.g. all but a held-out part).
        global_batch: images per optimisation step over all processes.
        seed: run seed.
        rank, world_size: this process and the number of processes.
        start_step: first global step to produce (the restored step when resuming).
    """

    def __init__(
        self,
        indices: Sequence[int],
        global_batch: int,
        seed: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
    ) -> None:
        if not indices:
            raise StegoError(
                "no training images left (the held-out validation part took them "
                "all); lower data.val_images or set data.val_split"
            )
        if global_batch % world_size:
            raise StegoError(
                f"global batch {global_batch} is not divisible by {world_size} processes"
            )
        self.indices = np.asarray(indices, dtype=np.int64)
        self.global_batch, self.seed = global_batch, seed
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self.local_batch = global_batch // world_size
        self._perm: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """(N,) the training indices in the order of ``epoch``."""
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0x5A3))
            self._perm = (
                epoch,
                self.indices[torch.randperm(len(self.indices), generator=g).numpy()],
            )
        return self._perm[1]

    def key(self, position: int) -> Key:
        """The (index, epoch) at a stream position."""
        epoch, k = divmod(position, len(self.indices))
        return int(self.permutation(epoch)[k]), int(epoch)

    def __iter__(self) -> Iterator[Key]:
        step = self.start_step
        while True:
            first = step * self.global_batch + self.rank * self.local_batch
            for position in range(first, first + self.local_batch):
                yield self.key(position)
            step += 1


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank``: a fixed, unpadded split for evaluation."""

    def __init__(self, n: int, *, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def _as_key(key: Key | int) -> Key:
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), 0)


def _check_table(neighbor_indices: Tensor, n: int, num_neighbors: int) -> np.ndarray:
    if neighbor_indices.ndim != 2 or neighbor_indices.shape[0] != n:
        raise StegoError(
            f"neighbour table has shape {tuple(neighbor_indices.shape)} but the dataset "
            f"has {n} items; rebuild the table for this split (stego knn)"
        )
    if not 1 <= num_neighbors <= neighbor_indices.shape[1] - 1:
        raise StegoError(
            f"train.num_neighbors must be in 1..{neighbor_indices.shape[1] - 1} "
            f"for a table of {neighbor_indices.shape[1]} neighbours, got {num_neighbors}"
        )
    return neighbor_indices.cpu().numpy()


class LivePairDataset(Dataset):
    """Items ``{"image", "image_pos", "index", "index_pos"}`` (+ ``"label"``) for the live backbone.

    ``image``/``image_pos``: (3, H, W) float in [0, 1]; ``label``: (H, W) int64 of the anchor.
    Indexed by the ``(index, epoch)`` keys of :class:`StepSampler` (a plain int means epoch 0).
    """

    def __init__(
        self, dataset: Dataset, neighbor_indices: Tensor, num_neighbors: int, seed: int
    ) -> None:
        self.dataset = dataset
        self.neighbors = _check_table(neighbor_indices, len(dataset), num_neighbors)  # type: ignore[arg-type]
        self.num_neighbors, self.seed = num_neighbors, seed

    def __len__(self) -> int:
        return len(self.neighbors)

    def __getitem__(self, key: Key | int) -> dict[str, Any]:
        index, epoch = _as_key(key)
        pos = positive_index(self.neighbors[index], self.num_neighbors, self.seed, epoch, index)
        item, item_pos = self.dataset[index], self.dataset[pos]
        out = {
            "image": item["image"],
            "image_pos": item_pos["image"],
            "index": index,
            "index_pos": pos,
        }
        if "label" in item:
            out["label"] = item["label"]
        return out


class CachedPairDataset(Dataset):
    """Items ``{"feat", "feat_pos", "index", "index_pos"}`` (+ ``"label"``) from a feature cache.

    Wraps :class:`stego.features.cache.CachedFeatureDataset` (same positive rule); ``labels``
    (optional) is the image dataset whose anchor labels the linear probe trains on.
    """

    # Decoding an image just to read its label cost ~40% of a cached step, so decoded labels
    # are kept in memory (int16) when they fit this budget; larger splits decode every time.
    LABEL_MEMORY_BYTES = 1 << 30

    def __init__(self, cached: Any, labels: Dataset | None = None) -> None:
        self.cached = cached
        self.labels = labels
        self._label_memo: dict[int, Tensor] = {}
        self._memo_bytes = 0

    def __len__(self) -> int:
        return len(self.cached)

    def _label(self, index: int) -> Tensor | None:
        if index in self._label_memo:
            return self._label_memo[index].long()
        assert self.labels is not None
        label = self.labels[index].get("label")
        if label is not None and self._memo_bytes < self.LABEL_MEMORY_BYTES:
            self._label_memo[index] = label.to(torch.int16)
            self._memo_bytes += 2 * label.numel()
        return label

    def __getitem__(self, key: Key | int) -> dict[str, Any]:
        index, epoch = _as_key(key)
        self.cached.set_epoch(epoch)  # per item: each worker holds its own copy
        out = dict(self.cached[index])
        if self.labels is not None:
            label = self._label(index)
            if label is not None:
                out["label"] = label
        return out


def split_holdout(n: int, n_holdout: int, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, held-out) split of ``range(n)``, both sorted; ``n_holdout`` <= n // 5."""
    n_holdout = min(n_holdout, n // 5)
    g = torch.Generator().manual_seed(mix_seed(seed, 0xC0FFEE))
    held = set(torch.randperm(n, generator=g)[:n_holdout].tolist())
    return [i for i in range(n) if i not in held], sorted(held)


def usable_workers(requested: int) -> int:
    """``requested`` data-loading processes, at most one per CPU this process may run on (more
    only compete for the same cores, and PyTorch warns about them)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS, Windows)
        cores = os.cpu_count() or 1
    return max(0, min(requested, cores))
