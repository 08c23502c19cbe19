"""A training split prepared for its artefacts: spec -> dataset -> fingerprint -> folder, once.

``stego features``, ``stego knn``, ``stego calibrate`` and ``stego train`` all open a split
through :class:`PreparedSplit`, so they agree on

* which images, prepared how: a :class:`SplitSpec` (the split at the training transform:
  shorter side resized to the resolution with the spec's interpolation, centre crop);
* what an artefact was computed from: :attr:`PreparedSplit.fingerprint` (spec + backbone + item
  list), computed once per split;
* where it lives: :attr:`PreparedSplit.folder`
  (:func:`stego.features.fingerprint.artifact_dir` of the fingerprint), holding ``features/``
  (:class:`~stego.features.cache.FeatureCache`), ``neighbors_k<k>.safetensors`` and CAUSE's
  ``clusterbook.safetensors``.

The builders themselves (one backbone pass, one top-k, one clusterbook fit) are
:mod:`stego.features.build`'s; the methods here hand them the split's dataset, fingerprint and
folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset

from stego.errors import StegoError
from stego.features.build import (
    build_feature_cache,
    build_neighbor_table,
    cache_complete,
    clusterbook,
)
from stego.features.cache import FeatureCache
from stego.features.fingerprint import artifact_dir, backbone_fingerprint, item_paths
from stego.features.neighbors import NeighborTable, global_features

__all__ = ["SplitSpec", "open_split", "table_path", "PreparedSplit"]


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


def table_path(folder: Path, k: int) -> Path:
    """The ``k``-column neighbour table in an artefact folder."""
    return folder / f"neighbors_k{k}.safetensors"


class PreparedSplit:
    """One split seen by one backbone: its dataset, fingerprint and artefact folder, each
    derived once, and the artefacts kept there (feature cache, neighbour tables, clusterbook).

    ``dataset``: the already opened dataset of ``spec`` (default: :func:`open_split`).
    """

    def __init__(self, spec: SplitSpec, backbone: Any, dataset: Dataset | None = None) -> None:
        self.spec, self.backbone = spec, backbone
        if dataset is not None:
            self.dataset = dataset  # fills the cached property

    @classmethod
    def from_config(cls, config: Any, backbone: Any, *, split: str | None = None) -> PreparedSplit:
        """The training split of a :class:`stego.config.StegoConfig` (``split`` overrides)."""
        return cls(SplitSpec.from_config(config, split=split), backbone)

    @cached_property
    def dataset(self) -> Dataset:
        return open_split(self.spec)

    @cached_property
    def fingerprint(self) -> dict[str, Any]:
        """What the split's artefacts are computed from (:mod:`stego.features.fingerprint`)."""
        s = self.spec
        return backbone_fingerprint(
            self.backbone,
            dataset=s.dataset,
            split=s.split,
            crop_type=s.crop_type,
            resolution=s.resolution,
            interpolation=s.interpolation,
            paths=item_paths(self.dataset),
            data_root=str(Path(s.data_root)),
        )

    @cached_property
    def folder(self) -> Path:
        """The folder of the split's feature cache (``features/``) and neighbour tables."""
        return artifact_dir(self.spec.data_root, self.fingerprint, self.spec.cache_dir)

    @property
    def features_dir(self) -> Path:
        return self.folder / "features"

    def table_path(self, k: int) -> Path:
        """Default file of the ``k``-column neighbour table (where ``stego knn`` writes)."""
        return table_path(self.folder, k)

    # ----------------------------------------------------------------------- feature cache
    def build_feature_cache(
        self, *, out: str | os.PathLike[str] | None = None, **options: Any
    ) -> FeatureCache:
        """Build (or finish) the feature cache in ``out`` (default: :attr:`features_dir`);
        ``options``: those of :func:`stego.features.build.build_feature_cache`."""
        return build_feature_cache(
            self.backbone,
            self.dataset,
            Path(out) if out is not None else self.features_dir,
            self.fingerprint,
            **options,
        )

    def feature_cache(
        self, use: bool | str, *, device: str, batch_size: int, num_workers: int, progress: bool
    ) -> FeatureCache | None:
        """Open (or, with ``use=True``, build or finish) the split's feature cache.

        ``use``: True = open it, building it on first use (or finishing an interrupted build);
        ``"auto"`` = open one that is already complete, never build; False = None (live backbone).
        """
        if use is False:
            return None
        root = self.features_dir
        manifest = root / "manifest.json"
        if use == "auto" and not manifest.is_file():
            return None
        if manifest.is_file() and (use == "auto" or cache_complete(root)):
            try:
                return FeatureCache.open(root, self.fingerprint)
            except StegoError:
                if use == "auto":
                    return None  # stale or unfinished: train live rather than fail
                raise
        return self.build_feature_cache(
            device=device, batch_size=batch_size, num_workers=num_workers, progress=progress
        )

    # ----------------------------------------------------------------------- neighbour table
    def global_features(
        self,
        *,
        cache: FeatureCache | None = None,
        reuse_cache: bool = False,
        device: str = "cpu",
        batch_size: int = 32,
        num_workers: int = 0,
        progress: bool = True,
    ) -> Tensor:
        """(N, C) global features of the split: from ``cache`` when given; else, with
        ``reuse_cache``, from the split's complete feature cache (no second backbone pass);
        else from a backbone pass."""
        if cache is None and reuse_cache and cache_complete(self.features_dir):
            try:
                cache = FeatureCache.open(self.features_dir, self.fingerprint)
            except StegoError:  # stale: compute afresh
                cache = None
            else:
                if progress:
                    print(f"using the global features of the feature cache in {cache.root}")
        if cache is not None:
            return cache.global_features()
        return global_features(
            self.backbone,
            self.dataset,
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
            progress=progress,
        )

    def neighbor_table(
        self,
        k: int,
        *,
        device: str,
        batch_size: int,
        num_workers: int,
        progress: bool,
        cache: FeatureCache | None = None,
    ) -> Tensor:
        """(N, k) neighbour indices: loaded from :meth:`table_path` (where ``stego knn``
        writes), or built and saved there (from ``cache``'s global features when given)."""
        from stego.atomic import file_lock

        path = self.table_path(k)
        with file_lock(path.with_name(path.name + ".build-lock")):  # DDP ranks build it once
            if not path.is_file():
                feats = self.global_features(
                    cache=cache,
                    device=device,
                    batch_size=batch_size,
                    num_workers=num_workers,
                    progress=progress,
                )
                build_neighbor_table(
                    feats, self.fingerprint, min(k, len(feats)), path, device=device
                )
            table = NeighborTable.load(path, self.fingerprint)
        if table.k < 2:
            raise StegoError(
                f"neighbour table {path} has {table.k} column(s); the split needs at least 2 images"
            )
        return table.indices

    # ----------------------------------------------------------------------- CAUSE clusterbook
    def clusterbook(
        self, feats: Any, indices: list[int], settings: Any, *, progress: bool, log: Any = print
    ) -> Any:
        """The split's :class:`~stego.features.clusterbook.Clusterbook` of ``settings`` fitted
        on ``feats[i]`` (C, h, w), i in ``indices`` (the feature cache or live features), kept
        in :attr:`folder` (:func:`stego.features.build.clusterbook`)."""
        # a cache's own fingerprint: one written before a key existed lacks it, and so do the
        # clusterbooks fitted from it, which stay valid
        fp = feats.fingerprint if isinstance(feats, FeatureCache) else self.fingerprint
        return clusterbook(feats, indices, fp, self.folder, settings, progress=progress, log=log)

