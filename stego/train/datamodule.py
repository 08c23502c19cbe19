"""Training data as a LightningDataModule: (anchor, neighbour) pairs in a step-indexed order.

:func:`build_datamodule` opens the training split, its neighbour table and (by default) its
feature cache through :class:`stego.features.split.PreparedSplit` (building them on first
use), and picks the validation images (``data.val_split``, or a held-out part of the
training split).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset, Subset

from stego.config import StegoConfig
from stego.train.pairs import (
    CachedPairDataset,
    LivePairDataset,
    ShardSampler,
    StepSampler,
    split_holdout,
    usable_workers,
)

__all__ = ["StegoDataModule", "build_datamodule"]


class StegoDataModule(L.LightningDataModule):
    """Dataloaders whose training order depends only on (seed, step): see StepSampler."""

    def __init__(
        self,
        train_pairs: Dataset,
        train_indices: list[int],
        val: Dataset | None,
        *,
        global_batch: int,
        seed: int,
        num_workers: int = 0,
        split: Any = None,
    ) -> None:
        super().__init__()
        self.train_pairs, self.train_indices, self.val = train_pairs, train_indices, val
        self.split = split  # the stego.features.split.PreparedSplit the pairs come from
        self.global_batch, self.seed, self.num_workers = global_batch, seed, num_workers

    def _loader(self, dataset: Dataset, batch: int, sampler: Any) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=False,
            pin_memory=False,
        )

    def train_dataloader(self) -> DataLoader:
        t = self.trainer
        sampler = StepSampler(
            self.train_indices,
            self.global_batch,
            self.seed,
            rank=t.global_rank,
            world_size=t.world_size,
            start_step=t.global_step,
        )  # restored before this is called
        return self._loader(self.train_pairs, sampler.local_batch, sampler)

    def val_dataloader(self) -> DataLoader | list:
        if self.val is None:
            return []
        t = self.trainer
        sampler = ShardSampler(len(self.val), rank=t.global_rank, world_size=t.world_size)
        return self._loader(self.val, max(1, self.global_batch // t.world_size), sampler)


def build_datamodule(
    config: StegoConfig, backbone: Any, progress: bool
) -> tuple[StegoDataModule, Any]:
    """The run's datamodule and the split's :class:`stego.data.DatasetInfo`.

    Training pairs read the feature cache (``train.use_feature_cache``) or run ``backbone``
    live; the neighbour table has ``train.knn_k`` columns. Both are opened or built by
    :class:`stego.features.split.PreparedSplit` where ``stego features`` / ``stego knn``
    write them.
    """
    from stego.data import dataset_info
    from stego.device import accelerator_device
    from stego.features.build import cache_complete
    from stego.features.split import PreparedSplit, SplitSpec, open_split

    d, t = config.data, config.train
    info = dataset_info(d.dataset)
    run = dict(
        device=accelerator_device(t.accelerator),
        batch_size=d.batch_size,
        num_workers=usable_workers(d.num_workers),
        progress=progress,
    )
    backbone.check_size(d.resolution, d.resolution)
    split = PreparedSplit.from_config(config, backbone)
    train_ds, table = split.dataset, split.table_path(t.knn_k)
    had = (cache_complete(split.features_dir), table.is_file())
    cache = split.feature_cache(t.use_feature_cache, **run)
    nbrs = split.neighbor_table(t.knn_k, cache=cache, **run)
    if progress:
        from stego.train.console import report_artifacts

        report_artifacts(split.folder, table, cache is not None, had)
    has_labels = bool(getattr(train_ds, "has_labels", False))
    if cache is not None:
        from stego.features.cache import CachedFeatureDataset

        cached = CachedFeatureDataset(cache, nbrs, t.num_neighbors, t.seed)
        pairs: Dataset = CachedPairDataset(cached, train_ds if has_labels else None)
    else:
        pairs = LivePairDataset(train_ds, nbrs, t.num_neighbors, t.seed)
    if d.val_split is not None:
        # the validation split is never five-cropped: it is scored on whole images
        val_spec = SplitSpec.from_config(config, split=d.val_split)
        whole = replace(val_spec, crop_type="none", crop_dir=None, skip_bad=False)
        val: Dataset | None = open_split(whole)
        train_idx = list(range(len(train_ds)))
    else:
        train_idx, held = split_holdout(len(train_ds), d.val_images if has_labels else 0, t.seed)
        val = Subset(train_ds, held) if held else None
    # A cached batch is a memory-mapped read of a few ms: worker processes would only take cores
    # from the training step. Decoded images (live backbone) are worth the workers.
    workers = 0 if cache is not None else run["num_workers"]
    module = StegoDataModule(
        pairs,
        train_idx,
        val,
        global_batch=d.batch_size,
        seed=t.seed,
        num_workers=workers,
        split=split,
    )
    return module, info
