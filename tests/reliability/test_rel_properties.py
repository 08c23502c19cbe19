"""Property-based tests that tests/test_metrics.py and tests/test_losses.py do not already make.

Metrics: the streaming (torch) accumulator under any chunking and cluster relabelling, pixel
order and duplication invariance, confusion totals, mIoU = mean of defined IoUs, all-ignored
input. Loss: finiteness on degenerate features (zeros, huge, constant), invariance to positive
rescaling of features and codes, output shapes over random sizes, the zero-clamp gradient rule
over random inputs and shifts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stego.eval.metrics import UnsupervisedMetrics, confusion_matrix, unsupervised_scores
from stego.losses import StegoLoss, correlation_parts

SETTINGS = settings(max_examples=30, deadline=None)

cases = st.integers(1, 5).flatmap(
    lambda n: st.tuples(
        st.just(n),
        st.integers(0, 2),
        st.lists(st.integers(-1, n - 1), min_size=1, max_size=50),  # -1 = ignore
        st.integers(0, 2**31 - 1),
    )
).filter(lambda c: any(v >= 0 for v in c[2]))  # all-ignored input: its own test below


def _preds(targets: np.ndarray, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, k, targets.shape)


# ----------------------------------------------------------------------------- metrics


@SETTINGS
@given(cases, st.lists(st.integers(1, 50), min_size=1, max_size=5))
def test_streaming_metrics_equal_one_call_under_any_chunking_and_relabelling(case, cuts) -> None:
    n, e, targets, seed = case
    k = n + e
    t = np.array(targets)
    p = _preds(t, k, seed)
    whole = unsupervised_scores(p, t, n, extra_clusters=e)
    perm = np.random.default_rng(seed + 1).permutation(k)
    metric = UnsupervisedMetrics(n, extra_clusters=e)
    bounds = sorted({0, len(t), *[c % (len(t) + 1) for c in cuts]})
    for a, b in zip(bounds[:-1], bounds[1:], strict=False):
        metric.update(torch.as_tensor(perm[p[a:b]]), torch.as_tensor(t[a:b]))
    out = metric.compute()
    assert float(out["accuracy"]) == pytest.approx(whole.accuracy, abs=1e-4)


@SETTINGS
@given(cases)
def test_pixel_order_and_duplication_do_not_matter(case) -> None:
    n, e, targets, seed = case
    t = np.array(targets)
    p = _preds(t, n + e, seed)
    order = np.random.default_rng(seed).permutation(len(t))
    base = unsupervised_scores(p, t, n, extra_clusters=e)
    shuffled = unsupervised_scores(p[order], t[order], n, extra_clusters=e)
    doubled = unsupervised_scores(np.tile(p, 3), np.tile(t, 3), n, extra_clusters=e)
    for other in (shuffled, doubled):
        np.testing.assert_allclose(
            [other.accuracy, other.miou], [base.accuracy, base.miou], rtol=1e-9, equal_nan=True
        )
        np.testing.assert_allclose(other.iou, base.iou, rtol=1e-9, equal_nan=True)


@SETTINGS
@given(cases)
def test_confusion_totals_and_miou_definition(case) -> None:
    n, e, targets, seed = case
    t = np.array(targets)
    p = _preds(t, n + e, seed)
    c = confusion_matrix(p, t, n, n + e)
    assert c.shape == (n + e, n) and int(c.sum()) == int((t >= 0).sum()) and (c >= 0).all()
    np.testing.assert_array_equal(c.sum(0), np.bincount(t[t >= 0], minlength=n))
    s = unsupervised_scores(p, t, n, extra_clusters=e)
    assert s.n_pixels == int((t >= 0).sum())
    defined = s.iou[~np.isnan(s.iou)]
    if defined.size:
        assert s.miou == pytest.approx(float(defined.mean()))
        assert 0.0 <= s.accuracy <= 100.0
    # the Hungarian assignment is a one-to-one map into the classes (or -1 for extras)
    matched = s.assignment[s.assignment >= 0]
    assert len(set(matched.tolist())) == len(matched) and len(matched) == min(n, n + e)


def test_all_pixels_ignored_is_a_clear_error() -> None:
    """No scorable pixel: a StegoError saying to check n_classes / the ignore value, not a
    division by zero or a silent 0 % / NaN score."""
    from stego.errors import StegoError

    t = np.full(10, -1)
    p = np.zeros(10, dtype=np.int64)
    with pytest.raises(StegoError, match="no pixel was counted.*ignore value"):
        unsupervised_scores(p, t, 3)


# ----------------------------------------------------------------------------- loss


def _loss(shift=0.1, **kw) -> StegoLoss:
    kw.setdefault("n_samples", 3)
    kw.setdefault("neg_samples", 2)
    return StegoLoss(shifts=(shift, shift, shift), weights=(1.0, 1.0, 1.0), **kw)


shapes = st.tuples(st.integers(2, 4), st.integers(1, 8), st.integers(1, 5), st.integers(1, 6),
                   st.integers(1, 6))  # fmt: skip


@SETTINGS
@given(shapes, st.integers(0, 10_000), st.booleans())
def test_loss_shapes_and_finite_over_random_sizes(shape, seed, pointwise) -> None:
    b, c, d, h, w = shape
    g = torch.Generator().manual_seed(seed)
    feat, feat_pos = torch.randn(b, c, h, w, generator=g), torch.randn(b, c, h, w, generator=g)
    code, code_pos = torch.randn(b, d, h, w, generator=g), torch.randn(b, d, h, w, generator=g)
    code.requires_grad_(True)
    out = _loss(pointwise=pointwise)(feat, feat_pos, code, code_pos, generator=g)
    for value in (out.total, out.self_term, out.knn_term, out.random_term):
        assert value.shape == () and torch.isfinite(value)
    out.total.backward()
    assert code.grad is not None and code.grad.shape == code.shape
    assert torch.isfinite(code.grad).all()


@SETTINGS
@given(st.sampled_from(["zeros", "huge", "tiny", "constant"]), st.integers(0, 1000), st.booleans())
def test_loss_finite_on_degenerate_features(kind, seed, pointwise) -> None:
    g = torch.Generator().manual_seed(seed)
    shape = (3, 6, 4, 4)
    base = torch.randn(shape, generator=g)
    feat = {
        "zeros": torch.zeros(shape),
        "huge": base * 1e30,
        "tiny": base * 1e-30,
        "constant": torch.ones(shape),
    }[kind]
    code = torch.randn(3, 4, 4, 4, generator=g, requires_grad=True)
    code_pos = torch.randn(3, 4, 4, 4, generator=g)
    out = _loss(pointwise=pointwise)(feat, feat.flip(0), code, code_pos, generator=g)
    assert torch.isfinite(out.total)
    out.total.backward()
    assert torch.isfinite(code.grad).all()


@SETTINGS
@given(st.integers(0, 10_000), st.floats(0.01, 100.0), st.floats(0.01, 100.0))
def test_loss_invariant_to_positive_rescaling(seed, feat_scale, code_scale) -> None:
    """Correlations are cosine similarities: scaling features or codes changes nothing."""
    g = torch.Generator().manual_seed(seed)
    feat, feat_pos = torch.randn(3, 6, 4, 4, generator=g), torch.randn(3, 6, 4, 4, generator=g)
    code, code_pos = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    loss = _loss()
    a = loss(feat, feat_pos, code, code_pos, generator=torch.Generator().manual_seed(seed))
    b = loss(feat * feat_scale, feat_pos * feat_scale, code * code_scale, code_pos * code_scale,
             generator=torch.Generator().manual_seed(seed))  # fmt: skip
    torch.testing.assert_close(a.total, b.total, atol=1e-5, rtol=1e-4)


@SETTINGS
@given(st.integers(0, 10_000), st.floats(-0.5, 0.5), st.booleans())
def test_zero_clamp_gradient_rule_random(seed, shift, pointwise) -> None:
    """d loss / d cd is 0 where cd < 0 (clamped) and -(fd - shift) elsewhere."""
    g = torch.Generator().manual_seed(seed)
    f1, f2 = torch.randn(2, 5, 3, 3, generator=g), torch.randn(2, 5, 3, 3, generator=g)
    c1 = torch.randn(2, 4, 3, 3, generator=g, requires_grad=True)
    c2 = torch.randn(2, 4, 3, 3, generator=g)
    parts = correlation_parts(f1, f2, c1, c2, shift, pointwise=pointwise, zero_clamp=True)
    grad = torch.autograd.grad(parts.loss.sum(), parts.cd)[0]
    negative = parts.cd.detach() < 0
    assert torch.all(grad[negative] == 0)
    assert torch.all(parts.loss.detach()[negative] == 0)
    torch.testing.assert_close(grad[~negative], -(parts.fd - shift)[~negative])
    assert parts.loss.shape == parts.cd.shape == parts.fd.shape
