"""Segmenter.predict: the cheap argmax must equal the argmax of the full-resolution maps."""

from __future__ import annotations

import pytest
import torch

from stego.errors import StegoError
from tests.test_prediction import tiny_segmenter


@pytest.mark.parametrize("size", [None, (23, 31)])
@pytest.mark.parametrize("flip", [False, True])
def test_labels_equal_argmax_of_forward(size, flip) -> None:
    model = tiny_segmenter(n_classes=5)
    images = torch.rand(3, 3, 37, 45, generator=torch.Generator().manual_seed(1))
    out = model(images, flip=flip, size=size)
    ids = model.predict_probes(images, flip=flip, size=size)
    expect_cluster = out.cluster_log_probs.argmax(1)
    expect_linear = out.linear_log_probs.argmax(1)
    assert ids["cluster"].shape == expect_cluster.shape
    # equal up to float ties of the upsampled scores: allow a handful of pixels at most
    assert (ids["cluster"] != expect_cluster).float().mean() < 1e-3
    assert (ids["linear"] != expect_linear).float().mean() < 1e-3
    assert torch.equal(model.predict(images, flip=flip, size=size), ids["cluster"])


def test_labels_first_maximum_on_ties_and_errors() -> None:
    model = tiny_segmenter()
    with torch.no_grad():
        model.cluster_probe.clusters[1] = model.cluster_probe.clusters[0]  # identical centroids
    ids = model.predict(torch.rand(1, 3, 16, 16))
    assert not bool((ids == 1).any())  # a tie goes to the lower id, as argmax does
    with pytest.raises(StegoError, match="linear probe"):
        model.predict(torch.rand(1, 3, 16, 16), probe="linear")
    with pytest.raises(StegoError, match="unknown probe"):
        model.predict(torch.rand(1, 3, 16, 16), probe="kmeans")


def test_deprecated_id_methods_warn_and_agree() -> None:
    model = tiny_segmenter()
    images = torch.rand(1, 3, 16, 16)
    with pytest.warns(DeprecationWarning, match="predict"):
        old = model.labels(images)
    with pytest.warns(DeprecationWarning, match="predict_probes"):
        old_all = model.labels_by_probe(images, probes=("cluster",))
    assert torch.equal(old, model.predict(images))
    assert torch.equal(old_all["cluster"], old)
