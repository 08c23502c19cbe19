"""Tests of stego.losses against the original implementation (parity/correlation.npz,
parity/stego_loss.npz) and of its properties.

Tolerances: float32 tensors rtol=1e-5, atol=1e-6 (gradients atol=1e-7 on values of order 1e-4);
recorded random draws (coords, perms) are compared bit-exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stego.errors import StegoError
from stego.losses import (
    StegoLoss,
    bilinear_rows,
    channels_last_table,
    code_correlation,
    correlation,
    correlation_parts,
    correlation_term,
    derangement,
    feature_correlation,
    normalize,
    read_rows,
    sample_at,
    sample_coords,
    sample_points,
)

RTOL, ATOL = 1e-5, 1e-6
CORR_CASES = ["pw1_zc1_st0", "pw1_zc0_st0", "pw0_zc1_st0", "pw0_zc0_st0", "pw1_zc1_st1"]
LOSS_CONFIGS = ["cityscapes", "coco", "cityscapes_pw0_zc0"]


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a))


def close(
    actual: torch.Tensor, expected: np.ndarray, rtol: float = RTOL, atol: float = ATOL
) -> None:
    np.testing.assert_allclose(actual.detach().cpu().numpy(), expected, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- correlation.npz
def _corr_cases() -> list[tuple[str, str]]:
    cases = [(size, case) for size in ("small", "large") for case in CORR_CASES]
    return cases + [("small", "self_pw1_zc1_st0")]


@pytest.mark.parametrize(("size", "case"), _corr_cases())
def test_correlation_term_matches_original(load_parity, size: str, case: str) -> None:
    d = load_parity("correlation.npz")
    key = f"{size}_{case}"
    pointwise, zero_clamp, stabilize, selfpair = (bool(v) for v in d[f"{key}_flags"])
    f1, c1 = t(d[f"{size}_f1"]), t(d[f"{size}_c1"])
    f2, c2 = (f1, c1) if selfpair else (t(d[f"{size}_f2"]), t(d[f"{size}_c2"]))
    shift = float(d[f"{key}_shift"])
    flags = dict(pointwise=pointwise, zero_clamp=zero_clamp, stabilize=stabilize)
    parts = correlation_parts(f1, f2, c1, c2, shift, **flags)
    close(parts.loss, d[f"{key}_loss"])
    close(parts.fd, d[f"{key}_fd"])
    close(parts.cd, d[f"{key}_cd"])
    close(correlation_term(f1, f2, c1, c2, shift, **flags), d[f"{key}_loss"])
    close(feature_correlation(f1, f2, pointwise=pointwise), d[f"{key}_fd"])
    close(code_correlation(c1, c2), d[f"{key}_cd"])


def test_correlation_shape_and_definition() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 6, 7, generator=g)
    out = correlation(a, b)
    assert out.shape == (2, 4, 5, 6, 7)
    assert torch.allclose(out[1, 2, 3, 4, 5], (a[1, :, 2, 3] * b[1, :, 4, 5]).sum())
    n = normalize(torch.zeros(1, 3, 2, 2))
    assert torch.equal(n, torch.zeros(1, 3, 2, 2))  # eps guards the zero vector


# --------------------------------------------------------------------------- stego_loss.npz
def _loss_for(d: dict, prefix: str, derangement_mode: str = "original") -> StegoLoss:
    pointwise, zero_clamp, stabilize = (bool(v) for v in d[f"{prefix}_flags"])
    return StegoLoss(
        shifts=tuple(float(v) for v in d[f"{prefix}_shifts"]),
        weights=tuple(float(v) for v in d[f"{prefix}_weights"]),
        n_samples=int(d["feature_samples"]),
        neg_samples=int(d["neg_samples"]),
        pointwise=pointwise,
        zero_clamp=zero_clamp,
        stabilize=stabilize,
        derangement=derangement_mode,
    )


@pytest.mark.parametrize("prefix", LOSS_CONFIGS)
def test_sampled_tensors_match_original(load_parity, prefix: str) -> None:
    d = load_parity("stego_loss.npz")
    c1, c2, perms = t(d[f"{prefix}_coords1"]), t(d[f"{prefix}_coords2"]), t(d[f"{prefix}_perms"])
    close(sample_at(t(d["orig_feats"]), c1), d[f"{prefix}_feats"])
    close(sample_at(t(d["orig_code"]), c1), d[f"{prefix}_code"])
    close(sample_at(t(d["orig_feats_pos"]), c2), d[f"{prefix}_feats_pos"])
    close(sample_at(t(d["orig_code_pos"]), c2), d[f"{prefix}_code_pos"])
    for k in range(perms.shape[0]):
        close(sample_at(t(d["orig_feats"])[perms[k]], c2), d[f"{prefix}_feats_neg"][k])
        close(sample_at(t(d["orig_code"])[perms[k]], c2), d[f"{prefix}_code_neg"][k])


@pytest.mark.parametrize("prefix", LOSS_CONFIGS)
def test_stego_loss_matches_original(load_parity, prefix: str) -> None:
    d = load_parity("stego_loss.npz")
    loss = _loss_for(d, prefix)
    feat, feat_pos = t(d["orig_feats"]), t(d["orig_feats_pos"])
    code = t(d["orig_code"]).clone().requires_grad_(True)
    code_pos = t(d["orig_code_pos"]).clone().requires_grad_(True)
    out = loss(
        feat,
        feat_pos,
        code,
        code_pos,
        coords1=t(d[f"{prefix}_coords1"]),
        coords2=t(d[f"{prefix}_coords2"]),
        perms=t(d[f"{prefix}_perms"]),
    )
    close(out.self_term, d[f"{prefix}_pos_intra_mean"])
    close(out.knn_term, d[f"{prefix}_pos_inter_mean"])
    close(out.random_term, d[f"{prefix}_neg_inter_mean"])
    close(out.total, d[f"{prefix}_total"])
    cd_means = torch.stack([out.stats[k].cd_mean for k in ("self", "knn", "random")])
    close(cd_means, d[f"{prefix}_cd_means"])
    out.total.backward()
    close(code.grad, d[f"{prefix}_grad_orig_code"], atol=1e-7)
    close(code_pos.grad, d[f"{prefix}_grad_orig_code_pos"], atol=1e-7)


@pytest.mark.parametrize("prefix", LOSS_CONFIGS)
def test_negative_terms_per_perm_match_original(load_parity, prefix: str) -> None:
    d = load_parity("stego_loss.npz")
    pointwise, zero_clamp, stabilize = (bool(v) for v in d[f"{prefix}_flags"])
    shift = float(d[f"{prefix}_shifts"][2])
    feats, code = t(d[f"{prefix}_feats"]), t(d[f"{prefix}_code"])
    terms = [
        correlation_term(
            feats,
            t(d[f"{prefix}_feats_neg"][k]),
            code,
            t(d[f"{prefix}_code_neg"][k]),
            shift,
            pointwise=pointwise,
            zero_clamp=zero_clamp,
            stabilize=stabilize,
        )
        for k in range(int(d["neg_samples"]))
    ]
    close(torch.stack([m.mean() for m in terms]), d[f"{prefix}_neg_inter_mean_per_perm"])
    assert list(torch.cat(terms).shape) == d[f"{prefix}_neg_inter_loss_shape"].tolist()


@pytest.mark.parametrize("prefix", LOSS_CONFIGS)
def test_seed_replay_reproduces_original_draws(load_parity, prefix: str) -> None:
    """A CPU generator seeded like the original's torch.manual_seed replays its draws exactly."""
    d = load_parity("stego_loss.npz")
    b, s = d["orig_feats"].shape[0], int(d["feature_samples"])
    g = torch.Generator().manual_seed(int(d[f"{prefix}_seed"]))
    c1 = sample_coords(b, s, generator=g)
    c2 = sample_coords(b, s, generator=g)
    perms = torch.stack(
        [derangement(b, generator=g, mode="original") for _ in range(int(d["neg_samples"]))]
    )
    np.testing.assert_array_equal(c1.numpy(), d[f"{prefix}_coords1"])
    np.testing.assert_array_equal(c2.numpy(), d[f"{prefix}_coords2"])
    np.testing.assert_array_equal(perms.numpy(), d[f"{prefix}_perms"])
    # and the whole forward with only the seed gives the recorded total
    loss = _loss_for(d, prefix, "original")
    args = [t(d[k]) for k in ("orig_feats", "orig_feats_pos", "orig_code", "orig_code_pos")]
    out = loss(*args, generator=torch.Generator().manual_seed(int(d[f"{prefix}_seed"])))
    close(out.total, d[f"{prefix}_total"])


# --------------------------------------------------------------------------- properties
def _random_inputs(seed: int, b: int = 3, c: int = 6, dim: int = 4, hw: int = 5):
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(b, c, hw, hw, generator=g)
    feat_pos = torch.randn(b, c, hw, hw, generator=g)
    code = torch.randn(b, dim, hw, hw, generator=g)
    code_pos = torch.randn(b, dim, hw, hw, generator=g)
    return feat, feat_pos, code, code_pos


def test_gradient_reaches_head_not_features() -> None:
    """The loss pulls only on codes: the feature inputs of StegoLoss get no gradient."""
    from stego.models.heads import SegmentationHead

    feat, feat_pos, _, _ = _random_inputs(1, c=8)
    head = SegmentationHead(8, 4, dropout=0.1).train()
    out, out_pos = head(feat), head(feat_pos)
    f_loss = out.feat_for_loss.detach().requires_grad_(True)
    f_loss_pos = out_pos.feat_for_loss.detach().requires_grad_(True)
    loss = StegoLoss(shifts=(0.1, 0.2, 0.3), weights=(1.0, 1.0, 1.0), n_samples=4)
    res = loss(
        f_loss, f_loss_pos, out.code, out_pos.code, generator=torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(res.total) and res.total.requires_grad
    res.total.backward()
    assert f_loss.grad is None and f_loss_pos.grad is None
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
    assert all(float(p.grad.abs().sum()) > 0 for p in head.parameters())


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    pointwise=st.booleans(),
    zero_clamp=st.booleans(),
    stabilize=st.booleans(),
)
def test_loss_finite_and_deterministic(
    seed: int, pointwise: bool, zero_clamp: bool, stabilize: bool
) -> None:
    feat, feat_pos, code, code_pos = _random_inputs(seed)
    loss = StegoLoss(
        shifts=(0.1, 0.2, 0.3),
        weights=(0.5, 1.0, 0.7),
        n_samples=3,
        neg_samples=2,
        pointwise=pointwise,
        zero_clamp=zero_clamp,
        stabilize=stabilize,
        quantiles=(0.1, 0.5, 0.9),
    )
    a = loss(feat, feat_pos, code, code_pos, generator=torch.Generator().manual_seed(seed))
    b = loss(feat, feat_pos, code, code_pos, generator=torch.Generator().manual_seed(seed))
    assert torch.isfinite(a.total) and torch.equal(a.total, b.total)
    assert torch.allclose(a.total, 0.5 * a.self_term + 1.0 * a.knn_term + 0.7 * a.random_term)
    for key in ("self", "knn", "random"):
        st_ = a.stats[key]
        assert st_.fd_quantiles.shape == (3,)
        assert bool((st_.fd_quantiles[1:] >= st_.fd_quantiles[:-1]).all())
        assert 0.0 <= float(st_.attract_fraction) <= 1.0


def test_zero_clamp_gradient_rule() -> None:
    g = torch.Generator().manual_seed(3)
    f1, f2 = torch.randn(2, 6, 3, 3, generator=g), torch.randn(2, 6, 3, 3, generator=g)
    c1 = torch.randn(2, 4, 3, 3, generator=g)
    c2 = torch.randn(2, 4, 3, 3, generator=g)
    for zero_clamp in (True, False):
        c1_ = c1.clone().requires_grad_(True)
        parts = correlation_parts(f1, f2, c1_, c2, 0.1, zero_clamp=zero_clamp)
        # gradient of the loss map w.r.t. cd itself
        cd = parts.cd
        grad_cd = torch.autograd.grad(parts.loss.sum(), cd, retain_graph=True)[0]
        negative = cd.detach() < 0
        assert negative.any() and (~negative).any()
        if zero_clamp:
            assert torch.all(grad_cd[negative] == 0)
            assert torch.all(parts.loss.detach()[negative] == 0)
        else:
            assert torch.allclose(grad_cd, -(parts.fd - 0.1))
        assert torch.allclose(grad_cd[~negative], -(parts.fd - 0.1)[~negative])


def test_stabilize_caps_code_correlation() -> None:
    f = torch.randn(1, 5, 2, 2, generator=torch.Generator().manual_seed(4))
    c = torch.ones(1, 3, 2, 2, requires_grad=True)  # cd == 1 everywhere
    parts = correlation_parts(f, f, c, c, 0.0, stabilize=True)
    assert torch.allclose(parts.loss, -0.8 * parts.fd)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 17, 64])
def test_true_derangement_is_a_fixed_point_free_permutation(n: int) -> None:
    for seed in range(25):
        perm = derangement(n, generator=torch.Generator().manual_seed(seed))
        assert perm.dtype == torch.long and perm.shape == (n,)
        assert torch.equal(perm.sort().values, torch.arange(n))
        assert not bool((perm == torch.arange(n)).any())


def test_true_derangement_is_uniform_for_n3() -> None:
    g = torch.Generator().manual_seed(0)
    seen = {tuple(derangement(3, generator=g).tolist()) for _ in range(200)}
    assert seen == {(1, 2, 0), (2, 0, 1)}  # the only two derangements of 3 elements


def test_original_derangement_has_no_fixed_points_but_may_repeat() -> None:
    repeats = 0
    for seed in range(50):
        perm = derangement(4, generator=torch.Generator().manual_seed(seed), mode="original")
        assert not bool((perm == torch.arange(4)).any())
        repeats += int(perm.unique().numel() < 4)
    assert repeats > 0


def test_errors() -> None:
    with pytest.raises(StegoError, match="at least 2"):
        derangement(1)
    with pytest.raises(StegoError, match="valid modes: true, original"):
        derangement(3, mode="bogus")  # type: ignore[arg-type]
    with pytest.raises(StegoError, match="three entries"):
        StegoLoss(shifts=(0.1, 0.2), weights=(1.0, 1.0, 1.0))  # type: ignore[arg-type]
    with pytest.raises(StegoError, match="valid modes"):
        StegoLoss(shifts=(0.1, 0.2, 0.3), weights=(1.0, 1.0, 1.0), derangement="x")  # type: ignore[arg-type]
    loss = StegoLoss(shifts=(0.1, 0.2, 0.3), weights=(1.0, 1.0, 1.0), n_samples=3)
    feat, feat_pos, code, code_pos = _random_inputs(0)
    with pytest.raises(StegoError, match="feat_pos"):
        loss(feat, feat_pos[:2], code, code_pos)
    with pytest.raises(StegoError, match="batch of at least 2"):
        loss(feat[:1], feat_pos[:1], code[:1], code_pos[:1])
    with pytest.raises(StegoError, match="coords"):
        sample_at(feat, torch.zeros(3, 4, 4, 3))


def test_sample_coords_range_and_shape() -> None:
    coords = sample_coords(3, 7, generator=torch.Generator().manual_seed(0))
    assert coords.shape == (3, 7, 7, 2)
    assert float(coords.min()) >= -1.0 and float(coords.max()) < 1.0


def test_sample_at_corners_and_axis_swap() -> None:
    img = torch.arange(12.0).reshape(1, 1, 3, 4)  # value = 4*y + x
    coords = torch.tensor(
        [[[[-1.0, -1.0], [1.0, -1.0]], [[-1.0, 1.0], [5.0, 5.0]]]]
    )  # (1, 2, 2, 2)
    out = sample_at(img, coords)[0, 0]
    # out[i, j] is read at coords[j, i]; (5, 5) is clamped to the bottom-right corner (border)
    assert out.tolist() == [[0.0, 8.0], [3.0, 11.0]]


@pytest.mark.parametrize("hw", [(5, 7), (1, 4), (3, 1)])
def test_table_reads_equal_grid_sample(hw: tuple[int, int]) -> None:
    """The loss's table sampler gives grid_sample's values and gradients, for any map per group
    (here a non-permutation, as the original derangement can draw), coords outside [-1, 1] and
    maps one pixel high or wide."""
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(4, 6, *hw, generator=g, requires_grad=True)
    coords = torch.rand(4, 3, 3, 2, generator=g) * 2.4 - 1.2
    images = torch.tensor([1, 3, 3, 0])
    expected = sample_at(maps[images], coords)  # (4, 6, 3, 3)
    rows, weights = bilinear_rows(sample_points(coords), images, *hw)
    got = read_rows(channels_last_table(maps), rows, weights)  # (36, 6)
    got = got.view(4, 3, 3, 6).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    (grad_expected,) = torch.autograd.grad((expected * expected.detach()).sum(), maps)
    (grad_got,) = torch.autograd.grad((got * got.detach()).sum(), maps)
    torch.testing.assert_close(grad_got, grad_expected, rtol=1e-6, atol=1e-6)
