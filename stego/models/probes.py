"""Probes on frozen codes (reference section 6): the cluster probe and the linear probe.

Both are meant to be trained on ``code.detach()``: they never change the head. Besides the
original's gradient-trained cluster probe this module offers k-means++ seeding and a label-free
spherical k-means with restarts (:func:`kmeanspp_init`, :func:`spherical_kmeans`) to make the
cluster probe less dependent on its random initialisation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stego.errors import StegoError

__all__ = [
    "ClusterProbe",
    "ClusterProbeOutput",
    "KMeansResult",
    "LinearProbe",
    "cosine_scores",
    "kmeanspp_init",
    "spherical_kmeans",
]


def cosine_scores(code: Tensor, clusters: Tensor) -> Tensor:
    """Cosine of code (B, D, h, w) with every centroid of clusters (K, D) -> (B, K, h, w).

    Both sides are normalised as ``t / max(||t||, 1e-12)``.
    """
    return torch.einsum(
        "bdhw,kd->bkhw",
        F.normalize(code, dim=1, eps=1e-12),
        F.normalize(clusters, dim=1, eps=1e-12),
    )


def _as_rows(codes: Tensor) -> Tensor:
    """Accept codes (N, D) or maps (B, D, h, w); return (N, D) rows."""
    if codes.dim() == 4:
        return codes.permute(0, 2, 3, 1).reshape(-1, codes.shape[1])
    if codes.dim() != 2:
        raise StegoError(f"codes must be (N, D) or (B, D, h, w), got shape {tuple(codes.shape)}")
    return codes


def kmeanspp_init(
    codes: Tensor,
    n_clusters: int,
    *,
    generator: torch.Generator | None = None,
    max_samples: int = 50_000,
) -> Tensor:
    """k-means++ seeding with cosine distance ``1 - cos``: codes (N, D) or (B, D, h, w) -> (K, D).

    At most ``max_samples`` rows (drawn without replacement) are used. The first centre is uniform,
    each next one is drawn with probability proportional to the squared distance to the nearest
    centre already chosen. Returned centres are unit-norm rows of ``codes``.
    """
    x = F.normalize(_as_rows(codes).detach().float(), dim=1, eps=1e-12)  # (N, D)
    n = x.shape[0]
    if n < n_clusters or n_clusters < 1:
        raise StegoError(f"k-means++ needs at least n_clusters={n_clusters} >= 1 codes, got {n}")
    gen_device = generator.device if generator is not None else x.device
    if n > max_samples:
        idx = torch.randperm(n, generator=generator, device=gen_device)[:max_samples].to(x.device)
        x, n = x[idx], max_samples
    first = int(torch.randint(n, (1,), generator=generator, device=gen_device))
    centres = [x[first]]
    nearest = (1.0 - x @ x[first]).clamp_min(0.0)  # (N,) distance to the closest centre
    for _ in range(1, n_clusters):
        weights = nearest.square()
        if float(weights.sum()) <= 0.0:  # all remaining points coincide with centres
            weights = torch.ones_like(weights)
        pick = int(torch.multinomial(weights.to(gen_device), 1, generator=generator))
        centres.append(x[pick])
        nearest = torch.minimum(nearest, (1.0 - x @ x[pick]).clamp_min(0.0))
    return torch.stack(centres)


class KMeansResult(NamedTuple):
    """Result of :func:`spherical_kmeans`."""

    centroids: Tensor  # (K, D) unit-norm centres
    labels: Tensor  # (N,) int64 cluster of each (possibly subsampled) input row
    inertia: Tensor  # () sum over rows of 1 - cos(row, its centre), lowest over restarts


def spherical_kmeans(
    codes: Tensor,
    n_clusters: int,
    *,
    n_restarts: int = 5,
    n_iters: int = 50,
    generator: torch.Generator | None = None,
    max_samples: int = 50_000,
) -> KMeansResult:
    """Label-free spherical k-means (cosine) with k-means++ seeding and restarts.

    codes (N, D) or (B, D, h, w); at most ``max_samples`` rows are used (for the labels too).
    Each restart runs Lloyd iterations until the assignment stops changing or ``n_iters`` is
    reached; an empty cluster is re-seeded at the row worst served by its centre. The restart
    with the lowest inertia wins.
    """
    if n_restarts < 1 or n_iters < 1:
        raise StegoError(f"n_restarts and n_iters must be >= 1, got {n_restarts} and {n_iters}")
    x = F.normalize(_as_rows(codes).detach().float(), dim=1, eps=1e-12)
    if x.shape[0] > max_samples:
        gen_device = generator.device if generator is not None else x.device
        idx = torch.randperm(x.shape[0], generator=generator, device=gen_device)[:max_samples]
        x = x[idx.to(x.device)]
    best: KMeansResult | None = None
    for _ in range(n_restarts):
        centres = kmeanspp_init(x, n_clusters, generator=generator, max_samples=max_samples)
        labels = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        for _ in range(n_iters):
            sim = x @ centres.T  # (N, K)
            best_sim, new_labels = sim.max(dim=1)
            sums = torch.zeros_like(centres).index_add_(0, new_labels, x)  # (K, D)
            counts = torch.bincount(new_labels, minlength=n_clusters)
            for k in torch.nonzero(counts == 0).flatten().tolist():
                worst = int(best_sim.argmin())
                sums[k] = x[worst]
                best_sim[worst] = 2.0  # do not reuse the same row for another empty cluster
            centres = F.normalize(sums, dim=1, eps=1e-12)
            if torch.equal(new_labels, labels):
                break
            labels = new_labels
        sim = x @ centres.T
        best_sim, labels = sim.max(dim=1)
        inertia = (1.0 - best_sim).sum()
        if best is None or float(inertia) < float(best.inertia):
            best = KMeansResult(centroids=centres, labels=labels, inertia=inertia)
    assert best is not None
    return best


class ClusterProbeOutput(NamedTuple):
    """Output of :meth:`ClusterProbe.forward`."""

    loss: Tensor  # () minus the mean over pixels of sum_k probs * cosine
    probs: Tensor  # (B, K, h, w) one-hot (alpha None) or softmax(alpha * cosine)


class ClusterProbe(nn.Module):
    """K learnable centroids ``clusters`` (K, D); cosine scores; online spherical k-means loss."""

    def __init__(
        self, code_dim: int, n_clusters: int, *, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if code_dim < 1 or n_clusters < 1:
            raise StegoError(
                f"code_dim and n_clusters must be positive, got {code_dim} and {n_clusters}"
            )
        self.code_dim = int(code_dim)
        self.n_clusters = int(n_clusters)
        self.clusters = nn.Parameter(torch.randn(n_clusters, code_dim, generator=generator))

    def extra_repr(self) -> str:
        return f"code_dim={self.code_dim}, n_clusters={self.n_clusters}"

    def _check(self, code: Tensor) -> None:
        if code.dim() != 4 or code.shape[1] != self.code_dim:
            raise StegoError(
                f"ClusterProbe expects codes (B, {self.code_dim}, h, w), got {tuple(code.shape)}"
            )

    def scores(self, code: Tensor) -> Tensor:
        """Cosine similarity of code (B, D, h, w) with every centroid -> (B, K, h, w)."""
        self._check(code)
        return cosine_scores(code, self.clusters)

    def forward(self, code: Tensor, alpha: float | None = None) -> ClusterProbeOutput:
        """code (B, D, h, w) -> ClusterProbeOutput(loss (), probs (B, K, h, w)).

        ``alpha=None``: probs = one-hot of the best centroid (a constant for autograd), so the
        loss is minus the mean best cosine. ``alpha`` given: probs = softmax(alpha * cosine), with
        gradient through the softmax.
        """
        scores = self.scores(code)  # (B, K, h, w)
        if alpha is None:
            probs = (
                F.one_hot(scores.argmax(dim=1), self.n_clusters)
                .permute(0, 3, 1, 2)
                .to(scores.dtype)
            )
        else:
            probs = F.softmax(scores * alpha, dim=1)
        loss = -(probs * scores).sum(dim=1).mean()
        return ClusterProbeOutput(loss=loss, probs=probs)

    def log_probs(self, code: Tensor, alpha: float = 2.0) -> Tensor:
        """log_softmax(alpha * cosine) over clusters: (B, D, h, w) -> (B, K, h, w)."""
        return F.log_softmax(self.scores(code) * alpha, dim=1)

    def predict(self, code: Tensor) -> Tensor:
        """Index of the most similar centroid: (B, D, h, w) -> (B, h, w) int64."""
        return self.scores(code).argmax(dim=1)

    @torch.no_grad()
    def init_kmeanspp(self, codes: Tensor, *, generator: torch.Generator | None = None) -> None:
        """Overwrite the centroids with k-means++ seeds from codes (N, D) or (B, D, h, w)."""
        seeds = kmeanspp_init(codes, self.n_clusters, generator=generator)
        self.clusters.copy_(seeds.to(self.clusters))

    @torch.no_grad()
    def fit_kmeans(
        self,
        codes: Tensor,
        *,
        n_restarts: int = 5,
        n_iters: int = 50,
        generator: torch.Generator | None = None,
    ) -> KMeansResult:
        """Overwrite the centroids with the best of ``n_restarts`` spherical k-means runs."""
        result = spherical_kmeans(
            codes, self.n_clusters, n_restarts=n_restarts, n_iters=n_iters, generator=generator
        )
        self.clusters.copy_(result.centroids.to(self.clusters))
        return result


class LinearProbe(nn.Module):
    """Supervised evaluation probe: a 1x1 convolution from codes to class logits."""

    def __init__(self, code_dim: int, n_classes: int) -> None:
        super().__init__()
        if code_dim < 1 or n_classes < 1:
            raise StegoError(
                f"code_dim and n_classes must be positive, got {code_dim} and {n_classes}"
            )
        self.code_dim = int(code_dim)
        self.n_classes = int(n_classes)
        self.conv = nn.Conv2d(code_dim, n_classes, kernel_size=1)

    def forward(self, code: Tensor) -> Tensor:
        """code (B, D, h, w) -> logits (B, n_classes, h, w)."""
        if code.dim() != 4 or code.shape[1] != self.code_dim:
            raise StegoError(
                f"LinearProbe expects codes (B, {self.code_dim}, h, w), got {tuple(code.shape)}"
            )
        return self.conv(code)

    def loss(self, code: Tensor, labels: Tensor, *, upsample: int | None = None) -> Tensor:
        """Cross entropy of the logits, upsampled bilinearly (align_corners=False) to the labels.

        code (B, D, h, w), labels (B, H, W) int64; pixels whose label is outside [0, n_classes)
        (e.g. -1 = ignore) do not count. Mean over valid pixels; 0 (with graph) if there are none.

        ``upsample`` (optional) caps the loss resolution at ``upsample`` times the code's: larger
        labels are first resized with ``nearest-exact`` to (upsample*h, upsample*w), i.e. a
        regular subgrid of the label pixels is scored. The original always scores every label
        pixel; on a CPU that upsampling, its log-softmax and their backward were ~30% of a
        cached training step for no visible effect on the probe (docs/benchmarks.md).
        """
        if labels.dim() != 3 or labels.shape[0] != code.shape[0]:
            raise StegoError(
                f"labels must be (B, H, W) with B = {code.shape[0]}, got {tuple(labels.shape)}"
            )
        labels = labels.long()
        if upsample:
            size = (upsample * code.shape[-2], upsample * code.shape[-1])
            if labels.shape[-2] > size[0] or labels.shape[-1] > size[1]:
                size = (min(size[0], labels.shape[-2]), min(size[1], labels.shape[-1]))
                labels = F.interpolate(labels[:, None].float(), size=size, mode="nearest-exact")[
                    :, 0
                ].long()
        logits = F.interpolate(
            self(code), size=labels.shape[-2:], mode="bilinear", align_corners=False
        )
        valid = (labels >= 0) & (labels < self.n_classes)
        if not bool(valid.any()):
            return logits.sum() * 0.0
        target = torch.where(valid, labels, torch.full_like(labels, -100))
        return F.cross_entropy(logits, target, ignore_index=-100)
