"""The builders of a split's artefacts: one backbone pass for the feature cache (whose global
features also feed the neighbour table), one top-k for the table, one fit for CAUSE's
clusterbook; and the small helpers that look at them on disk.

Which split, with which fingerprint and in which folder, is
:class:`stego.features.split.PreparedSplit`'s, which calls these with its own dataset,
fingerprint and folder; ``stego knn --features DIR`` reads the global features of a cache
without a backbone (:func:`cached_global_features`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from stego.errors import StegoError
from stego.features.cache import FeatureCache
from stego.features.fingerprint import FINGERPRINT_DEFAULTS, fingerprint_differences
from stego.features.neighbors import DEFAULT_MAX_MEMORY_BYTES, NeighborTable, topk_cosine

__all__ = [
    "cache_complete",
    "disk_size",
    "build_feature_cache",
    "cached_global_features",
    "sibling_groups",
    "build_neighbor_table",
    "clusterbook",
]


def cache_complete(root: Path) -> bool:
    """Whether ``root`` (a ``features/`` folder) holds a finished feature cache."""
    try:
        return bool(json.loads((root / "manifest.json").read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def disk_size(root: Path) -> int:
    """Bytes of the files directly in ``root`` (0 when it does not exist)."""
    return sum(p.stat().st_size for p in root.glob("*") if p.is_file()) if root.is_dir() else 0


# --------------------------------------------------------------------------- feature cache
def build_feature_cache(
    backbone: Any,
    dataset: Dataset,
    out: str | os.PathLike[str],
    fingerprint: Mapping[str, Any],
    *,
    device: str = "cpu",
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
    dtype: torch.dtype = torch.float16,
    shard_size: int = 1024,
    with_keys: bool = False,
    group: Any = None,
) -> FeatureCache:
    """Build (or finish) the feature cache of ``dataset`` (whose artefacts have
    ``fingerprint``) in ``out``: one backbone pass, resumed at the first missing shard;
    ``group``: the processes sharing it (:class:`stego.parallel.ProcessGroup`)."""
    return FeatureCache.build(
        backbone,
        dataset,
        out,
        fingerprint=fingerprint,
        dtype=dtype,
        batch_size=batch_size,
        device=device,
        shard_size=shard_size,
        num_workers=num_workers,
        progress=progress,
        with_keys=with_keys,
        group=group,
    )


# --------------------------------------------------------------------------- neighbour table
def cached_global_features(
    folder: str | os.PathLike[str], spec: Any, backbone: str, layer: int | None = None
) -> tuple[Tensor, dict[str, Any]]:
    """(N, C) global features of the cache in ``folder`` and its fingerprint (``data_root``
    set to the spec's); :class:`StegoError` when the cache is not of ``spec`` (a
    :class:`stego.features.split.SplitSpec`) / ``backbone``."""
    cache = FeatureCache.open(folder)
    fp = dict(cache.fingerprint)
    asked: dict[str, Any] = {
        "dataset": spec.dataset,
        "split": spec.split,
        "crop_type": spec.crop_type,
        "resolution": spec.resolution,
        "interpolation": spec.interpolation,
        "backbone": backbone,
    }
    if layer is not None:
        asked["layer"] = layer
    diffs = fingerprint_differences(asked, fp)
    if diffs:
        raise StegoError(
            f"feature cache {folder} does not match the command line: " + "; ".join(diffs)
        )
    fp.setdefault("interpolation", FINGERPRINT_DEFAULTS["interpolation"])
    fp["data_root"] = str(spec.data_root)
    return cache.global_features(), fp


def sibling_groups(dataset: Dataset) -> Tensor:
    """(N,) int64 source-image ids of five-crop items (to keep siblings out of the table)."""
    groups = getattr(dataset, "groups", None)
    if groups is None:
        raise StegoError("excluding sibling crops needs five-crop data (--crop-type five)")
    return torch.as_tensor(list(groups), dtype=torch.int64)


def build_neighbor_table(
    feats: Tensor,
    fingerprint: Mapping[str, Any],
    k: int,
    path: str | os.PathLike[str],
    *,
    device: str = "cpu",
    backend: str = "torch",
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
    exclude_groups: Tensor | None = None,
) -> NeighborTable:
    """Compute the (N, k) table of global features ``feats`` (N, C) and save it to ``path``.

    Rank 0 of a row is the item itself (:func:`~stego.features.neighbors.topk_cosine`); the
    fingerprint is stored with it (``exclude_siblings`` noted when ``exclude_groups`` is given).
    """
    fp = dict(fingerprint)
    if exclude_groups is not None:
        fp["exclude_siblings"] = True
    indices = topk_cosine(
        feats,
        k,
        backend=backend,
        device=torch.device(device) if backend == "torch" else torch.device("cpu"),
        max_memory_bytes=max_memory_bytes,
        exclude_groups=exclude_groups,
    ).cpu()
    table = NeighborTable(indices, fp)
    table.save(path)
    return table


# --------------------------------------------------------------------------- CAUSE clusterbook
def clusterbook(
    feats: Any,
    indices: list[int],
    fingerprint: Mapping[str, Any],
    folder: Path,
    settings: Any,
    *,
    progress: bool,
    log: Any = print,
) -> Any:
    """The :class:`~stego.features.clusterbook.Clusterbook` of ``settings`` fitted on
    ``feats[i]`` (C, h, w), i in ``indices`` (features with ``fingerprint``), kept as
    ``folder/clusterbook.safetensors``: reused when its fingerprint matches, else fitted (a
    stale one is replaced, ``log`` saying what changed). Live concepts are counted once, at fit
    time, and stored with it. DDP ranks fit it once (file lock)."""
    from stego.atomic import file_lock
    from stego.features.clusterbook import (
        CLUSTERBOOK_FILE,
        Clusterbook,
        clusterbook_fingerprint,
        count_live,
        fingerprint_changes,
        fit_clusterbook,
        read_clusterbook,
        write_clusterbook,
    )

    expected = clusterbook_fingerprint(dict(fingerprint), settings, indices)
    path = folder / CLUSTERBOOK_FILE
    partial = folder / "clusterbook.partial.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_name(path.name + ".build-lock")):
        if path.is_file():
            book = read_clusterbook(path)
            changes = fingerprint_changes(expected, book.fingerprint)
            if not changes:
                if progress:
                    print(f"clusterbook: reusing {path} ({book.live} live concepts)")
                return book
            if log is not None:
                log(f"clusterbook {path} is stale ({'; '.join(changes)}): refitting it")
            partial.unlink(missing_ok=True)
        stamp = partial.with_name(partial.name + ".json")
        if partial.is_file() and (
            not stamp.is_file() or json.loads(stamp.read_text()) != expected
        ):
            partial.unlink(missing_ok=True)  # an unfinished fit of other settings
        if not partial.is_file():
            from stego.atomic import atomic_write

            with atomic_write(stamp, "w") as handle:
                json.dump(expected, handle, sort_keys=True)
        concepts = fit_clusterbook(feats, indices, settings, partial=partial, progress=progress)
        live = count_live(concepts, feats, indices, seed=settings.seed)
        book = Clusterbook(concepts, live, expected)
        write_clusterbook(path, book)
        partial.unlink(missing_ok=True)
        stamp.unlink(missing_ok=True)
        if progress:
            print(f"clusterbook: {settings.n_concepts} concepts fitted, {live} live, in {path}")
    return book
