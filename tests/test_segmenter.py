"""Segmenter.predict: the cheap argmax must equal the argmax of the full-resolution maps."""

from __future__ import annotations

import pytest
import torch
from test_prediction import tiny_segmenter

from stego.errors import StegoError


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


@pytest.mark.parametrize("kind,n_classes", [("nonlinear", 5), ("linear", None), ("none", 5)])
def test_meta_from_state_reads_sizes_and_rebuilds_the_same_model(kind, n_classes) -> None:
    from stego.data import dataset_info
    from stego.models.backbone import build_backbone
    from stego.models.heads import SegmentationHead
    from stego.models.probes import ClusterProbe, LinearProbe
    from stego.models.segmenter import Segmenter, SegmenterMeta, build_segmenter

    backbone = build_backbone("tiny-vit", pretrained=False)
    torch.manual_seed(0)
    head = SegmentationHead(backbone.embed_dim, 8, kind=kind)
    dim = head.out_dim  # 8, or the backbone's 32 without a head
    linear = LinearProbe(dim, n_classes) if n_classes else None
    meta = SegmenterMeta("tiny-vit", None, kind, dim, 6, n_classes)
    original = Segmenter(backbone, head, ClusterProbe(dim, 6), linear, meta).eval()
    state = {k: v for k, v in original.state_dict().items() if not k.startswith("backbone.")}
    info = dataset_info("camvid")
    got = SegmenterMeta.from_state(state, backbone="tiny-vit", info=info, resolution=32)
    assert (got.head_kind, got.code_dim, got.n_clusters) == (kind, dim, 6)
    assert got.n_classes == (n_classes or 11)  # without a linear probe: CamVid's 11 classes
    assert got.dataset == "camvid" and got.class_names == list(info.class_names)
    assert got.palette == info.palette.tolist() and got.resolution == 32
    rebuilt = build_segmenter(got, state=state, backbone=backbone)
    assert (rebuilt.linear_probe is None) == (n_classes is None)
    images = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(2))
    expected, out = original(images), rebuilt(images)
    assert torch.equal(out.cluster_log_probs, expected.cluster_log_probs)
    if n_classes:
        assert torch.equal(out.linear_log_probs, expected.linear_log_probs)


def test_meta_from_state_needs_the_cluster_probe() -> None:
    from stego.models.segmenter import SegmenterMeta

    with pytest.raises(StegoError, match="cluster_probe.clusters"):
        SegmenterMeta.from_state({"head.linear.weight": torch.zeros(8, 32, 1, 1)}, backbone="x")
