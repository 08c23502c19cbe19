"""Tests of stego.models.probes against the original ClusterLookup (parity/cluster_probe.npz) and
of the k-means helpers and the linear probe.

Tolerances: rtol=1e-5, atol=1e-6 (gradients atol=1e-7); one-hot probabilities and argmax exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stego.errors import StegoError
from stego.models.probes import ClusterProbe, LinearProbe, kmeanspp_init, spherical_kmeans

RTOL, ATOL = 1e-5, 1e-6


def _probe(d: dict) -> tuple[ClusterProbe, torch.Tensor]:
    k, dim = d["clusters"].shape
    probe = ClusterProbe(dim, k)
    with torch.no_grad():
        probe.clusters.copy_(torch.from_numpy(d["clusters"]))
    return probe, torch.from_numpy(d["x"])


def test_hard_assignment_matches_original(load_parity) -> None:
    d = load_parity("cluster_probe.npz")
    probe, x = _probe(d)
    out = probe(x)
    np.testing.assert_allclose(out.loss.item(), d["loss_hard"], rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(out.probs.numpy(), d["probs_hard"])
    np.testing.assert_array_equal(probe.predict(x).numpy(), d["preds_hard"])
    out.loss.backward()
    np.testing.assert_allclose(
        probe.clusters.grad.numpy(), d["grad_clusters_hard"], rtol=RTOL, atol=1e-7
    )


def test_soft_assignment_matches_original(load_parity) -> None:
    d = load_parity("cluster_probe.npz")
    probe, x = _probe(d)
    alpha = float(d["alpha"])
    out = probe(x, alpha=alpha)
    np.testing.assert_allclose(out.loss.item(), d["loss_soft_alpha2"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        out.probs.detach().numpy(), d["probs_soft_alpha2"], rtol=RTOL, atol=ATOL
    )
    out.loss.backward()
    np.testing.assert_allclose(
        probe.clusters.grad.numpy(), d["grad_clusters_soft_alpha2"], rtol=RTOL, atol=1e-7
    )
    with torch.no_grad():
        np.testing.assert_allclose(
            probe.log_probs(x, alpha=alpha).numpy(), d["log_probs_alpha2"], rtol=RTOL, atol=ATOL
        )


def test_probe_does_not_touch_code_when_detached() -> None:
    probe = ClusterProbe(4, 3, generator=torch.Generator().manual_seed(0))
    code = torch.randn(2, 4, 3, 3, requires_grad=True)
    probe(code.detach()).loss.backward()
    assert code.grad is None and probe.clusters.grad is not None


def _blobs(seed: int, k: int = 4, dim: int = 8, per: int = 60, noise: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, dim, generator=g), dim=1)
    labels = torch.arange(k).repeat_interleave(per)
    x = centres[labels] + noise * torch.randn(k * per, dim, generator=g)
    perm = torch.randperm(k * per, generator=g)
    return x[perm], labels[perm], centres


def _recovered(found: torch.Tensor, centres: torch.Tensor) -> bool:
    sim = F.normalize(found, dim=1) @ centres.T  # (K, K)
    return (
        bool((sim.max(dim=0).values > 0.95).all())
        and sim.argmax(dim=0).unique().numel() == centres.shape[0]
    )


def test_kmeanspp_init_covers_separated_clusters() -> None:
    hits = 0
    for seed in range(10):
        x, _, centres = _blobs(seed)
        seeds = kmeanspp_init(x, 4, generator=torch.Generator().manual_seed(seed))
        assert seeds.shape == (4, 8)
        hits += _recovered(seeds, centres)
    assert hits >= 8  # k-means++ almost always puts one seed in every well-separated blob


def test_fit_kmeans_recovers_clusters_and_labels() -> None:
    x, labels, centres = _blobs(3)
    probe = ClusterProbe(8, 4)
    maps = x.T.reshape(1, 8, 12, 20)  # the same codes given as a (B, D, h, w) map
    result = probe.fit_kmeans(
        maps, n_restarts=3, n_iters=20, generator=torch.Generator().manual_seed(0)
    )
    assert _recovered(probe.clusters.detach(), centres)
    assert torch.allclose(probe.clusters.detach(), result.centroids)
    # every true cluster maps to exactly one found cluster
    pred = probe.predict(maps).reshape(-1)
    for c in range(4):
        assert pred[labels == c].unique().numel() == 1
    assert float(result.inertia) < 0.05 * x.shape[0]


def test_fit_kmeans_handles_duplicates_and_restarts_choose_best() -> None:
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    res = spherical_kmeans(
        x, 3, n_restarts=2, n_iters=5, generator=torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(res.centroids).all() and res.labels.shape == (4,)
    assert float(res.inertia) == pytest.approx(0.0, abs=1e-6)


def test_init_kmeanspp_sets_clusters() -> None:
    x, _, _ = _blobs(1)
    probe = ClusterProbe(8, 4)
    probe.init_kmeanspp(x, generator=torch.Generator().manual_seed(0))
    norms = probe.clusters.detach().norm(dim=1)
    assert torch.allclose(norms, torch.ones(4), atol=1e-5)


def test_linear_probe_loss_ignores_invalid_labels() -> None:
    torch.manual_seed(0)
    probe = LinearProbe(4, 3)
    code = torch.randn(2, 4, 4, 4)
    labels = torch.randint(0, 3, (2, 8, 8))
    labels[0, :2] = -1
    labels[1, 5:] = 7  # out of range: ignored too
    logits = probe(code)
    assert logits.shape == (2, 3, 4, 4)
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    valid = (labels >= 0) & (labels < 3)
    expected = F.cross_entropy(up.permute(0, 2, 3, 1)[valid], labels[valid])
    assert torch.allclose(probe.loss(code, labels), expected, atol=1e-6)
    empty = probe.loss(code, torch.full((2, 8, 8), -1))
    assert float(empty.detach()) == 0.0 and empty.requires_grad


def test_linear_probe_loss_capped_resolution_scores_a_label_subgrid() -> None:
    torch.manual_seed(0)
    probe = LinearProbe(4, 3)
    code = torch.randn(2, 4, 4, 4)
    labels = torch.randint(0, 3, (2, 16, 16))
    # cap 2x the code: 8x8 = every other label pixel (nearest-exact picks 1, 3, 5, ...)
    up = F.interpolate(probe(code), size=(8, 8), mode="bilinear", align_corners=False)
    sub = labels[:, 1::2, 1::2]
    expected = F.cross_entropy(up, sub)
    assert torch.allclose(probe.loss(code, labels, upsample=2), expected, atol=1e-6)
    # a cap above the label size changes nothing
    assert torch.equal(probe.loss(code, labels, upsample=8), probe.loss(code, labels))


def test_errors() -> None:
    probe = ClusterProbe(4, 3)
    with pytest.raises(StegoError, match=r"\(B, 4, h, w\)"):
        probe(torch.randn(1, 5, 2, 2))
    with pytest.raises(StegoError, match="at least"):
        kmeanspp_init(torch.randn(2, 4), 3)
    with pytest.raises(StegoError, match="labels"):
        LinearProbe(4, 3).loss(torch.randn(2, 4, 2, 2), torch.zeros(2, 2, dtype=torch.long))
