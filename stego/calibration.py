"""Label-free choice of the three STEGO shifts from the user's own features.

The paper's presets were tuned by hand for DINO v1 features; other backbones (DINOv2's
correlations sit much higher) need other shifts. The authors' advice is to look at the three
centred feature-correlation distributions and set each shift so that most random pairs read as
"different" and the right share of self/kNN pairs read as "same". We make that rule explicit and
label-free:

1. Cluster a sample of patch features with cosine k-means into K clusters (K = the number of
   segments the user asks for): the clusters are pseudo-classes.
2. Sample location pairs exactly as training does for each term (self, knn, random) and measure
   the fraction ``p`` of pairs whose two ends fall in the same pseudo-class.
3. Set the term's shift to the ``1 - p`` quantile of its centred feature correlation, so the
   fraction of attracted pairs (``fd > shift``) equals the fraction of same-pseudo-class pairs.

With true labels instead of pseudo-classes this is the rule our CamVid preset's shifts came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from stego.errors import StegoError
from stego.losses import derangement, feature_correlation, sample_at, sample_coords
from stego.probes import spherical_kmeans

__all__ = ["Calibration", "calibrate_shifts", "TERMS"]

TERMS: tuple[str, ...] = ("self", "knn", "random")


@dataclass
class Calibration:
    """Proposed shifts and what they were derived from (feed ``fd`` to a histogram)."""

    shifts: dict[str, float]  # term -> shift b
    same_fraction: dict[str, float]  # term -> fraction of same-pseudo-class pairs
    fd: dict[str, Tensor] = field(repr=False)  # term -> sampled centred feature correlations (M,)

    def as_tuple(self) -> tuple[float, float, float]:
        """Shifts ordered (self, knn, random), as StegoLoss takes them."""
        return (self.shifts["self"], self.shifts["knn"], self.shifts["random"])


def _stack(feats: Sequence[Tensor], indices: Tensor) -> Tensor:
    return torch.stack([torch.as_tensor(feats[int(i)]).float() for i in indices])  # (B, C, h, w)


def _pseudo_labels(sampled: Tensor, centroids: Tensor) -> Tensor:
    """Nearest centroid of every sampled vector: (B, C, S, S) -> (B, S, S)."""
    x = F.normalize(sampled, dim=1)
    return torch.einsum("bcij,kc->bkij", x, centroids).argmax(1)


def calibrate_shifts(
    feats: Sequence[Tensor],
    neighbors: Tensor,
    n_clusters: int,
    *,
    num_neighbors: int = 7,
    n_samples: int = 11,
    pointwise: bool = True,
    batch_size: int = 16,
    n_batches: int = 20,
    kmeans_images: int = 200,
    seed: int = 0,
) -> Calibration:
    """Propose (self, knn, random) shifts for ``feats`` without labels.

    feats: indexable collection of N feature maps (C, h, w) (a feature cache works);
    neighbors: (N, k) nearest-neighbour table (rank 0 = the item itself).
    """
    n_items = len(feats)
    if n_items < 2:
        raise StegoError("calibration needs at least 2 images")
    if n_clusters < 2:
        raise StegoError(f"calibration needs at least 2 clusters, got {n_clusters}")
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_items, generator=generator)[:kmeans_images]
    sample = _stack(feats, pick)  # (M, C, h, w)
    kmeans = spherical_kmeans(sample, n_clusters, n_restarts=3, generator=generator)
    fd_parts: dict[str, list[Tensor]] = {t: [] for t in TERMS}
    same_parts: dict[str, list[Tensor]] = {t: [] for t in TERMS}
    ranks = min(num_neighbors, neighbors.shape[1] - 1)
    batch = min(batch_size, n_items)
    for _ in range(n_batches):
        idx = torch.randperm(n_items, generator=generator)[:batch]
        rank = torch.randint(1, ranks + 1, (batch,), generator=generator) if ranks >= 1 else None
        pos_idx = neighbors[idx, rank] if rank is not None else idx
        f, f_pos = _stack(feats, idx), _stack(feats, pos_idx)
        c1 = sample_coords(batch, n_samples, generator=generator)
        c2 = sample_coords(batch, n_samples, generator=generator)
        perm = derangement(batch, generator=generator)
        anchor = sample_at(f, c1)
        others = {"self": anchor, "knn": sample_at(f_pos, c2), "random": sample_at(f[perm], c2)}
        lab1 = _pseudo_labels(anchor, kmeans.centroids)  # (B, S, S)
        for term, other in others.items():
            fd_parts[term].append(feature_correlation(anchor, other, pointwise=pointwise).flatten())
            lab2 = _pseudo_labels(other, kmeans.centroids)
            same = lab1[:, :, :, None, None] == lab2[:, None, None, :, :]  # (B, S, S, S, S)
            same_parts[term].append(same.flatten().float())
    shifts, fractions, fds = {}, {}, {}
    for term in TERMS:
        fd = torch.cat(fd_parts[term])
        p = float(torch.cat(same_parts[term]).mean())
        q = min(max(1.0 - p, 0.0), 1.0)
        shifts[term] = float(torch.quantile(fd[:: max(1, fd.numel() // 1_000_000)], q))
        fractions[term] = p
        fds[term] = fd
    return Calibration(shifts=shifts, same_fraction=fractions, fd=fds)
