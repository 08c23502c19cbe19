"""stego.infer.crf: parity with the original dense_crf, batch execution that cannot hang, bad
input."""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import time

import numpy as np
import pytest
import torch

from stego.errors import StegoError
from stego.infer.crf import (
    CRFParams,
    _run_pool,
    dense_crf,
    dense_crf_batch,
    dense_crf_labels,
    image_to_uint8,
    images_to_uint8_original,
    unary_energy,
    upsample_probs,
)

needs_crf = pytest.mark.skipif(
    importlib.util.find_spec("pydensecrf") is None, reason="pip install 'stego-seg[crf]'"
)


@pytest.fixture(scope="module")
def ref(load_parity):
    return load_parity("crf.npz")


def test_upsample_and_unary_match_original(ref):
    probs = upsample_probs(ref["logits"], ref["image_uint8_rgb"].shape[:2])
    assert probs.dtype == np.float32 and probs.shape == (5, 64, 64)
    np.testing.assert_allclose(probs, ref["probs_upsampled"], atol=1e-6)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    unary = unary_energy(probs, float(ref["unary_clip"]))
    assert unary.dtype == np.float32 and unary.flags.c_contiguous
    np.testing.assert_allclose(unary, ref["unary"], atol=1e-5)
    # a batched tensor input gives the same
    batched = upsample_probs(torch.from_numpy(ref["logits"])[None], (64, 64))
    np.testing.assert_allclose(batched[0], probs, atol=1e-7)


@needs_crf
def test_dense_crf_matches_original(ref):
    image = ref["image_uint8_rgb"]
    np.testing.assert_array_equal(image[:, :, ::-1], ref["crf_image_bgr_uint8"])
    p = ref["params"]
    params = CRFParams(
        iterations=int(p[0]),
        gaussian_compat=p[1],
        gaussian_sxy=p[2],
        bilateral_compat=p[3],
        bilateral_sxy=p[4],
        bilateral_srgb=p[5],
    )
    assert params == CRFParams()  # our defaults are the original's settings
    q = dense_crf(image, torch.from_numpy(ref["probs_upsampled"]))
    assert q.dtype == np.float32 and q.shape == ref["Q"].shape
    np.testing.assert_allclose(q, ref["Q"], atol=1e-5)
    np.testing.assert_array_equal(q.argmax(0), ref["argmax"])
    labels = dense_crf_labels(image, ref["probs_upsampled"])
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, ref["argmax"])


@needs_crf
def test_channel_order_matters(ref):
    """The lattice is not channel-permutation invariant: RGB input gives a different Q."""
    q_rgb = dense_crf(ref["image_uint8_rgb"], ref["probs_upsampled"], CRFParams(bgr=False))
    assert np.abs(q_rgb - ref["Q"]).max() > 1e-2


def test_image_to_uint8(ref):
    mean = ref["imagenet_mean"][:, None, None]
    std = ref["imagenet_std"][:, None, None]
    unit = ref["image"] * std + mean  # (3, H, W) in [0, 1]
    np.testing.assert_array_equal(image_to_uint8(unit), ref["image_uint8_rgb"])


def test_original_crf_picture_truncates_after_the_normalisation_round_trip():
    # The original's chain, as torch ops: ToTensor (bytes / 255), Normalize (sub_/div_ by
    # float32 tensors), its UnNormalize (per channel t.mul_(std).add_(mean), python floats),
    # then to_pil_image: x.mul(255).byte().
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    stored = torch.arange(256, dtype=torch.uint8).repeat(3, 2, 1)  # every byte, (3, 2, 256)
    x = stored.float().div(255)
    t = x.clone().sub_(torch.tensor(mean).view(3, 1, 1)).div_(torch.tensor(std).view(3, 1, 1))
    for channel, m, s in zip(t, mean, std, strict=True):
        channel.mul_(s).add_(m)
    expected = t.mul(255).byte().permute(1, 2, 0).numpy()  # (2, 256, 3)
    got = images_to_uint8_original(x[None])
    assert got.shape == (1, 2, 256, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[0], expected)
    # the round trip lowers many stored bytes by one; rounding would give them back
    hwc = stored.permute(1, 2, 0).numpy()
    lowered = hwc != got[0]
    assert lowered.sum() > 100
    assert (hwc[lowered] - 1 == got[0][lowered]).all()
    with pytest.raises(StegoError, match=r"\(B, 3, H, W\)"):
        images_to_uint8_original(x)


def test_bad_input_names_the_fix(ref, monkeypatch):
    image, probs = ref["image_uint8_rgb"], ref["probs_upsampled"]
    with pytest.raises(StegoError, match="image_to_uint8"):
        dense_crf(image.astype(np.float32), probs)
    with pytest.raises(StegoError, match="upsample_probs"):
        dense_crf(image, ref["logits"])
    with pytest.raises(StegoError, match="not labels"):
        dense_crf(image, probs.argmax(0)[None])
    with pytest.raises(StegoError, match="NaN"):
        dense_crf(image, np.full_like(probs, np.nan))
    with pytest.raises(StegoError, match="iterations"):
        CRFParams(iterations=-1)
    with pytest.raises(StegoError, match="2 images but 1"):
        dense_crf_batch([image, image], [probs])
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    with pytest.raises(StegoError, match=r"pip install 'stego-seg\[crf\]'"):
        dense_crf(image, probs)


def _small_batch(ref, n: int = 4):
    rng = np.random.default_rng(0)
    images, probs = [], []
    for i in range(n):
        images.append(np.ascontiguousarray(np.rot90(ref["image_uint8_rgb"], i)))
        logits = ref["logits"] + rng.normal(0, 0.5, ref["logits"].shape).astype(np.float32)
        probs.append(upsample_probs(logits, (64, 64)))
    return images, probs


@needs_crf
def test_batch_parallel_equals_serial(ref):
    images, probs = _small_batch(ref)
    serial = dense_crf_batch(images, probs, workers=1)
    parallel = dense_crf_batch(images, probs, workers=2, timeout=120)
    assert len(parallel) == len(images)
    for s, p in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(s, p)
    np.testing.assert_array_equal(serial[1], dense_crf(images[1], probs[1]))


@needs_crf
def test_batch_worker_error_names_the_image(ref):
    images, probs = _small_batch(ref, 3)
    probs[2] = probs[2][:, :32]  # wrong size: fails inside the worker
    for workers in (2, 1):
        with pytest.raises(StegoError, match="image 2"):
            dense_crf_batch(images, probs, workers=workers, timeout=120)


def test_pool_cannot_hang():
    start = time.monotonic()
    with pytest.raises(StegoError, match="within 1"):
        _run_pool(time.sleep, [(60,), (60,)], workers=2, timeout=1.0, what="sleep")
    with pytest.raises(StegoError, match="crashed"):
        _run_pool(os._exit, [(3,)], workers=2, timeout=60, what="exit")
    with pytest.raises(StegoError, match="image 1: ValueError"):
        _run_pool(math.sqrt, [(4.0,), (-1.0,)], workers=2, timeout=60, what="sqrt")
    assert _run_pool(math.sqrt, [(4.0,), (9.0,), (1.0,)], workers=2, timeout=60, what="sqrt") == [
        2.0,
        3.0,
        1.0,
    ]
    assert time.monotonic() - start < 30


def test_pool_is_kept_between_calls_and_replaced_after_a_crash():
    first = set(_run_pool(_slow_pid, [(0.3,)] * 4, workers=2, timeout=60, what="pid"))
    again = set(_run_pool(_slow_pid, [(0.3,)] * 4, workers=2, timeout=60, what="pid"))
    assert first == again and len(first) == 2  # the same two processes served both calls
    with pytest.raises(StegoError, match="crashed"):
        _run_pool(os._exit, [(3,)], workers=2, timeout=60, what="exit")
    fresh = set(_run_pool(_slow_pid, [(0.3,)] * 4, workers=2, timeout=60, what="pid"))
    assert fresh and not fresh & first


def _slow_pid(seconds: float) -> int:
    time.sleep(seconds)  # keeps one worker busy so the other takes the next task
    return os.getpid()
