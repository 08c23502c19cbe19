"""The one backbone pass that feature caches and neighbour tables are computed from.

Eval mode, no gradients, dataset order, one image size (the training transform's centre crop).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from stego.errors import StegoError

__all__ = ["BackboneBatch", "GlobalFeatures", "backbone_batches", "collect_global_features"]


class BackboneBatch(NamedTuple):
    """One batch of a backbone pass: positions in the dataset, item paths, backbone output."""

    indices: Tensor  # (B,) int64 positions in the dataset
    paths: list[str]
    output: Any  # BackboneOutput: feat (B,C,h,w), keys or None, global_feat (B,C)


def _collate(items: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack images when they share one size; otherwise hand the sizes to the caller."""
    images = [torch.as_tensor(it["image"]) for it in items]
    paths = [os.fspath(it.get("path", "")) for it in items]
    shapes = {tuple(im.shape) for im in images}
    stacked = torch.stack(images) if len(shapes) == 1 else None
    return {"images": stacked, "shapes": [tuple(im.shape) for im in images], "paths": paths}


def backbone_batches(
    backbone: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    with_keys: bool = False,
    desc: str = "backbone",
    batches: list[list[int]] | None = None,
) -> Iterator[BackboneBatch]:
    """Run a frozen backbone over ``dataset`` in order, in eval mode, without gradients.

    ``batches``: the item positions of each batch (default: consecutive runs of
    ``batch_size``). All images must have one size (the training transform's centre crop); a
    different size raises :class:`StegoError` naming the item. Moves ``backbone`` to ``device``.
    """
    from tqdm.auto import tqdm

    backbone.eval().to(device)
    n = len(dataset)  # type: ignore[arg-type]
    order = batches or [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    loader = DataLoader(
        dataset, batch_sampler=order, num_workers=num_workers, collate_fn=_collate
    )
    expected: tuple[int, ...] | None = None
    bar = tqdm(loader, desc=desc, disable=not progress, unit="batch")
    for index, batch in zip(order, bar, strict=True):
        shapes = batch["shapes"]
        expected = expected or shapes[0]
        for j, shape in enumerate(shapes):
            if shape != expected:
                raise StegoError(
                    f"item {index[j]} ({batch['paths'][j]}) has image shape {shape}, item "
                    f"{order[0][0]} has {expected}: features need one image size; build the "
                    "dataset with the training transform PairTransform(resolution, crop='center')"
                )
        images = batch["images"].to(device)  # (B, 3, H, W)
        with torch.inference_mode():
            out = backbone(images, with_keys=True) if with_keys else backbone(images)
        yield BackboneBatch(torch.tensor(index), batch["paths"], out)


class GlobalFeatures(NamedTuple):
    feat: Tensor  # (N, C) float32, L2-normalised, on the CPU
    paths: list[str]  # ordered item paths (for the fingerprint)


def collect_global_features(
    backbone: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> GlobalFeatures:
    """Global (mean-patch, L2-normalised) features of every item, plus the item paths."""
    feats: list[Tensor] = []
    paths: list[str] = []
    for batch in backbone_batches(
        backbone,
        dataset,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        progress=progress,
        desc="global features",
    ):
        feats.append(batch.output.global_feat.float().cpu())
        paths.extend(batch.paths)
    if not feats:
        raise StegoError("the dataset is empty: no features to compute")
    return GlobalFeatures(torch.cat(feats), paths)
