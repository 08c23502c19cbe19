"""stego.eval.metrics: parity with the original UnsupervisedMetrics, properties, error paths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stego.errors import StegoError
from stego.eval.metrics import (
    Scores,
    UnsupervisedMetrics,
    confusion_matrix,
    map_clusters,
    scores_from_confusion,
    supervised_scores,
    unsupervised_scores,
)

CASES = ["k27", "k3", "extra"]


def _case(load_parity, case: str) -> dict:
    d = load_parity("metrics.npz")
    return {k[len(case) + 1 :]: v for k, v in d.items() if k.startswith(case + "_")}


# ---------------------------------------------------------------- parity (rule "original")


@pytest.mark.parametrize("case", CASES)
def test_parity_with_original(load_parity, case):
    d = _case(load_parity, case)
    n, e = int(d["n_classes"]), int(d["extra_clusters"])
    metric = UnsupervisedMetrics(n, extra_clusters=e, rule="original")
    for b in (0, 1):
        metric.update(torch.from_numpy(d[f"preds{b}"]), torch.from_numpy(d[f"target{b}"]))
    s = metric.scores()

    np.testing.assert_array_equal(s.confusion, d["stats"])
    rows = np.flatnonzero(s.assignment >= 0)
    np.testing.assert_array_equal(rows, d["assign_rows"])
    np.testing.assert_array_equal(s.assignment[rows], d["assign_cols"])
    assert s.histogram.dtype == d["histogram"].dtype
    np.testing.assert_array_equal(s.histogram, d["histogram"])
    ref_iou = d["iou"] * 100
    np.testing.assert_array_equal(np.isnan(s.iou), np.isnan(ref_iou))
    np.testing.assert_allclose(s.iou, ref_iou, rtol=1e-6)
    assert s.miou == float(d["miou"])
    assert s.accuracy == float(d["accuracy"])
    if e == 0:
        mapped = map_clusters(np.clip(d["preds0"], 0, n - 1), s.assignment)
        np.testing.assert_array_equal(mapped, d["mapped_preds_batch0"])


@pytest.mark.parametrize("case", CASES)
def test_parity_one_call_equals_accumulated(load_parity, case):
    d = _case(load_parity, case)
    n, e = int(d["n_classes"]), int(d["extra_clusters"])
    preds = np.concatenate([d["preds0"], d["preds1"]])
    targets = np.concatenate([d["target0"], d["target1"]])
    s = unsupervised_scores(preds, targets, n, extra_clusters=e, rule="original")
    np.testing.assert_array_equal(s.confusion, d["stats"])
    assert (s.accuracy, s.miou) == (float(d["accuracy"]), float(d["miou"]))


def test_extra_case_transposed_matching(load_parity):
    """The original's extra-cluster histogram stacks rows picked by a matching on stats^T."""
    d = _case(load_parity, "extra")
    s = scores_from_confusion(d["stats"], rule="original")
    np.testing.assert_array_equal(s.histogram[:3, :3], d["stats"][d["assign_t_cols"]])
    assert np.isnan(s.iou[-1]) and s.iou.shape == (4,)


@pytest.mark.parametrize("case", ["k27", "k3"])
def test_strict_matches_original_without_out_of_range_preds(load_parity, case):
    d = _case(load_parity, case)
    n = int(d["n_classes"])
    preds = np.clip(np.concatenate([d["preds0"], d["preds1"]]), 0, n - 1)
    targets = np.concatenate([d["target0"], d["target1"]])
    strict = unsupervised_scores(preds, targets, n)
    orig = unsupervised_scores(preds, targets, n, rule="original")
    np.testing.assert_array_equal(strict.confusion, orig.confusion)
    assert strict.accuracy == pytest.approx(orig.accuracy, rel=1e-6)
    assert strict.miou == pytest.approx(orig.miou, rel=1e-6)


# ---------------------------------------------------------------- strict vs original rule


def test_strict_counts_extra_cluster_pixels_as_errors():
    # 2 classes, 1 extra cluster (id 2). Clusters 0 -> class 0, 1 -> class 1, 2 unmatched.
    targets = np.array([0, 0, 0, 1, 1, 1, 1])
    preds = np.array([0, 0, 2, 1, 1, 2, 0])
    s = unsupervised_scores(preds, targets, 2, extra_clusters=1)
    np.testing.assert_array_equal(s.confusion, [[2, 1], [0, 2], [1, 1]])
    np.testing.assert_array_equal(s.assignment, [0, 1, -1])
    np.testing.assert_array_equal(s.histogram, [[2, 1], [0, 2]])
    # class 0: tp 2, 3 true pixels, 3 predicted -> 2 / (3 + 3 - 2) = 0.5
    # class 1: tp 2, 4 true pixels, 2 predicted -> 2 / (4 + 2 - 2) = 0.5
    np.testing.assert_allclose(s.iou, [50.0, 50.0])
    assert s.miou == pytest.approx(50.0)
    assert s.accuracy == pytest.approx(400 / 7)  # 4 correct of 7 labelled pixels
    assert s.n_pixels == 7

    # the original drops the two extra-cluster pixels: 4 of 5 correct, IoU 2/3 each
    o = unsupervised_scores(preds, targets, 2, extra_clusters=1, rule="original")
    assert o.n_pixels == 5
    assert o.accuracy == pytest.approx(80.0, rel=1e-6)
    assert o.miou == pytest.approx(200 / 3, rel=1e-6)


def test_strict_rejects_out_of_range_predictions_original_drops_them():
    targets = np.array([0, 1, 2, 0])
    for bad in (-1, 3):
        preds = np.array([0, 1, 2, bad])
        with pytest.raises(StegoError, match=r"\[0, 3\)"):
            unsupervised_scores(preds, targets, 3)
        o = unsupervised_scores(preds, targets, 3, rule="original")
        assert o.n_pixels == 3 and o.accuracy == pytest.approx(100.0)


# ---------------------------------------------------------------- properties

labels = st.integers(1, 6).flatmap(
    lambda n: st.tuples(
        st.just(n),
        st.integers(0, 3),
        st.lists(st.integers(0, n - 1), min_size=1, max_size=60),
        st.randoms(use_true_random=False),
    )
)


@settings(max_examples=40, deadline=None)
@given(labels)
def test_perfect_permuted_prediction_scores_100(data):
    n, e, targets, rnd = data
    perm = np.array(rnd.sample(range(n + e), n + e))
    t = np.array(targets)
    preds = perm[t]
    t_ignored = np.concatenate([t, [-1, 255]])  # ignored pixels may carry any prediction
    p_ignored = np.concatenate([preds, [rnd.randrange(n + e)] * 2])
    s = unsupervised_scores(p_ignored, t_ignored, n, extra_clusters=e)
    assert s.accuracy == pytest.approx(100.0)
    assert s.miou == pytest.approx(100.0)
    np.testing.assert_array_equal(map_clusters(preds, s.assignment), t)


@settings(max_examples=40, deadline=None)
@given(labels, st.lists(st.integers(0, 100), min_size=60, max_size=60))
def test_relabelling_clusters_and_bounds(data, raw_preds):
    n, e, targets, rnd = data
    k = n + e
    t = np.array(targets)
    p = np.array(raw_preds[: len(t)]) % k
    s = unsupervised_scores(p, t, n, extra_clusters=e)
    for value in [s.accuracy, s.miou, *s.iou[~np.isnan(s.iou)]]:
        assert 0.0 <= value <= 100.0
    assert s.iou.shape == (n,) and s.histogram.shape == (n, n) and s.confusion.shape == (k, n)

    perm = np.array(rnd.sample(range(k), k))
    s2 = unsupervised_scores(perm[p], t, n, extra_clusters=e)
    # Hungarian may break ties differently, but the matched total (hence accuracy) is optimal
    assert s2.accuracy == pytest.approx(s.accuracy)
    # with the relabelled assignment every score is identical
    moved = np.empty_like(s.assignment)
    moved[perm] = s.assignment
    s3 = scores_from_confusion(s2.confusion, assignment=moved)
    assert (s3.accuracy, s3.miou) == pytest.approx((s.accuracy, s.miou))
    np.testing.assert_array_equal(s3.histogram, s.histogram)


@settings(max_examples=30, deadline=None)
@given(labels, st.lists(st.sampled_from([-1, 255, -7, 1000]), min_size=1, max_size=20))
def test_ignored_targets_have_no_effect(data, ignore):
    n, e, targets, rnd = data
    t = np.array(targets)
    p = np.array([rnd.randrange(n + e) for _ in t])
    extra_p = np.array([rnd.randrange(n + e) for _ in ignore])
    base = confusion_matrix(p, t, n, n + e)
    more = confusion_matrix(np.concatenate([p, extra_p]), np.concatenate([t, ignore]), n, n + e)
    np.testing.assert_array_equal(base, more)


def test_confusion_matrix_types_and_shapes():
    p = torch.tensor([[0, 1], [2, 1]])
    t = torch.tensor([[0, 1], [1, -1]], dtype=torch.uint8)  # uint8: -1 wraps to 255 = ignored
    c = confusion_matrix(p, t, 2, 3)
    assert isinstance(c, torch.Tensor) and c.dtype == torch.int64
    np.testing.assert_array_equal(c.numpy(), [[1, 0], [0, 1], [0, 1]])
    assert isinstance(confusion_matrix(p.numpy(), t.numpy(), 2, 3), np.ndarray)


def test_supervised_scores_use_identity():
    t = np.array([0, 1, 2, 2])
    assert supervised_scores(t, t, 3).accuracy == pytest.approx(100.0)
    s = supervised_scores((t + 1) % 3, t, 3)  # a permutation Hungarian would undo
    assert s.accuracy == 0.0 and s.miou == 0.0
    np.testing.assert_array_equal(s.assignment, [0, 1, 2])


# ---------------------------------------------------------------- the torchmetrics Metric


def _random_batches(seed: int, n: int, k: int, batches: int = 3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        t = torch.randint(-1, n, (2, 8, 8), generator=g)
        p = torch.where(torch.rand(2, 8, 8, generator=g) < 0.6, t.clamp(min=0) % k, 0)
        p = torch.where(
            torch.rand(2, 8, 8, generator=g) < 0.2, torch.randint(0, k, (2, 8, 8), generator=g), p
        )
        out.append((p, t))
    return out


@pytest.mark.parametrize("rule", ["strict", "original"])
def test_metric_accumulation_equals_one_call(rule):
    batches = _random_batches(0, 4, 6)
    metric = UnsupervisedMetrics(4, extra_clusters=2, rule=rule)
    for p, t in batches:
        metric.update(p, t)
    s = metric.scores()
    preds = torch.cat([p for p, _ in batches])
    targets = torch.cat([t for _, t in batches])
    ref = unsupervised_scores(preds, targets, 4, extra_clusters=2, rule=rule)
    assert isinstance(s, Scores)
    np.testing.assert_array_equal(s.confusion, ref.confusion)
    assert (s.accuracy, s.miou) == (ref.accuracy, ref.miou)
    out = metric.compute()
    assert set(out) == {"accuracy", "miou", "iou", "assignment"}
    assert float(out["miou"]) == pytest.approx(ref.miou)


def test_metric_state_is_summed_across_processes():
    a, b = _random_batches(1, 3, 3, batches=2)
    everything = UnsupervisedMetrics(3)
    for p, t in (a, b):
        everything.update(p, t)

    # merge_state: how torchmetrics combines metric objects
    m1, m2 = UnsupervisedMetrics(3), UnsupervisedMetrics(3)
    m1.update(*a)
    m2.update(*b)
    m1.merge_state(m2)
    assert torch.equal(m1.confusion, everything.confusion)

    # simulated 2-process all_gather: each rank sees [own state, other rank's state]
    other = UnsupervisedMetrics(3)
    other.update(*b)
    other_state = other.confusion.clone()
    rank0 = UnsupervisedMetrics(
        3,
        dist_sync_fn=lambda tensor, group=None: [tensor, other_state],
        distributed_available_fn=lambda: True,
    )
    rank0.update(*a)
    s = rank0.scores()
    np.testing.assert_array_equal(s.confusion, everything.confusion.numpy())
    assert s.accuracy == everything.scores().accuracy


def test_metric_linear_probe_identity():
    t = torch.tensor([[0, 1, 2, 2]])
    m = UnsupervisedMetrics(3, hungarian=False)
    m.update((t + 1) % 3, t)
    assert m.scores().accuracy == 0.0
    with pytest.raises(StegoError, match="extra_clusters=0"):
        UnsupervisedMetrics(3, extra_clusters=1, hungarian=False)


# ---------------------------------------------------------------- bad input


def test_errors_name_the_fix():
    t = np.zeros((2, 2), dtype=np.int64)
    with pytest.raises(StegoError, match="upsample"):
        unsupervised_scores(np.zeros((2, 3), dtype=np.int64), t, 2)
    with pytest.raises(StegoError, match="argmax"):
        unsupervised_scores(np.zeros((2, 2), dtype=np.float32), t, 2)
    with pytest.raises(StegoError, match="strict, original"):
        unsupervised_scores(t, t, 2, rule="loose")  # type: ignore[arg-type]
    with pytest.raises(StegoError, match="no pixel"):
        unsupervised_scores(t, np.full((2, 2), -1), 2)
    with pytest.raises(StegoError, match="assignment"):
        scores_from_confusion(np.ones((3, 2), dtype=np.int64), assignment=np.array([0, 5, -1]))
    with pytest.raises(StegoError, match="mapped"):
        map_clusters(np.array([0, 4]), np.array([1, 0]))


def test_iou_nan_for_absent_class():
    s = unsupervised_scores(np.array([0, 0, 1]), np.array([0, 0, 1]), 3)
    assert math.isnan(s.iou[2]) and s.miou == pytest.approx(100.0)
