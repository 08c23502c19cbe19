"""CAUSE segmentation heads (Kim et al., arXiv 2310.07379): an MLP head and a transformer head.

Shapes: ``B`` batch, ``N = h * w`` patches in row-major order, ``C`` backbone channels, ``D``
head output channels, ``K`` concepts. The heads work on patch rows (B, N, C); ``forward_map``
wraps them for feature maps (B, C, h, w). Both read the original checkpoints through
:func:`load_original_state_dict` (1x1 convolutions become linear layers).
:class:`CauseCodeHead` gives either the interface of STEGO's head, so the segmenter, the trainer's
probes and the ONNX export use a CAUSE model unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stego.errors import StegoError
from stego.models.heads import HeadOutput

__all__ = [
    "CAUSE_HEAD_KINDS",
    "CauseCodeHead",
    "CauseMLPHead",
    "CauseTRHead",
    "load_original_state_dict",
    "original_key_map",
]

CAUSE_HEAD_KINDS: tuple[str, ...] = ("mlp", "tr")


class _Projection(nn.Module):
    """``linear(x) + nonlinear(x)``, nonlinear = Linear(C, C), ReLU, Linear(C, D): (..., C) ->
    (..., D). In training each branch sees its own dropout of the input, as in the original."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.nonlinear = nn.Sequential(
            nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Linear(in_dim, out_dim)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.dropout(x)) + self.nonlinear(self.dropout(x))


def _to_rows(feat: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """(B, C, h, w) -> ((B, h*w, C), (h, w))."""
    if feat.dim() != 4:
        raise StegoError(f"feature maps must have shape (B, C, h, w), got {tuple(feat.shape)}")
    b, c, h, w = feat.shape
    return feat.flatten(2).transpose(1, 2), (h, w)


def _to_map(rows: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, h*w, D) -> (B, D, h, w)."""
    return rows.transpose(1, 2).reshape(rows.shape[0], rows.shape[2], *grid)


class CauseMLPHead(_Projection):
    """CAUSE-MLP head: feats (B, N, C) -> (B, N, out_dim), a linear map plus a two-layer MLP.

    ``dropout`` (0.1 in CAUSE) drops input features in training mode, separately per branch.
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.1) -> None:
        super().__init__(in_dim, out_dim, dropout)

    def forward_map(self, feat: Tensor) -> Tensor:
        """feat (B, C, h, w) -> (B, out_dim, h, w)."""
        rows, grid = _to_rows(feat)
        return _to_map(self(rows), grid)


class CauseTRHead(nn.Module):
    """CAUSE-TR head: one transformer decoder layer whose queries are the patches' concepts.

    forward(feats (B, N, C), concepts (K, C)) -> (B, N, out_dim). Post-norm, one head:

    - queries ``t`` = the nearest concept vector of each patch (cosine), ``pos`` a learnt
      positional embedding added to queries and self-attention keys (not values nor memory);
    - ``t = norm1(t + self_attn(t + pos, t + pos, t))``;
      ``t = norm2(t + cross_attn(t + pos, feats, feats))``;
      ``t = feats + norm3(t + ffn(t))`` with ffn = Linear(C, hidden), ReLU, Linear(hidden, C);
    - then the MLP head's projection (linear + two-layer branch).

    nn.TransformerDecoderLayer cannot express this (it uses one tensor as self-attention query, key
    and value, has no positional term and no residual to the memory), so the layer is written
    out with nn.MultiheadAttention (batch_first; same parameters as the original's seq-first
    modules). ``dropout`` (0.1) acts, in training only, in both attentions, after each sublayer,
    inside the ffn and on the projection's input.

    The embedding has ``n_positions`` rows, a square grid of side sqrt(n_positions) (CAUSE: the
    training crop's patch grid). Another grid ``(h, w)`` gets the embedding resized bicubically
    (align_corners=False) as a (C, side, side) image; the grid is taken as square unless given.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        n_positions: int,
        hidden_dim: int = 2048,
        n_heads: int = 1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        side = math.isqrt(n_positions)
        if side * side != n_positions:
            raise StegoError(
                f"n_positions must be a square number (a side x side patch grid), got {n_positions}"
            )
        self.side = side
        self.query_pos = nn.Parameter(torch.randn(n_positions, in_dim))
        self.self_attn = nn.MultiheadAttention(in_dim, n_heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(in_dim, n_heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, in_dim),
        )
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(in_dim) for _ in range(3))
        self.drop1, self.drop2, self.drop3 = (nn.Dropout(dropout) for _ in range(3))
        self.proj = _Projection(in_dim, out_dim, dropout)

    def positions(self, grid: tuple[int, int]) -> Tensor:
        """The positional embedding for an h x w grid: (h*w, C)."""
        if grid == (self.side, self.side):
            return self.query_pos
        image = self.query_pos.T.reshape(1, -1, self.side, self.side)  # (1, C, side, side)
        image = F.interpolate(image, size=grid, mode="bicubic", align_corners=False)
        return image.reshape(image.shape[1], -1).T  # (h*w, C)

    def forward(
        self, feats: Tensor, concepts: Tensor, *, grid: tuple[int, int] | None = None
    ) -> Tensor:
        """feats (B, N, C), concepts (K, C) -> (B, N, out_dim); ``grid`` = (h, w), h*w = N."""
        if feats.dim() != 3:
            raise StegoError(f"feats must have shape (B, N, C), got {tuple(feats.shape)}")
        n = feats.shape[1]
        if grid is None:
            side = math.isqrt(n)
            if side * side != n:
                raise StegoError(f"{n} patches do not form a square grid; pass grid=(h, w)")
            grid = (side, side)
        elif grid[0] * grid[1] != n:
            raise StegoError(f"grid {grid} does not hold {n} patches; pass grid=(h, w), h*w={n}")
        pos = self.positions((int(grid[0]), int(grid[1]))).unsqueeze(0)  # (1, N, C)
        cos = F.normalize(feats, dim=-1) @ F.normalize(concepts, dim=-1).T  # (B, N, K)
        t = concepts[cos.argmax(dim=-1)]  # (B, N, C): nearest concept, first on ties
        qk = t + pos
        t = self.norm1(t + self.drop1(self.self_attn(qk, qk, t, need_weights=False)[0]))
        t = self.norm2(
            t + self.drop2(self.cross_attn(t + pos, feats, feats, need_weights=False)[0])
        )
        t = feats + self.norm3(t + self.drop3(self.ffn(t)))
        return self.proj(t)

    def forward_map(self, feat: Tensor, concepts: Tensor) -> Tensor:
        """feat (B, C, h, w), concepts (K, C) -> (B, out_dim, h, w)."""
        rows, grid = _to_rows(feat)
        return _to_map(self(rows, concepts, grid=grid), grid)


class CauseCodeHead(nn.Module):
    """A CAUSE head with the interface of :class:`stego.models.heads.SegmentationHead`.

    forward(feat (B, C, h, w)) -> HeadOutput(code (B, D, h, w), feat_for_loss = feat). ``kind``
    "mlp" wraps :class:`CauseMLPHead`; "tr" wraps :class:`CauseTRHead` (``n_positions`` = the
    training grid's h * w) and keeps the clusterbook as the buffer ``concepts`` (K, C), which
    its queries need at inference. Dropout (training mode only) draws from the global RNG:
    callers that need exact replays seed it around the call.
    """

    def __init__(
        self,
        kind: str,
        in_dim: int,
        code_dim: int,
        *,
        n_concepts: int | None = None,
        n_positions: int | None = None,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if kind not in CAUSE_HEAD_KINDS:
            raise StegoError(f"unknown CAUSE head kind {kind!r}; use 'mlp' or 'tr'")
        self.kind, self.in_dim, self.out_dim = kind, int(in_dim), int(code_dim)
        self.net: nn.Module
        if kind == "mlp":
            self.net = CauseMLPHead(in_dim, code_dim, dropout)
            return
        if not n_concepts or not n_positions:
            raise StegoError("a CAUSE TR head needs n_concepts and n_positions")
        self.net = CauseTRHead(in_dim, code_dim, n_positions, dropout=dropout)
        self.register_buffer("concepts", torch.zeros(n_concepts, in_dim))

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, in_dim={self.in_dim}, out_dim={self.out_dim}"

    def rows(self, x: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """Patch rows x (B, N, C) -> (B, N, D); ``grid`` (h, w) for the TR head's positions."""
        if self.kind == "mlp":
            return self.net(x)
        return self.net(x, self.concepts, grid=grid)

    def forward(self, feat: Tensor, *, generator: torch.Generator | None = None) -> HeadOutput:
        """feat (B, C, h, w) -> HeadOutput(code (B, D, h, w), feat_for_loss = feat).

        ``generator`` is accepted for the SegmentationHead interface and not used.
        """
        if feat.dim() != 4 or feat.shape[1] != self.in_dim:
            raise StegoError(
                f"CauseCodeHead expects features (B, {self.in_dim}, h, w), got {tuple(feat.shape)}"
            )
        rows, grid = _to_rows(feat)
        return HeadOutput(code=_to_map(self.rows(rows, grid), grid), feat_for_loss=feat)


# --------------------------------------------------------------------------- original weights
def original_key_map(kind: str) -> dict[str, str]:
    """Original state_dict key prefix -> ours, for ``kind`` "mlp" (HeadSegment) or "tr" (the
    Decoder, whose layer sits under ``tr.``). Keys not listed keep their name."""
    proj = {"f1.": "linear.", "f2.0.": "nonlinear.0.", "f2.2.": "nonlinear.2."}
    if kind == "mlp":
        return proj
    if kind == "tr":
        layer = {
            "tr.self_attn.": "self_attn.",
            "tr.multihead_attn.": "cross_attn.",
            "tr.linear1.": "ffn.0.",
            "tr.linear2.": "ffn.3.",
            "tr.norm1.": "norm1.",
            "tr.norm2.": "norm2.",
            "tr.norm3.": "norm3.",
        }
        return {**layer, **{f"tr.{k}": f"proj.{v}" for k, v in proj.items()}}
    raise StegoError(f"unknown CAUSE head kind {kind!r}; use 'mlp' or 'tr'")


def load_original_state_dict(head: CauseMLPHead | CauseTRHead, state: dict[str, Tensor]) -> None:
    """Load an original CAUSE head state_dict (``HeadSegment`` or ``Decoder``) into ``head``.

    1x1 convolution weights (D, C, 1, 1) become linear weights (D, C). Missing or unexpected keys
    raise :class:`StegoError` naming them.
    """
    mapping = original_key_map("tr" if isinstance(head, CauseTRHead) else "mlp")
    ours: dict[str, Tensor] = {}
    for key, value in state.items():
        new = next((v + key[len(k) :] for k, v in mapping.items() if key.startswith(k)), key)
        if value.dim() == 4 and value.shape[2:] == (1, 1):
            value = value.flatten(1)
        ours[new] = value
    try:
        result = head.load_state_dict(ours, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise StegoError(f"CAUSE {type(head).__name__} weights do not fit: {err}") from err
    if result.missing_keys or result.unexpected_keys:
        raise StegoError(
            f"not a CAUSE {type(head).__name__} state_dict: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
