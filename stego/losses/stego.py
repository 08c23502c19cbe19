"""The STEGO correlation loss (reference section 4): pure tensor functions and a thin module.

Shapes: ``B`` batch, ``C`` feature channels, ``D`` code channels, ``H x W`` the maps handed to
:class:`StegoLoss`, ``S`` the number of samples per side (``n_samples``, 11 by default), so one
correlation term is a ``(B, S, S, S, S)`` map: axes 1, 2 index the anchor, axes 3, 4 the other map.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stego.errors import StegoError
from stego.losses.sampling import (
    DERANGEMENT_MODES,
    bilinear_rows,
    channels_last_table,
    derangement,
    read_rows,
    sample_coords,
    sample_points,
)

__all__ = [
    "SHIFT_KEYS",
    "TERMS",
    "CorrelationParts",
    "StegoLoss",
    "StegoLossOutput",
    "TermStats",
    "code_correlation",
    "correlation",
    "correlation_parts",
    "correlation_term",
    "feature_correlation",
    "normalize",
]

# The three terms, by the pair they compare: an image with itself, with a nearest neighbour, with
# a random other image. The config names their shifts/weights as the original code did.
TERMS: tuple[str, ...] = ("self", "knn", "random")
SHIFT_KEYS: dict[str, str] = {
    "self": "pos_intra_shift",
    "knn": "pos_inter_shift",
    "random": "neg_inter_shift",
}


# --------------------------------------------------------------------------- correlations
def normalize(t: Tensor, eps: float = 1e-10) -> Tensor:
    """L2-normalise ``t`` (B, C, h, w) over channels: ``t / max(||t||_2, eps)``, same shape."""
    return F.normalize(t, p=2.0, dim=1, eps=eps)


def _unit(t: Tensor, eps: float = 1e-10) -> Tensor:
    """:func:`normalize` over the last axis, for channels-last samples (..., C)."""
    return F.normalize(t, p=2.0, dim=-1, eps=eps)


def _unit_(t: Tensor, eps: float = 1e-10) -> Tensor:
    """In-place :func:`_unit` (no autograd): t (..., C) divided by max(||t||, eps); returns t."""
    return t.div_(torch.linalg.vector_norm(t, dim=-1, keepdim=True).clamp_min_(eps))


def correlation(a: Tensor, b: Tensor) -> Tensor:
    """Dense dot products of two maps: a (B, C, h, w), b (B, C, h', w') -> (B, h, w, h', w').

    ``out[n, y, x, i, j] = sum_c a[n, c, y, x] * b[n, c, i, j]`` (no normalisation here).
    """
    return torch.einsum("nchw,ncij->nhwij", a, b)


def feature_correlation(f1: Tensor, f2: Tensor, *, pointwise: bool = True) -> Tensor:
    """Feature correlation ``fd`` (B, h, w, h', w') of f1 (B, C, h, w) and f2 (B, C, h', w').

    Computed without gradient (the backbone is frozen). With ``pointwise`` ("spatial centering"),
    every anchor location is centred over the other map's locations, then the global mean of the
    uncentred correlation is restored: ``fd = F1 - mean_all(F1) + mean_all(F0)`` with
    ``F1 = F0 - mean_{i,j} F0`` (the tiny ``mean_all(F1)`` is subtracted as in the original).
    """
    with torch.no_grad():
        return _centre(correlation(normalize(f1), normalize(f2)), pointwise)


def _centre(fd: Tensor, pointwise: bool) -> Tensor:
    """The ``pointwise`` centring of :func:`feature_correlation` on fd (B, h, w, h', w')."""
    n, h, w, h2, w2 = fd.shape
    return _centre_draws(fd.reshape(n, h * w, 1, h2 * w2), pointwise).view(n, h, w, h2, w2)


def _centre_draws(fd: Tensor, pointwise: bool) -> Tensor:
    """The same centring of fd (B, P, G, Q), G draws of another map's Q points: each anchor point
    is centred over the Q points of each draw, and each draw's own global mean is restored."""
    if pointwise:
        old_mean = fd.mean(dim=(0, 1, 3), keepdim=True)
        fd = fd - fd.mean(dim=3, keepdim=True)
        fd = fd - fd.mean(dim=(0, 1, 3), keepdim=True) + old_mean
    return fd


def code_correlation(c1: Tensor, c2: Tensor) -> Tensor:
    """Cosine correlation ``cd`` (B, h, w, h', w') of codes c1 (B, D, h, w), c2 (B, D, h', w').

    Unclamped and differentiable.
    """
    return correlation(normalize(c1), normalize(c2))


class CorrelationParts(NamedTuple):
    """One correlation term with its ingredients, all (B, h, w, h', w')."""

    loss: Tensor  # -clamp(cd, lo, hi) * (fd - shift), unreduced
    fd: Tensor  # (centred) feature correlation, no gradient
    cd: Tensor  # unclamped code correlation, with gradient


def correlation_parts(
    f1: Tensor,
    f2: Tensor,
    c1: Tensor,
    c2: Tensor,
    shift: float,
    *,
    pointwise: bool = True,
    zero_clamp: bool = True,
    stabilize: bool = False,
) -> CorrelationParts:
    """Loss map, feature correlation and code correlation of one STEGO term.

    f1 (B, C, h, w), f2 (B, C, h', w'), c1 (B, D, h, w), c2 (B, D, h', w'); ``shift`` is the
    term's b. ``zero_clamp`` clamps cd at 0 from below (else at -9999); ``stabilize`` also clamps
    it at 0.8 from above. Returns :class:`CorrelationParts`, each (B, h, w, h', w').
    """
    fd = feature_correlation(f1, f2, pointwise=pointwise)
    cd = code_correlation(c1, c2)
    return CorrelationParts(loss=_term_loss(fd, cd, shift, zero_clamp, stabilize), fd=fd, cd=cd)


def _term_loss(fd: Tensor, cd: Tensor, shift: float, zero_clamp: bool, stabilize: bool) -> Tensor:
    """``-clamp(cd, lo, hi) * (fd - shift)`` elementwise (see :func:`correlation_parts`)."""
    lo = 0.0 if zero_clamp else -9999.0
    clamped = cd.clamp(lo, 0.8) if stabilize else cd.clamp(min=lo)
    return -clamped * (fd - shift)


def correlation_term(
    f1: Tensor,
    f2: Tensor,
    c1: Tensor,
    c2: Tensor,
    shift: float,
    *,
    pointwise: bool = True,
    zero_clamp: bool = True,
    stabilize: bool = False,
) -> Tensor:
    """Unreduced loss map (B, h, w, h', w') of one term: ``-clamp(cd, lo, hi) * (fd - shift)``.

    See :func:`correlation_parts` for the arguments; this returns only its ``loss``.
    """
    return correlation_parts(
        f1, f2, c1, c2, shift, pointwise=pointwise, zero_clamp=zero_clamp, stabilize=stabilize
    ).loss


# --------------------------------------------------------------------------- module
class TermStats(NamedTuple):
    """Diagnostics of one term, all detached 0-d tensors except ``fd_quantiles`` (Q,).

    Look at these to tune the shifts: a pair "attracts" (codes pulled together) when fd > shift.
    """

    fd_mean: Tensor  # mean of the (centred) feature correlation
    fd_quantiles: Tensor  # (Q,) quantiles of fd at StegoLoss.quantiles (subsampled); Q may be 0
    cd_mean: Tensor  # mean of the unclamped code correlation
    attract_fraction: Tensor  # fraction of pairs with fd > shift


class StegoLossOutput(NamedTuple):
    """Result of :class:`StegoLoss`: weighted total, the three term means, and diagnostics."""

    total: Tensor  # () weights[0]*self + weights[1]*knn + weights[2]*random
    self_term: Tensor  # () mean of the self (intra-image) loss map
    knn_term: Tensor  # () mean of the kNN (positive image) loss map
    random_term: Tensor  # () mean of the random (negative images) loss maps
    stats: dict[str, TermStats]  # keys "self", "knn", "random"


def _term_stats(parts: CorrelationParts, shift: float, levels: Tensor, max_elems: int) -> TermStats:
    """Cheap detached statistics of one term (strided subsample for the quantiles)."""
    fd = parts.fd.detach().reshape(-1)
    quantiles = fd.new_zeros(0)
    if levels.numel():  # a sort: ~2 ms per term on a CPU, so only on request
        step = max(1, math.ceil(fd.numel() / max_elems))
        sub = fd[::step].float()
        quantiles = torch.quantile(sub, levels.to(sub.device))
    return TermStats(
        fd_mean=fd.mean(),
        fd_quantiles=quantiles,
        cd_mean=parts.cd.detach().mean(),
        attract_fraction=(fd > shift).float().mean(),
    )


def _triple(name: str, value: tuple[float, float, float]) -> tuple[float, float, float]:
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise StegoError(f"{name} must have three entries (self, knn, random), got {value!r}")
    return values  # type: ignore[return-value]


class StegoLoss(nn.Module):
    """STEGO's three-term correlation loss on randomly sampled locations (reference section 4).

    ``shifts`` and ``weights`` are ordered (self, knn, random) -- in the original's names
    (pos_intra, pos_inter, neg_inter). Stateless: randomness comes from ``generator`` in
    :meth:`forward`, or recorded draws can be passed in.
    """

    def __init__(
        self,
        *,
        shifts: tuple[float, float, float],
        weights: tuple[float, float, float],
        n_samples: int = 11,
        neg_samples: int = 5,
        pointwise: bool = True,
        zero_clamp: bool = True,
        stabilize: bool = False,
        derangement: str = "true",
        quantiles: tuple[float, ...] = (),
        max_stat_elements: int = 1 << 16,
    ) -> None:
        super().__init__()
        self.shifts = _triple("shifts", shifts)
        self.weights = _triple("weights", weights)
        if n_samples < 1 or neg_samples < 1:
            raise StegoError(
                f"n_samples and neg_samples must be >= 1, got {n_samples}, {neg_samples}"
            )
        if derangement not in DERANGEMENT_MODES:
            raise StegoError(
                f"unknown derangement mode {derangement!r}; "
                f"valid modes: {', '.join(DERANGEMENT_MODES)}"
            )
        if any(not 0.0 <= q <= 1.0 for q in quantiles):
            raise StegoError(f"quantiles must be values in [0, 1], got {quantiles!r}")
        self.n_samples = int(n_samples)
        self.neg_samples = int(neg_samples)
        self.pointwise = bool(pointwise)
        self.zero_clamp = bool(zero_clamp)
        self.stabilize = bool(stabilize)
        self.derangement = derangement
        self.quantiles = tuple(float(q) for q in quantiles)
        self.max_stat_elements = int(max_stat_elements)

    def extra_repr(self) -> str:
        return (
            f"shifts={self.shifts}, weights={self.weights}, n_samples={self.n_samples}, "
            f"neg_samples={self.neg_samples}, pointwise={self.pointwise}, "
            f"zero_clamp={self.zero_clamp}, stabilize={self.stabilize}, "
            f"derangement={self.derangement!r}"
        )

    def _parts(self, f1: Tensor, f2: Tensor, c1: Tensor, c2: Tensor, b: float) -> CorrelationParts:
        """One term of unit-norm samples: f1 (B, P, C), c1 (B, P, D) against f2 (B, G*P, C),
        c2 (B, G*P, D) holding G draws of P points (G > 1 for the negatives).

        Parts (B, S, S, G*S, S): the G other maps are stacked on the first "other" axis; the
        centring's global mean is per draw, as when each draw is its own term.
        """
        s, n_points = self.n_samples, f1.shape[1]
        draws = f2.shape[1] // n_points
        with torch.no_grad():
            fd = torch.bmm(f1, f2.transpose(1, 2)).view(-1, n_points, draws, n_points)
            fd = _centre_draws(fd, self.pointwise).view(-1, s, s, draws * s, s)
        cd = torch.bmm(c1, c2.transpose(1, 2)).view(-1, s, s, draws * s, s)
        loss = _term_loss(fd, cd, b, self.zero_clamp, self.stabilize)
        return CorrelationParts(loss=loss, fd=fd, cd=cd)

    def forward(
        self,
        feat: Tensor,
        feat_pos: Tensor,
        code: Tensor,
        code_pos: Tensor,
        *,
        generator: torch.Generator | None = None,
        coords1: Tensor | None = None,
        coords2: Tensor | None = None,
        perms: Tensor | None = None,
    ) -> StegoLossOutput:
        """Loss of a batch. feat, feat_pos (B, C, H, W): frozen features of the images and of their
        nearest neighbours (they receive no gradient); code, code_pos (B, D, H, W): head outputs.

        Random draws, in the original's order: coords1 (B, S, S, 2) for the anchor, coords2
        (B, S, S, 2) for the neighbour and the negatives, then ``neg_samples`` derangements
        ``perms`` (NEG, B). Any of them may be given to replay recorded draws. Negatives are the
        anchor tensors ``feat[perm]``, ``code[perm]`` sampled at coords2, stacked on the batch axis.
        """
        if feat.dim() != 4 or code.dim() != 4:
            raise StegoError(
                "StegoLoss expects feat (B, C, H, W) and code (B, D, H, W), "
                f"got {tuple(feat.shape)} and {tuple(code.shape)}"
            )
        if feat_pos.shape != feat.shape or code_pos.shape != code.shape:
            raise StegoError(
                "feat_pos / code_pos must have the shapes of feat / code, got "
                f"{tuple(feat_pos.shape)} vs {tuple(feat.shape)} and "
                f"{tuple(code_pos.shape)} vs {tuple(code.shape)}"
            )
        batch, device, s = feat.shape[0], feat.device, self.n_samples
        if code.shape[0] != batch:
            raise StegoError(f"feat and code batch sizes differ: {batch} vs {code.shape[0]}")
        if coords1 is None:
            coords1 = sample_coords(batch, s, generator=generator, device=device)
        if coords2 is None:
            coords2 = sample_coords(batch, s, generator=generator, device=device)
        if perms is None:
            perms = torch.stack(
                [
                    derangement(batch, generator=generator, mode=self.derangement, device=device)
                    for _ in range(self.neg_samples)
                ]
            )
        coords1, coords2, perms = coords1.to(device), coords2.to(device), perms.to(device).long()
        if perms.dim() != 2 or perms.shape[1] != batch:
            raise StegoError(
                f"perms must have shape (neg_samples, {batch}), got {tuple(perms.shape)}"
            )

        h, w = feat.shape[2:]
        neg = perms.shape[0]
        own = torch.arange(batch, device=device)
        p1, p2 = sample_points(coords1), sample_points(coords2)  # (B, P, 2), P = S*S
        # The anchor reads its own map at coords1; negative k of slot i reads map perms[k, i] at
        # coords2[i]: one table read for both, rows ordered (slot, draw, point). The neighbour
        # reads its own map at coords2.
        n_points = p1.shape[1]
        neg_points = p2[:, None].expand(-1, neg, -1, -1).reshape(batch * neg, n_points, 2)
        rows, weights = bilinear_rows(
            torch.cat([p1, neg_points]), torch.cat([own, perms.t().reshape(-1)]), h, w
        )
        pos_rows, pos_weights = bilinear_rows(p2, own, h, w)

        def samples(t: Tensor, t_pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            """Unit-norm samples: anchor (B, P, C), negatives (B, NEG*P, C), neighbour (B, P, C).

            Without gradient (the features) they are normalised in place: no second copy of the
            largest tensor of the loss."""
            both = read_rows(channels_last_table(t), rows, weights)
            other = read_rows(channels_last_table(t_pos), pos_rows, pos_weights)
            if torch.is_grad_enabled():
                both, other = _unit(both), _unit(other)
            else:
                both, other = _unit_(both), _unit_(other)
            anchor, negatives = both.split([batch * n_points, batch * neg * n_points])
            return (
                anchor.view(batch, n_points, -1),
                negatives.view(batch, neg * n_points, -1),
                other.view(batch, n_points, -1),
            )

        with torch.no_grad():
            f_anchor, f_neg, f_pos = samples(feat, feat_pos)
        c_anchor, c_neg, c_pos = samples(code, code_pos)

        b_self, b_knn, b_rand = self.shifts
        parts = {
            "self": self._parts(f_anchor, f_anchor, c_anchor, c_anchor, b_self),
            "knn": self._parts(f_anchor, f_pos, c_anchor, c_pos, b_knn),
            # all draws in one term, (B, S, S, NEG*S, S); the mean equals the mean of the
            # original's per-draw terms concatenated on the batch axis
            "random": self._parts(f_anchor, f_neg, c_anchor, c_neg, b_rand),
        }
        self_term, knn_term, random_term = (parts[k].loss.mean() for k in TERMS)
        w_self, w_knn, w_rand = self.weights
        total = w_knn * knn_term + w_self * self_term + w_rand * random_term

        levels = torch.tensor(self.quantiles, dtype=torch.float32)
        stats = {
            key: _term_stats(parts[key], shift, levels, self.max_stat_elements)
            for key, shift in zip(TERMS, self.shifts, strict=True)
        }
        return StegoLossOutput(total, self_term, knn_term, random_term, stats)
