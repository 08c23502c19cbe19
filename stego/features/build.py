"""The feature cache and neighbour table of a training split, opened or built in one place.

``stego features``, ``stego knn``, ``stego calibrate`` and ``stego train`` (which builds both on
first use) all come here, so they agree on

* which images, prepared how: a :class:`SplitSpec` (the split at the training transform:
  shorter side resized to the resolution with the spec's interpolation, centre crop);
* what an artefact was computed from: :func:`split_fingerprint` (spec + backbone + item list);
* where it lives: :func:`stego.features.fingerprint.artifact_dir` of that fingerprint, holding
  ``features/`` (:class:`~stego.features.cache.FeatureCache`) and ``neighbors_k<k>.safetensors``;
* how it is made: one backbone pass (:meth:`FeatureCache.build`, whose global features also feed
  the table) and one top-k (:func:`build_neighbor_table`).

CAUSE's clusterbook (:mod:`stego.features.clusterbook`) is fitted from the same features and kept
in the same folder: :func:`clusterbook` opens it, or fits it when missing or stale. One module
(~450 lines) because every artefact of a split is opened or built here, by the same rules.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from stego.errors import StegoError
from stego.features.cache import FeatureCache
from stego.features.fingerprint import (
    FINGERPRINT_DEFAULTS,
    artifact_dir,
    backbone_fingerprint,
    fingerprint_differences,
    item_paths,
)
from stego.features.neighbors import (
    DEFAULT_MAX_MEMORY_BYTES,
    NeighborTable,
    global_features,
    topk_cosine,
)

__all__ = [
    "SplitSpec",
    "open_split",
    "split_fingerprint",
    "artifact_root",
    "table_path",
    "cache_complete",
    "disk_size",
    "build_feature_cache",
    "feature_cache",
    "split_global_features",
    "cached_global_features",
    "sibling_groups",
    "build_neighbor_table",
    "neighbor_table",
    "clusterbook",
]


@dataclass(frozen=True)
class SplitSpec:
    """A split at the training transform, and where its artefacts go.

    ``dataset``: registry name (canonical, see :meth:`from_config`); ``resolution``: pixels of
    the centre crop after resizing the shorter side with ``interpolation``; ``crop_type``:
    ``none`` | ``five`` (five-crops of ``stego crop`` in ``crop_dir``); ``cache_dir``: None =
    :func:`stego.features.fingerprint.default_cache_root`; ``skip_bad``: folder dataset only.
    """

    dataset: str
    data_root: str | Path
    split: str = "train"
    resolution: int = 224
    crop_type: str = "none"
    interpolation: str = "bilinear"
    crop_dir: str | Path | None = None
    cache_dir: str | Path | None = None
    skip_bad: bool = False

    @classmethod
    def from_config(cls, config: Any, *, split: str | None = None) -> SplitSpec:
        """The training split of a :class:`stego.config.StegoConfig` (``split`` overrides)."""
        from stego.data import dataset_info

        d = config.data
        if d.data_root is None:
            raise StegoError("data.data_root is not set; pass --data-root DIR")
        return cls(
            dataset=dataset_info(d.dataset).name,
            data_root=d.data_root,
            split=split or d.split,
            resolution=d.resolution,
            crop_type=d.crop_type,
            interpolation=d.interpolation,
            crop_dir=d.crop_dir,
            cache_dir=d.cache_dir,
            skip_bad=d.skip_bad,
        )


def open_split(spec: SplitSpec) -> Dataset:
    """The dataset of ``spec`` with the training transform (items of one image size)."""
    from stego.data import PairTransform, build_dataset

    transform = PairTransform(spec.resolution, crop="center", interpolation=spec.interpolation)  # type: ignore[arg-type]
    folder_skips = spec.skip_bad and spec.dataset == "folder"  # only the folder dataset skips
    extra: dict[str, Any] = {"skip_bad": True} if folder_skips else {}
    return build_dataset(
        spec.dataset,
        spec.data_root,
        spec.split,
        transform=transform,
        crop_dir=spec.crop_dir,
        crop_type=None if spec.crop_type == "none" else spec.crop_type,
        **extra,
    )


def split_fingerprint(backbone: Any, dataset: Dataset, spec: SplitSpec) -> dict[str, Any]:
    """What the artefacts of ``spec`` computed by ``backbone`` are computed from."""
    return backbone_fingerprint(
        backbone,
        dataset=spec.dataset,
        split=spec.split,
        crop_type=spec.crop_type,
        resolution=spec.resolution,
        interpolation=spec.interpolation,
        paths=item_paths(dataset),
        data_root=str(Path(spec.data_root)),
    )


def artifact_root(backbone: Any, dataset: Dataset, spec: SplitSpec) -> Path:
    """The folder of the split's feature cache (``features/``) and neighbour tables."""
    return artifact_dir(spec.data_root, split_fingerprint(backbone, dataset, spec), spec.cache_dir)


def table_path(spec: SplitSpec, fingerprint: Mapping[str, Any], k: int) -> Path:
    """Default file of the ``k``-column neighbour table of ``fingerprint``."""
    return artifact_dir(spec.data_root, fingerprint, spec.cache_dir) / f"neighbors_k{k}.safetensors"


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
    spec: SplitSpec,
    *,
    out: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
    dtype: torch.dtype = torch.float16,
    shard_size: int = 1024,
    with_keys: bool = False,
) -> FeatureCache:
    """Build (or finish) the feature cache of ``spec`` in ``out`` (default: the split's
    ``features/`` folder): one backbone pass, resumed at the first missing shard."""
    root = Path(out) if out is not None else artifact_root(backbone, dataset, spec) / "features"
    return FeatureCache.build(
        backbone,
        dataset,
        root,
        dataset_name=spec.dataset,
        split=spec.split,
        crop_type=spec.crop_type,
        resolution=spec.resolution,
        interpolation=spec.interpolation,
        data_root=spec.data_root,
        dtype=dtype,
        batch_size=batch_size,
        device=device,
        shard_size=shard_size,
        num_workers=num_workers,
        progress=progress,
        with_keys=with_keys,
    )


def feature_cache(
    backbone: Any,
    dataset: Dataset,
    spec: SplitSpec,
    use: bool | str,
    *,
    device: str,
    batch_size: int,
    num_workers: int,
    progress: bool,
) -> FeatureCache | None:
    """Open (or, with ``use=True``, build or finish) the feature cache of the split.

    ``use``: True = open it, building it on first use (or finishing an interrupted build);
    ``"auto"`` = open one that is already complete, never build; False = None (live backbone).
    """
    if use is False:
        return None
    fp = split_fingerprint(backbone, dataset, spec)
    root = artifact_dir(spec.data_root, fp, spec.cache_dir) / "features"
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
    return build_feature_cache(
        backbone,
        dataset,
        spec,
        out=root,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
    )


# --------------------------------------------------------------------------- neighbour table
def split_global_features(
    backbone: Any,
    dataset: Dataset,
    spec: SplitSpec,
    *,
    cache: FeatureCache | None = None,
    reuse_cache: bool = False,
    device: str = "cpu",
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
) -> tuple[Tensor, dict[str, Any]]:
    """(N, C) global features of the split and their fingerprint.

    From ``cache`` when given; else, with ``reuse_cache``, from the split's complete feature
    cache at its default place (no second backbone pass); else from a backbone pass.
    """
    fp = split_fingerprint(backbone, dataset, spec)
    if cache is None and reuse_cache:
        root = artifact_dir(spec.data_root, fp, spec.cache_dir) / "features"
        if cache_complete(root):
            try:
                cache = FeatureCache.open(root, fp)
            except StegoError:  # stale: compute afresh
                cache = None
            else:
                if progress:
                    print(f"using the global features of the feature cache in {root}")
    if cache is not None:
        return cache.global_features(), fp
    feats = global_features(
        backbone,
        dataset,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        progress=progress,
    )
    return feats, fp


def cached_global_features(
    folder: str | os.PathLike[str], spec: SplitSpec, backbone: str, layer: int | None = None
) -> tuple[Tensor, dict[str, Any]]:
    """(N, C) global features of the cache in ``folder`` and its fingerprint (``data_root``
    set to the spec's); :class:`StegoError` when the cache is not of ``spec`` / ``backbone``."""
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


def neighbor_table(
    backbone: Any,
    dataset: Dataset,
    spec: SplitSpec,
    k: int,
    *,
    device: str,
    batch_size: int,
    num_workers: int,
    progress: bool,
    cache: FeatureCache | None = None,
) -> Tensor:
    """(N, k) neighbour indices: loaded from the split's default file (where ``stego knn``
    writes), or built and saved there (from ``cache``'s global features when given)."""
    from stego.atomic import file_lock

    fp = split_fingerprint(backbone, dataset, spec)
    path = table_path(spec, fp, k)
    with file_lock(path.with_name(path.name + ".build-lock")):  # DDP ranks build it once
        if not path.is_file():
            feats, fp = split_global_features(
                backbone,
                dataset,
                spec,
                cache=cache,
                device=device,
                batch_size=batch_size,
                num_workers=num_workers,
                progress=progress,
            )
            build_neighbor_table(feats, fp, min(k, len(feats)), path, device=device)
        table = NeighborTable.load(path, fp)
    if table.k < 2:
        raise StegoError(
            f"neighbour table {path} has {table.k} column(s); the split needs at least 2 images"
        )
    return table.indices


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
