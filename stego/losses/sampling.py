"""Where the STEGO loss looks: random sample coordinates, bilinear reads, derangements.

Randomness is always injectable (``generator=``) so that tests and the original's recorded draws
can be replayed exactly. Shapes: ``B`` batch, ``C`` channels, ``H x W`` maps, ``S`` samples per
side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from stego.errors import StegoError

__all__ = [
    "DERANGEMENT_MODES",
    "bilinear_rows",
    "channels_last_table",
    "derangement",
    "read_rows",
    "sample_at",
    "sample_points",
    "sample_coords",
]

DERANGEMENT_MODES: tuple[str, ...] = ("true", "original")


def sample_coords(
    batch: int,
    n_samples: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniform sampling coordinates in [-1, 1): (B, S, S, 2), ``[..., 0]`` = x, ``[..., 1]`` = y.

    Drawn as ``torch.rand(...) * 2 - 1`` from ``generator`` (default: the global generator of
    ``device``). A CPU ``torch.Generator().manual_seed(s)`` gives the same numbers as
    ``torch.manual_seed(s)`` followed by ``torch.rand``, so the original's draws can be replayed.
    The draw happens on the generator's device and is then moved to ``device``.
    """
    if batch < 1 or n_samples < 1:
        raise StegoError(
            f"sample_coords needs batch >= 1 and n_samples >= 1, got {batch}, {n_samples}"
        )
    draw_device = generator.device if generator is not None else device
    coords = torch.rand((batch, n_samples, n_samples, 2), generator=generator, device=draw_device)
    coords = coords * 2 - 1
    return coords if device is None else coords.to(device)


def sample_at(t: Tensor, coords: Tensor) -> Tensor:
    """Bilinearly sample t (B, C, H, W) at coords (B, S1, S2, 2) -> (B, C, S2, S1).

    ``grid_sample`` with ``align_corners=True`` and border padding; as in the original, the two
    sample axes of ``coords`` are swapped first, so ``out[b, c, i, j]`` is read at
    ``coords[b, j, i]``.
    """
    if t.dim() != 4 or coords.dim() != 4 or coords.shape[-1] != 2:
        raise StegoError(
            f"sample_at expects t (B, C, H, W) and coords (B, S, S, 2), got {tuple(t.shape)} "
            f"and {tuple(coords.shape)}"
        )
    grid = coords.permute(0, 2, 1, 3).to(dtype=t.dtype)
    return F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=True)


def bilinear_rows(coords: Tensor, images: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Table rows and weights that read bilinear samples from a stack of flattened maps.

    coords (N, P, 2) in [-1, 1] (``[..., 0]`` = x, ``[..., 1]`` = y), images (N,) int64: group n
    reads map ``images[n]``. The rule is ``grid_sample``'s with ``align_corners=True`` and border
    padding. Returns rows (N*P, 4) int64 indexing a (B*H*W, C) table whose row
    ``b*H*W + y*W + x`` is pixel (y, x) of map b, and weights (N*P, 4), for :func:`read_rows`.
    """
    x = ((coords[..., 0] + 1) * (width - 1) / 2).clamp(0, width - 1)  # (N, P)
    y = ((coords[..., 1] + 1) * (height - 1) / 2).clamp(0, height - 1)
    x0, y0 = x.floor(), y.floor()
    wx, wy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=width - 1), (y0 + 1).clamp(max=height - 1)
    base = images.view(-1, 1).to(x0.device) * (height * width)
    top, bottom = base + y0 * width, base + y1 * width
    rows = torch.stack([top + x0, top + x1, bottom + x0, bottom + x1], dim=-1)
    weights = torch.stack([(1 - wx) * (1 - wy), wx * (1 - wy), (1 - wx) * wy, wx * wy], dim=-1)
    return rows.reshape(-1, 4), weights.reshape(-1, 4)


def read_rows(table: Tensor, rows: Tensor, weights: Tensor) -> Tensor:
    """Weighted sums of table rows: table (M, C), rows / weights (Q, 4) -> (Q, C).

    ``embedding_bag`` rather than ``grid_sample``: on a channels-last table one sample is four
    contiguous row reads, and each group may read a different map, so the negatives need no
    ``feat[perm]`` copies. On the 2-core development CPU this made the loss's sampling ~10x
    faster than ``grid_sample`` on (B, C, H, W) maps (docs/benchmarks.md); values are the same.
    Differentiable in ``table``.
    """
    return F.embedding_bag(rows, table, per_sample_weights=weights.to(table.dtype), mode="sum")


def channels_last_table(t: Tensor) -> Tensor:
    """t (B, C, H, W) -> its (B*H*W, C) table for :func:`read_rows` (row b*H*W + y*W + x)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def sample_points(coords: Tensor) -> Tensor:
    """coords (B, S1, S2, 2) -> (B, S2*S1, 2) in :func:`sample_at`'s output order: point
    ``i * S1 + j`` is ``coords[b, j, i]`` (the original's axis swap)."""
    return coords.permute(0, 2, 1, 3).reshape(coords.shape[0], -1, 2)


def derangement(
    n: int,
    *,
    generator: torch.Generator | None = None,
    mode: str = "true",
    device: torch.device | str | None = None,
) -> Tensor:
    """Indices (n,) int64 pairing each batch element i with another element ``out[i] != i``.

    - ``"true"`` (default): a genuine derangement, uniform over all permutations without fixed
      points (rejection sampling of ``randperm``; about e = 2.7 draws on average). Needs n >= 2.
    - ``"original"``: the original STEGO rule: ``randperm(n)``, then every fixed point i is replaced
      by ``(i + 1) mod n``. No element is paired with itself (for n >= 2), but the result is not
      always a permutation (e.g. ``[1, 3, 3, 1]``), so some images are used twice as negatives and
      others not at all. With the same generator state it replays the original's draws exactly.

    Draws from ``generator`` (on its device) or the global generator; result moved to ``device``.
    """
    if mode not in DERANGEMENT_MODES:
        raise StegoError(
            f"unknown derangement mode {mode!r}; valid modes: {', '.join(DERANGEMENT_MODES)}"
        )
    if n < 1 or (mode == "true" and n < 2):
        raise StegoError(
            f"a derangement of {n} element(s) is impossible: the random (negative) term needs a "
            "batch of at least 2 images; use a batch size >= 2"
        )
    draw_device = generator.device if generator is not None else device
    arange = torch.arange(n, device=draw_device)
    if mode == "original":
        perm = torch.randperm(n, generator=generator, device=draw_device)
        fixed = perm == arange
        perm = torch.where(fixed, (arange + 1) % n, perm)
    else:
        while True:
            perm = torch.randperm(n, generator=generator, device=draw_device)
            if not bool((perm == arange).any()):
                break
    return perm if device is None else perm.to(device)
