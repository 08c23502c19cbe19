"""Pure pieces of the correspondence analysis (:mod:`stego.eval.analyze`): patch labels, pair
sampling, pair cosines, precision-recall statistics. Tensor functions, no files, no models.

A patch is named by its flat index over a split cut into a grid of ``h x w`` patches per image:
``image * (h * w) + row * w + col``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from stego.data import IGNORE
from stego.errors import StegoError

__all__ = [
    "PatchLabels",
    "PatchPairs",
    "PRStats",
    "pair_cosines",
    "patch_labels",
    "pr_stats",
    "sample_pairs",
]

_CURVE_POINTS = 512  # points kept per PR curve: enough for a figure, a few KB per setting


class PatchLabels(NamedTuple):
    label: Tensor  # (B, h, w) int64 majority class of each patch, IGNORE where dropped
    purity: Tensor  # (B, h, w) float32 share of the patch's pixels carrying its majority label


class PatchPairs(NamedTuple):
    """Pairs of patches; a patch is ``image * (h * w) + row * w + col`` (flat over the split)."""

    first: Tensor  # (P,) int64
    second: Tensor  # (P,) int64
    same: Tensor  # (P,) bool: both patches have the same class
    within: Tensor  # (P,) bool: both patches lie in the same image


class PRStats(NamedTuple):
    ap: float  # average precision (NaN when the pairs hold only one kind)
    precision: np.ndarray  # (T,) float, thinned to at most 512 points, recall decreasing
    recall: np.ndarray  # (T,) float


def patch_labels(labels: Tensor, patch: int, *, min_purity: float = 0.5) -> PatchLabels:
    """Majority label and purity of each ``patch`` x ``patch`` cell of labels (B, H, W) int64.

    H and W must be multiples of ``patch``. Ignored pixels (IGNORE = -1) count as a label of
    their own: a patch mostly unlabelled is dropped, and they lower the purity of the others.
    Ties go to the lower id, IGNORE first.
    """
    if labels.ndim != 3:
        raise StegoError(f"labels must be (B, H, W), got shape {tuple(labels.shape)}")
    B, H, W = labels.shape
    if H % patch or W % patch:
        raise StegoError(f"labels of {H}x{W} do not split into {patch}x{patch} patches")
    h, w = H // patch, W // patch
    slots = (labels.long() + 1).clamp(min=0)  # (B, H, W): 0 = IGNORE, k + 1 = class k
    n = int(slots.max()) + 1 if slots.numel() else 1
    cell = (torch.arange(H) // patch)[:, None] * w + (torch.arange(W) // patch)[None, :]  # (H, W)
    cell = cell.to(labels.device) + (torch.arange(B, device=labels.device) * h * w)[:, None, None]
    counts = torch.bincount((cell * n + slots).reshape(-1), minlength=B * h * w * n)
    top, arg = counts.reshape(B, h, w, n).max(dim=-1)  # first maximum: lower id on ties
    purity = top.float() / float(patch * patch)
    label = arg - 1
    label[(label < 0) | (purity < min_purity)] = IGNORE
    return PatchLabels(label, purity)


def _uniform(n: Tensor, generator: torch.Generator | None) -> Tensor:
    """One integer uniform in [0, n_i) for each entry of n (P,) int64 >= 1."""
    u = torch.rand(n.shape, generator=generator, dtype=torch.float64)
    return torch.minimum((u * n).long(), n - 1)


def sample_pairs(
    label: Tensor,
    n_pairs: int,
    *,
    within_fraction: float = 0.5,
    generator: torch.Generator | None = None,
) -> PatchPairs:
    """Draw ``n_pairs`` pairs of kept patches from patch labels (N, h, w) (IGNORE = dropped).

    ``round(n_pairs * within_fraction)`` pairs lie within one image (an image uniform among those
    with two kept patches, then two distinct kept patches uniform in it); the others across two
    different images (two distinct images uniform among those with a kept patch, one kept patch
    uniform in each). The same generator state gives the same pairs.
    """
    if n_pairs < 1:
        raise StegoError(f"n_pairs must be >= 1, got {n_pairs}")
    if not 0.0 <= within_fraction <= 1.0:
        raise StegoError(f"within_fraction must be in [0, 1], got {within_fraction}")
    flat = label.reshape(label.shape[0], -1).cpu()  # (N, h*w)
    counts = (flat >= 0).sum(dim=1)  # (N,) kept patches per image
    kept = torch.nonzero((flat >= 0).reshape(-1)).squeeze(1)  # (M,) grouped by image
    offsets = counts.cumsum(0) - counts  # (N,) where each image's kept patches start in `kept`
    n_within = int(round(n_pairs * within_fraction))
    n_across = n_pairs - n_within
    firsts, seconds = [], []
    if n_within:
        eligible = torch.nonzero(counts >= 2).squeeze(1)
        if len(eligible) == 0:
            raise StegoError("no image has two labelled patches; lower min_purity or add images")
        image = eligible[torch.randint(len(eligible), (n_within,), generator=generator)]
        c = counts[image]
        i = _uniform(c, generator)
        j = _uniform(c - 1, generator)
        j = j + (j >= i).long()  # distinct from i
        firsts.append(kept[offsets[image] + i])
        seconds.append(kept[offsets[image] + j])
    if n_across:
        eligible = torch.nonzero(counts >= 1).squeeze(1)
        if len(eligible) < 2:
            raise StegoError(
                "pairs across images need two images with labelled patches; add images, lower "
                "min_purity, or set within_fraction=1"
            )
        a = torch.randint(len(eligible), (n_across,), generator=generator)
        b = torch.randint(len(eligible) - 1, (n_across,), generator=generator)
        b = b + (b >= a).long()  # another image
        ia, ib = eligible[a], eligible[b]
        firsts.append(kept[offsets[ia] + _uniform(counts[ia], generator)])
        seconds.append(kept[offsets[ib] + _uniform(counts[ib], generator)])
    first, second = torch.cat(firsts), torch.cat(seconds)
    values = flat.reshape(-1)
    within = torch.arange(n_pairs) < n_within
    return PatchPairs(first, second, values[first] == values[second], within)


def pair_cosines(
    encoders: Sequence[Callable[[Tensor], Tensor]],
    batches: Iterable[Tensor],
    pairs: PatchPairs,
    *,
    chunk: int = 65536,
) -> list[Tensor]:
    """Cosine of each pair's two patches under each encoder: a list of (P,) float32 tensors.

    ``batches`` yields the split's images (B, 3, H, W) in order (the image index of a patch
    counts across batches); each encoder maps them to (B, C, h, w). Only the patches the pairs use
    are kept (normalised, on the CPU), so memory is bounded by the pair count.
    """
    needed = torch.unique(torch.cat([pairs.first, pairs.second]))  # (U,) sorted
    stores: list[Tensor | None] = [None] * len(encoders)
    start, grid = 0, None  # first image of the batch; patches per image
    for images in batches:
        n = images.shape[0]
        for k, encode in enumerate(encoders):
            feat = encode(images)  # (B, C, h, w)
            hw = feat.shape[-2] * feat.shape[-1]
            if grid not in (None, hw):
                raise StegoError(f"encoders disagree on the patch grid ({grid} vs {hw} patches)")
            grid = hw
            lo, hi = torch.searchsorted(needed, torch.tensor([start * hw, (start + n) * hw]))
            local = (needed[lo:hi] - start * hw).to(feat.device)
            rows = feat.flatten(2).transpose(1, 2).reshape(n * hw, -1)[local]  # (u, C)
            store = stores[k]
            if store is None:
                store = stores[k] = torch.zeros(len(needed), feat.shape[1])
            store[lo:hi] = F.normalize(rows.float(), dim=1).cpu()
        start += n
    if grid is None or start * grid <= int(needed[-1]):
        raise StegoError(f"the pairs reach patch {int(needed[-1])}, the images hold fewer")
    first = torch.searchsorted(needed, pairs.first)
    second = torch.searchsorted(needed, pairs.second)
    out = []
    for store in stores:
        assert store is not None
        cos = [
            (store[first[i : i + chunk]] * store[second[i : i + chunk]]).sum(1)
            for i in range(0, len(first), chunk)
        ]
        out.append(torch.cat(cos))
    return out


def pr_stats(scores: Tensor, same: Tensor) -> PRStats:
    """Average precision and precision-recall curve of ``scores`` (P,) predicting ``same`` (P,)."""
    from torchmetrics.functional.classification import (
        binary_average_precision,
        binary_precision_recall_curve,
    )

    target = same.long()
    if len(target) == 0 or bool(target.all()) or not bool(target.any()):
        return PRStats(float("nan"), np.zeros(0), np.zeros(0))
    scores = scores.double()
    ap = float(binary_average_precision(scores, target))
    precision, recall, _ = binary_precision_recall_curve(scores, target)
    keep = np.unique(np.linspace(0, len(precision) - 1, _CURVE_POINTS).round().astype(int))
    return PRStats(ap, precision.numpy()[keep], recall.numpy()[keep])
