"""Label-free checks of a clustering: does it follow image position, and does it agree with the
clustering of the raw backbone features?

Both need no labels, so ``stego segment`` can run them on any folder and warn when its segments
look like position bands or texture fragments rather than kinds of things
(:func:`stego.segment.segment_folder`).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

__all__ = ["normalized_mutual_information", "position_dependence", "position_bins"]


def normalized_mutual_information(joint: np.ndarray) -> float:
    """NMI (0..1, arithmetic normalisation) of a joint count table (A, B) of two labellings."""
    p = joint / max(float(joint.sum()), 1.0)
    pa, pb = p.sum(1), p.sum(0)
    nz = p > 0
    mutual = float((p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])).sum())
    entropy = sum(float(-(q[q > 0] * np.log(q[q > 0])).sum()) for q in (pa, pb))
    return 2.0 * mutual / entropy if entropy > 0 else 0.0


def position_bins(height: int, width: int, grid: int = 4) -> Tensor:
    """(height, width) int64: the cell of a ``grid`` x ``grid`` split of the image each pixel
    (or patch) is in, row-major; relative to the image, so any size maps to the same cells."""
    rows = torch.clamp(torch.arange(height) * grid // height, max=grid - 1)
    cols = torch.clamp(torch.arange(width) * grid // width, max=grid - 1)
    return rows[:, None] * grid + cols[None, :]


def position_dependence(maps: Iterable[Tensor], n_clusters: int, grid: int = 4) -> float:
    """How much the cluster of a pixel is told by where it is in its image: the NMI between the
    cluster ids of ``maps`` (each (H, W) int64, any size) and their ``grid`` x ``grid`` cell.

    0: clusters spread over the image as content does; near 1: each cluster is one band or
    corner. Street scenes have some (sky on top, road at the bottom), which is why
    :mod:`stego.segment` compares the learnt clusters with the raw features' instead of using a
    fixed threshold.
    """
    joint = torch.zeros(n_clusters, grid * grid, dtype=torch.float64)
    for ids in maps:
        cells = position_bins(int(ids.shape[0]), int(ids.shape[1]), grid)
        flat = ids.reshape(-1).long() * grid * grid + cells.reshape(-1)
        joint += torch.bincount(flat, minlength=n_clusters * grid * grid).view(joint.shape)
    return normalized_mutual_information(joint.numpy())
