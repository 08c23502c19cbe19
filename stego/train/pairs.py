"""Training data for STEGO: (image, nearest-neighbour image) pairs in a seeded, resumable order.

The order is an infinite stream of dataset positions: epoch ``e`` visits the training indices in
``randperm(N)`` seeded by (seed, e); global step ``s`` takes stream positions
``[s*B, (s+1)*B)`` (B = global batch) and rank ``r`` of ``W`` processes takes its contiguous
``B/W`` slice. So the batch of a step depends only on (seed, step), never on how many steps ran
before in this process: resuming at step ``s`` replays exactly, and W processes together see the
same global batch as one. The sampler yields ``(index, epoch)`` keys; the pair datasets draw the
positive of ``index`` with :func:`stego.features.neighbors.positive_index` (a pure function of seed, epoch
and index), so the live-backbone and cached-feature paths pair the same images.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
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
    "open_split",
    "feature_cache",
    "neighbor_table",
    "artifact_root",
    "cache_complete",
    "disk_size",
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


# --------------------------------------------------------------------------- assembly
def open_split(
    name: str,
    root: str | Path,
    split: str,
    *,
    resolution: int,
    interpolation: str,
    crop_type: str,
    crop_dir: str | Path | None = None,
    skip_bad: bool = False,
) -> Dataset:
    """A split at the training transform: shorter side to ``resolution``, centre crop."""
    from stego.data import PairTransform, build_dataset

    transform = PairTransform(resolution, crop="center", interpolation=interpolation)  # type: ignore[arg-type]
    extra: dict[str, Any] = {"skip_bad": True} if (skip_bad and name == "folder") else {}
    return build_dataset(
        name,
        root,
        split,
        transform=transform,
        crop_dir=crop_dir,
        crop_type=None if crop_type == "none" else crop_type,
        **extra,
    )


def _fingerprint(
    backbone: Any,
    dataset: Dataset,
    *,
    name: str,
    split: str,
    crop_type: str,
    resolution: int,
    data_root: str | Path,
) -> dict[str, Any]:
    from stego.features.fingerprint import backbone_fingerprint, item_paths

    return backbone_fingerprint(
        backbone,
        dataset=name,
        split=split,
        crop_type=crop_type,
        resolution=resolution,
        paths=item_paths(dataset),
        data_root=str(Path(data_root)),
    )


def usable_workers(requested: int) -> int:
    """``requested`` data-loading processes, at most one per CPU this process may run on (more
    only compete for the same cores, and PyTorch warns about them)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS, Windows)
        cores = os.cpu_count() or 1
    return max(0, min(requested, cores))


def artifact_root(
    backbone: Any,
    dataset: Dataset,
    *,
    name: str,
    split: str,
    crop_type: str,
    resolution: int,
    data_root: str | Path,
    cache_dir: str | Path | None = None,
) -> Path:
    """The folder of the split's feature cache (``features/``) and neighbour tables."""
    from stego.features.fingerprint import artifact_dir

    fp = _fingerprint(
        backbone,
        dataset,
        name=name,
        split=split,
        crop_type=crop_type,
        resolution=resolution,
        data_root=data_root,
    )
    return artifact_dir(data_root, fp, cache_dir)


def cache_complete(root: Path) -> bool:
    """Whether ``root`` (a ``features/`` folder) holds a finished feature cache."""
    try:
        return bool(json.loads((root / "manifest.json").read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def disk_size(root: Path) -> int:
    """Bytes of the files directly in ``root`` (0 when it does not exist)."""
    return sum(p.stat().st_size for p in root.glob("*") if p.is_file()) if root.is_dir() else 0


def feature_cache(
    backbone: Any,
    dataset: Dataset,
    use: bool | str,
    *,
    name: str,
    split: str,
    crop_type: str,
    resolution: int,
    data_root: str | Path,
    device: str,
    batch_size: int,
    num_workers: int,
    progress: bool,
    cache_dir: str | Path | None = None,
) -> Any | None:
    """Open (or, with ``use=True``, build or finish) the feature cache of the split.

    ``use``: True = open it, building it on first use (or finishing an interrupted build);
    ``"auto"`` = open one that is already complete, never build; False = None (live backbone).
    Lives where ``stego features`` writes by default, so either builds it for the other.
    """
    from stego.features.cache import FeatureCache
    from stego.features.fingerprint import artifact_dir

    if use is False:
        return None
    fp = _fingerprint(
        backbone,
        dataset,
        name=name,
        split=split,
        crop_type=crop_type,
        resolution=resolution,
        data_root=data_root,
    )
    root = artifact_dir(data_root, fp, cache_dir) / "features"
    manifest = root / "manifest.json"
    if use == "auto" and not manifest.is_file():
        return None
    if manifest.is_file() and (use == "auto" or cache_complete(root)):
        try:
            return FeatureCache.open(root, fp)
        except StegoError:
            if use == "auto":
                return None  # stale or unfinished: train live rather than fail
            raise
    return FeatureCache.build(  # resumes an unfinished build at its first missing shard
        backbone,
        dataset,
        root,
        dataset_name=name,
        split=split,
        crop_type=crop_type,
        resolution=resolution,
        data_root=data_root,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        progress=progress,
    )


def neighbor_table(
    backbone: Any,
    dataset: Dataset,
    k: int,
    *,
    name: str,
    split: str,
    crop_type: str,
    resolution: int,
    data_root: str | Path,
    device: str,
    batch_size: int,
    num_workers: int,
    progress: bool,
    cache: Any | None = None,
    cache_dir: str | Path | None = None,
) -> Tensor:
    """(N, k) neighbour indices: loaded from ``stego knn``'s default file, or built and saved."""
    from stego.atomic import file_lock
    from stego.features.fingerprint import artifact_dir
    from stego.features.neighbors import NeighborTable, global_features, topk_cosine

    fp = _fingerprint(
        backbone,
        dataset,
        name=name,
        split=split,
        crop_type=crop_type,
        resolution=resolution,
        data_root=data_root,
    )
    path = artifact_dir(data_root, fp, cache_dir) / f"neighbors_k{k}.safetensors"
    with file_lock(path.with_name(path.name + ".build-lock")):  # DDP ranks build it once
        if not path.is_file():
            if cache is not None:
                feats = cache.global_features()  # (N, C) from the same backbone pass
            else:
                feats = global_features(
                    backbone,
                    dataset,
                    batch_size=batch_size,
                    device=device,
                    num_workers=num_workers,
                    progress=progress,
                )
            indices = topk_cosine(feats, min(k, len(feats)), device=device).cpu()
            NeighborTable(indices, fp).save(path)
        table = NeighborTable.load(path, fp)
    if table.k < 2:
        raise StegoError(
            f"neighbour table {path} has {table.k} column(s); the split needs at least 2 images"
        )
    return table.indices
