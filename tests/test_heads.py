"""Tests of stego.models.heads against the original head (parity/heads.npz) and of its dropout
rules.

Tolerance: rtol=1e-5, atol=2e-6 on codes of magnitude up to 3 (384-channel 1x1 convs in float32;
observed max abs diff 1.1e-6).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stego.errors import StegoError
from stego.models.heads import (
    HEAD_KINDS,
    HeadOutput,
    SegmentationHead,
    channel_dropout,
    original_key_map,
)


def _original_state(d: dict) -> dict[str, torch.Tensor]:
    names = [
        "cluster1_weight",
        "cluster1_bias",
        "cluster2_0_weight",
        "cluster2_0_bias",
        "cluster2_2_weight",
        "cluster2_2_bias",
    ]
    # "cluster2_0_weight" -> "net.cluster2.0.weight", as in a STEGO checkpoint
    return {"net." + n.replace("_", "."): torch.from_numpy(d[n]) for n in names}


def _parity_head(d: dict, kind: str = "nonlinear") -> SegmentationHead:
    c, dim = d["cluster1_weight"].shape[1], d["cluster1_weight"].shape[0]
    head = SegmentationHead(c, dim, kind=kind)  # type: ignore[arg-type]
    state = original_key_map(_original_state(d), prefix="net.")
    if kind == "linear":
        state = {k: v for k, v in state.items() if k.startswith("linear.")}
    head.load_state_dict(state)
    return head.eval()


def test_nonlinear_head_matches_original(load_parity) -> None:
    d = load_parity("heads.npz")
    head = _parity_head(d)
    feats = torch.from_numpy(d["feats"])
    with torch.no_grad():
        out = head(feats)
        assert isinstance(out, HeadOutput)
        np.testing.assert_allclose(out.code.numpy(), d["code"], rtol=1e-5, atol=2e-6)
        np.testing.assert_allclose(
            head.linear(feats).numpy(), d["code_linear_part"], rtol=1e-5, atol=2e-6
        )
        np.testing.assert_allclose(
            head.nonlinear(feats).numpy(), d["code_nonlinear_part"], rtol=1e-5, atol=2e-6
        )
    assert torch.equal(out.feat_for_loss, feats)  # eval: dropout is the identity


def test_linear_head_matches_original_linear_part(load_parity) -> None:
    d = load_parity("heads.npz")
    head = _parity_head(d, "linear")
    with torch.no_grad():
        out = head(torch.from_numpy(d["feats"]))
    np.testing.assert_allclose(out.code.numpy(), d["code_linear_part"], rtol=1e-5, atol=2e-6)


def test_none_head_is_identity() -> None:
    head = SegmentationHead(6, 99, kind="none").train()
    assert head.out_dim == 6 and len(list(head.parameters())) == 0
    feat = torch.randn(2, 6, 3, 3)
    out = head(feat, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.code, feat)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_shapes_and_out_dim(kind: str) -> None:
    head = SegmentationHead(8, 5, kind=kind)  # type: ignore[arg-type]
    out = head(torch.randn(2, 8, 4, 3))
    assert out.code.shape == (2, head.out_dim, 4, 3)
    assert out.feat_for_loss.shape == (2, 8, 4, 3)
    assert head.out_dim == (8 if kind == "none" else 5)


def test_dropout_draws_three_independent_masks() -> None:
    """Train mode: linear branch, nonlinear branch and loss copy each get their own mask."""
    torch.manual_seed(0)
    head = SegmentationHead(64, 3, dropout=0.5).train()
    feat = torch.ones(1, 64, 2, 2)
    g = torch.Generator().manual_seed(1)
    out = head(feat, generator=g)
    # replay the three masks with the same generator
    g = torch.Generator().manual_seed(1)
    d1, d2, d3 = (channel_dropout(feat, 0.5, generator=g) for _ in range(3))
    assert not torch.equal(d1, d2) and not torch.equal(d2, d3) and not torch.equal(d1, d3)
    with torch.no_grad():
        expected = head.linear(d1) + head.nonlinear(d2)
    assert torch.allclose(out.code, expected, atol=1e-6)
    assert torch.equal(out.feat_for_loss, d3)
    # whole channels are dropped, kept ones scaled by 1 / (1 - p)
    assert set(d3.unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(d3.amin(dim=(2, 3)), d3.amax(dim=(2, 3)))


def test_eval_mode_and_zero_dropout_are_identity() -> None:
    feat = torch.randn(2, 8, 3, 3)
    head = SegmentationHead(8, 4, dropout=0.3).eval()
    a, b = head(feat), head(feat)
    assert torch.equal(a.code, b.code) and torch.equal(a.feat_for_loss, feat)
    head0 = SegmentationHead(8, 4, dropout=0.0).train()
    assert torch.equal(head0(feat).feat_for_loss, feat)
    assert torch.equal(head0(feat).code, head0(feat).code)


def test_errors() -> None:
    with pytest.raises(StegoError, match="valid kinds: nonlinear, linear, none"):
        SegmentationHead(8, 4, kind="mlp")  # type: ignore[arg-type]
    with pytest.raises(StegoError, match="dropout"):
        SegmentationHead(8, 4, dropout=1.0)
    with pytest.raises(StegoError, match=r"\(B, 8, h, w\)"):
        SegmentationHead(8, 4)(torch.randn(1, 7, 2, 2))


def test_memory_layout_does_not_change_the_result() -> None:
    """The training step hands the head channels-last features; codes, dropout masks and the
    loss copy are the same as for ordinary (B, C, h, w) tensors."""
    torch.manual_seed(0)
    head = SegmentationHead(16, 5, dropout=0.3).train()
    feat = torch.randn(2, 16, 3, 4)
    outs = [
        head(f, generator=torch.Generator().manual_seed(7))
        for f in (feat, feat.contiguous(memory_format=torch.channels_last))
    ]
    torch.testing.assert_close(outs[0].code, outs[1].code, rtol=1e-6, atol=1e-6)
    assert torch.equal(outs[0].feat_for_loss, outs[1].feat_for_loss)
