"""STEGO's segmentation head: features (B, C, h, w) -> codes (B, D, h, w) (reference s. 3)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from stego.errors import StegoError

__all__ = ["HEAD_KINDS", "HeadOutput", "SegmentationHead", "channel_dropout", "original_key_map"]

HEAD_KINDS: tuple[str, ...] = ("nonlinear", "linear", "none")


class HeadOutput(NamedTuple):
    """Output of :class:`SegmentationHead`."""

    code: Tensor  # (B, out_dim, h, w)
    feat_for_loss: Tensor  # (B, C, h, w): features for the loss (dropped copy in training)


def channel_dropout(x: Tensor, p: float, *, generator: torch.Generator | None = None) -> Tensor:
    """Dropout2d on x (B, C, h, w): zero whole channels with probability ``p``, scale the rest by
    1 / (1 - p). Same shape. Each call draws a fresh mask (from ``generator`` if given).
    """
    if p <= 0.0:
        return x
    if p >= 1.0:
        return torch.zeros_like(x)
    shape = (x.shape[0], x.shape[1], 1, 1)
    draw_device = generator.device if generator is not None else x.device
    keep = torch.rand(shape, generator=generator, device=draw_device).to(x.device) >= p
    return x * keep.to(x.dtype) / (1.0 - p)


def original_key_map(state_dict: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Rename the original STEGO head weights to this module's names.

    ``{prefix}cluster1.*`` -> ``linear.*`` and ``{prefix}cluster2.*`` -> ``nonlinear.*`` (the
    Sequential indices 0 and 2 are kept); other keys are dropped. Feed the result to
    ``SegmentationHead.load_state_dict``. For a STEGO checkpoint use ``prefix="net."``.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        if rest.startswith("cluster1."):
            out["linear." + rest[len("cluster1.") :]] = value
        elif rest.startswith("cluster2."):
            out["nonlinear." + rest[len("cluster2.") :]] = value
    return out


class SegmentationHead(nn.Module):
    """Maps features f (B, C, h, w) to codes (B, D, h, w).

    - ``"nonlinear"`` (default): ``code = linear(drop(f)) + nonlinear(drop(f))`` with
      ``linear`` = 1x1 conv C->D and ``nonlinear`` = 1x1 conv C->C, ReLU, 1x1 conv C->D.
    - ``"linear"``: ``code = linear(drop(f))``.
    - ``"none"``: ``code = f`` (raw-feature baseline); ``code_dim`` is ignored and ``out_dim`` is
      ``in_dim``; there are no parameters.

    ``drop`` is channel dropout (Dropout2d, p = ``dropout``) with an independent mask for each
    branch. In training mode with ``dropout > 0`` the features handed to the loss are a third,
    independently dropped copy of f; in eval mode all dropout is the identity.
    Original weight names: ``cluster1`` = ``linear``, ``cluster2`` = ``nonlinear`` (see
    :func:`original_key_map`).
    """

    def __init__(
        self, in_dim: int, code_dim: int, kind: str = "nonlinear", dropout: float = 0.1
    ) -> None:
        super().__init__()
        if kind not in HEAD_KINDS:
            raise StegoError(f"unknown head kind {kind!r}; valid kinds: {', '.join(HEAD_KINDS)}")
        if in_dim < 1 or (kind != "none" and code_dim < 1):
            raise StegoError(f"in_dim and code_dim must be positive, got {in_dim} and {code_dim}")
        if not 0.0 <= dropout < 1.0:
            raise StegoError(f"dropout must be in [0, 1), got {dropout}")
        self.in_dim = int(in_dim)
        self.kind = kind
        self.dropout = float(dropout)
        self.out_dim = self.in_dim if kind == "none" else int(code_dim)
        self.linear: nn.Conv2d | None = None
        self.nonlinear: nn.Sequential | None = None
        if kind in ("linear", "nonlinear"):
            self.linear = nn.Conv2d(in_dim, code_dim, kernel_size=1)
        if kind == "nonlinear":
            self.nonlinear = nn.Sequential(
                nn.Conv2d(in_dim, in_dim, kernel_size=1),
                nn.ReLU(),
                nn.Conv2d(in_dim, code_dim, kernel_size=1),
            )

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, in_dim={self.in_dim}, out_dim={self.out_dim}, "
            f"dropout={self.dropout}"
        )

    def _drop(self, feat: Tensor, generator: torch.Generator | None) -> Tensor:
        if not self.training or self.dropout == 0.0:
            return feat
        return channel_dropout(feat, self.dropout, generator=generator)

    def forward(self, feat: Tensor, *, generator: torch.Generator | None = None) -> HeadOutput:
        """feat (B, C, h, w) -> HeadOutput(code (B, out_dim, h, w), feat_for_loss (B, C, h, w)).

        ``generator`` (optional) drives the dropout masks, drawn in the order: linear branch,
        nonlinear branch, loss copy.
        """
        if feat.dim() != 4 or feat.shape[1] != self.in_dim:
            raise StegoError(
                f"SegmentationHead expects features (B, {self.in_dim}, h, w), "
                f"got {tuple(feat.shape)}"
            )
        if self.linear is None:
            code = feat
        else:
            code = self.linear(self._drop(feat, generator))  # (B, D, h, w)
            if self.nonlinear is not None:
                code = code + self.nonlinear(self._drop(feat, generator))
        return HeadOutput(code=code, feat_for_loss=self._drop(feat, generator))
