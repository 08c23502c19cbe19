"""What training does around the optimisation: the auto shifts before it, the k-means probe
refit and the saved inference model after it.

* :func:`auto_shifts`: ``loss.*_shift: auto`` calibrated on the training split (feature
  cache or live backbone), or taken from the run being resumed;
* :func:`cause_clusterbook`: CAUSE's concepts, fitted on the training split (or reused);
* :func:`kmeans_probe`: ``train.kmeans_probe`` refits the cluster centroids on training codes;
* :func:`save_model`: backbone + head + probes as a :class:`stego.models.segmenter.Segmenter`
  folder (``model/``), with :meth:`SegmenterMeta.from_config` describing it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from stego.config import StegoConfig
from stego.errors import StegoError
from stego.train.datamodule import StegoDataModule
from stego.train.module import StegoModule
from stego.train.pairs import CachedPairDataset

__all__ = ["auto_shifts", "cause_clusterbook", "kmeans_probe", "save_model"]


def auto_shifts(
    config: StegoConfig,
    data: StegoDataModule,
    backbone: Any,
    n_classes: int | None,
    resumed: Path | None,
    log: Any,
) -> None:
    """Calibrate ``loss.*_shift: auto`` on the training split (cache or live backbone), in
    place; ``resumed``: the run folder being resumed, whose saved values are reused."""
    from stego.device import accelerator_device
    from stego.features.calibration import LiveFeatures, auto_shift_keys, resolve_auto_shifts

    if not auto_shift_keys(config):
        return
    saved = None
    if resumed is not None and (resumed / "config.yaml").is_file():
        saved = yaml.safe_load((resumed / "config.yaml").read_text())
    pairs: Any = data.train_pairs
    if isinstance(pairs, CachedPairDataset):
        feats, nbrs = pairs.cached.cache, pairs.cached.neighbors
    else:
        feats = LiveFeatures(backbone, pairs.dataset, accelerator_device(config.train.accelerator))
        nbrs = pairs.neighbors
    m = config.model
    n_clusters = m.n_clusters or ((n_classes or 0) + m.extra_clusters)
    if n_clusters < 2:
        raise StegoError("loss shifts 'auto' need a cluster count >= 2; set model.n_clusters")
    resolve_auto_shifts(config, feats, torch.as_tensor(nbrs), n_clusters, saved=saved, log=log)


def cause_clusterbook(
    config: StegoConfig, data: StegoDataModule, backbone: Any, n_clusters: int, progress: bool,
    log: Any,
) -> torch.Tensor:
    """The CAUSE clusterbook (K, C) of the run's training items (held-out images excluded),
    from the feature cache or the live backbone, kept beside the cache
    (:meth:`stego.features.split.PreparedSplit.clusterbook`); ``log`` warns when it has fewer than
    2 x ``n_clusters`` live concepts."""
    from stego.device import accelerator_device
    from stego.features.calibration import LiveFeatures
    from stego.features.clusterbook import ClusterbookSettings, live_warning

    pairs: Any = data.train_pairs
    if isinstance(pairs, CachedPairDataset):
        feats: Any = pairs.cached.cache
    else:
        feats = LiveFeatures(backbone, pairs.dataset, accelerator_device(config.train.accelerator))
    settings = ClusterbookSettings.from_config(config)
    book = data.split.clusterbook(
        feats, list(data.train_indices), settings, progress=progress, log=log
    )
    warning = live_warning(book.live, n_clusters, settings)
    if warning is not None and log is not None:
        log(warning)
    elif warning is not None:
        import warnings

        warnings.warn(warning, stacklevel=2)
    return book.concepts


@torch.no_grad()
def kmeans_probe(
    module: StegoModule, data: StegoDataModule, backbone: Any, config: StegoConfig, log: Any
) -> None:
    """train.kmeans_probe: refit the cluster centroids by spherical k-means on training codes.

    Codes (N, D, h, w) of every training item, head in eval mode (the codes inference sees),
    in batches of 64; k-means++ with 10 restarts seeded by ``train.seed``.
    """
    from stego.features.calibration import LiveFeatures

    pairs: Any = data.train_pairs
    device = module.device
    feats = (
        pairs.cached.cache
        if isinstance(pairs, CachedPairDataset)
        else LiveFeatures(backbone, pairs.dataset, device)
    )
    head = module.head
    was_training = head.training
    head.eval()  # no dropout: the codes inference sees
    codes = torch.cat(
        [
            head(
                torch.stack([feats[i] for i in range(s, min(s + 64, len(feats)))]).to(device)
            ).code.cpu()
            for s in range(0, len(feats), 64)
        ]
    )
    head.train(was_training)
    g = torch.Generator().manual_seed(config.train.seed)
    result = module.cluster_probe.fit_kmeans(codes, n_restarts=10, generator=g)
    if log is not None:
        log(
            f"cluster probe refit by spherical k-means on {codes.shape[0]} training codes "
            f"(10 restarts, inertia {float(result.inertia):.1f})"
        )


def save_model(
    module: StegoModule, backbone: Any, config: StegoConfig, info: Any, directory: Path
) -> None:
    """Save the inference model (backbone + head + probes) to ``directory``."""
    from stego.models.segmenter import Segmenter, SegmenterMeta

    meta = SegmenterMeta.from_config(
        config,
        info,
        code_dim=module.head.out_dim,
        n_clusters=module.cluster_probe.n_clusters,
        n_classes=module.linear_probe.n_classes if module.linear_probe is not None else None,
    )
    model = Segmenter(
        backbone.cpu(),
        module.head.cpu().eval(),
        module.cluster_probe.cpu(),
        None if module.linear_probe is None else module.linear_probe.cpu(),
        meta,
    )
    model.save_pretrained(directory, train_config=config.to_dict())
