"""Which images to label first, chosen without labels from a run's cluster maps.

Naming clusters with one labelled image depends on the image: on held-out CamVid sequences
(docs/benchmarks.md, "one labelled image") a random frame gave 27.4 / 32.4 mIoU with spreads
of 2.5 / 7.7 over draws, while the frame whose 44 clusters are most evenly present gave 34.6 /
34.1. The rule: the first image maximises the sum over clusters of the square root of its pixel
share in each (a cluster present at all counts much more than a large one); each next image is
the one that most raises that sum for the best share seen so far in each cluster, so it adds
clusters the earlier ones lack.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import numpy as np

__all__ = ["id_histograms", "images_to_label"]


def id_histograms(paths: list[Path], n_ids: int) -> np.ndarray:
    """(images, n_ids) int64 pixels of each id in the id PNGs ``paths`` (uint8 or uint16)."""
    from PIL import Image

    counts = np.zeros((len(paths), n_ids), dtype=np.int64)
    for row, path in enumerate(paths):
        with Image.open(path) as im:
            counts[row] = np.bincount(np.asarray(im).ravel(), minlength=n_ids)[:n_ids]
    return counts


def images_to_label(counts: np.ndarray, n: int, skip: Collection[int] = ()) -> list[int]:
    """Indices (rows of ``counts``, (images, K) pixels per cluster) of up to ``n`` images to
    label, best first, leaving out the rows in ``skip`` (already labelled)."""
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)  # (images, K)
    allowed = np.ones(len(shares), dtype=bool)
    allowed[list(skip)] = False
    best = np.zeros(shares.shape[1])  # (K,) best share of each cluster among the chosen
    chosen: list[int] = []
    for _ in range(min(n, int(allowed.sum()))):
        gain = np.sqrt(np.maximum(shares, best)).sum(1)
        gain[~allowed] = -np.inf
        pick = int(gain.argmax())
        chosen.append(pick)
        allowed[pick] = False
        best = np.maximum(best, shares[pick])
    return chosen
