"""CAUSE losses (Kim et al., arXiv 2310.07379) as pure tensor functions, plus the concept bank.

Shapes: ``B`` batch, ``N`` patches per image (a row-major ``h x w`` grid), ``C`` backbone feature
channels, ``K`` concepts (the clusterbook), ``E`` projection channels, ``D`` head channels,
``n`` centroids, ``M`` bank rows. Everything is channels-last: patches are rows.

CAUSE trains in two steps. First the concepts (K, C) are fitted to frozen backbone features by
maximising a soft modularity (:func:`modularity_loss`); then a head is trained with a contrastive
loss whose positives and negatives are decided by the concepts the patches fall into
(:func:`concept_contrastive_loss`), with a FIFO bank of teacher projections per concept
(:class:`ConceptBank`). :func:`centroid_assign` is the cluster probe run on the head's output.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from stego.errors import StegoError

__all__ = [
    "cell_window",
    "BankRows",
    "CentroidAssignment",
    "ConceptBank",
    "NearestConcept",
    "centroid_assign",
    "concept_contrastive_loss",
    "grid_subsample",
    "modularity_loss",
    "nearest_concept",
]


def _unit(t: Tensor) -> Tensor:
    """L2-normalise the last axis (eps 1e-12, as F.normalize): same shape."""
    return F.normalize(t, p=2.0, dim=-1)


def _check_rank(name: str, t: Tensor, rank: int, shape: str) -> None:
    if t.dim() != rank:
        raise StegoError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


# --------------------------------------------------------------------------- modularity
def modularity_loss(
    concepts: Tensor, feats: Tensor, temperature: float = 0.1, *, chunk: int = 16
) -> Tensor:
    """Negative soft modularity of the patch graph under a concept assignment; a scalar ().

    concepts (K, C), feats (B, N, C). Per image: the graph ``A = clamp(cos(feats, feats), 0)``
    without self loops, degrees ``d`` (row sums), total weight ``e``, modularity matrix
    ``W = A - d d^T / e``; the soft assignment ``S = clamp(cos(feats, concepts), 0)`` (N, K) and
    the "same concept" matrix ``delta[p, q] = max_k tanh(S[p, k] S[q, k] / temperature)``. The loss
    is ``-mean_b trace((W / e) @ delta)`` = ``-mean_b sum(W * delta) / e`` (delta is symmetric).

    ``feats`` are detached: this loss fits the concepts only. Since tanh is increasing and
    temperature > 0, the max is taken over the products before the tanh, as a running max over
    ``chunk`` concepts at a time: memory O(B N^2 chunk) instead of the O(B N^2 K) of forming every
    product at once; compute O(B N^2 (K + C)). For N = 1600 (40 x 40 patches), B = 8, chunk = 16
    that is 1.3 GB of float32 products; lower ``chunk`` or subsample patches
    (:func:`grid_subsample`) when that is too much.
    """
    _check_rank("concepts", concepts, 2, "(K, C)")
    _check_rank("feats", feats, 3, "(B, N, C)")
    if temperature <= 0:
        raise StegoError(f"modularity temperature must be > 0, got {temperature}")
    x = _unit(feats.detach())  # (B, N, C)
    adj = (x @ x.transpose(1, 2)).clamp_min(0)  # (B, N, N)
    adj = adj * (1 - torch.eye(adj.shape[1], dtype=adj.dtype, device=adj.device))
    deg = adj.sum(dim=2, keepdim=True)  # (B, N, 1)
    total = deg.sum(dim=1, keepdim=True)  # (B, 1, 1)
    modularity = adj - deg @ deg.transpose(1, 2) / total  # (B, N, N)

    assign = (x @ _unit(concepts).T).clamp_min(0)  # (B, N, K)
    best = torch.zeros_like(adj)  # (B, N, N): max over concepts of S[p, k] S[q, k] (all >= 0)
    for start in range(0, assign.shape[2], chunk):
        s = assign[:, :, start : start + chunk].transpose(1, 2)  # (B, k, N)
        best = torch.maximum(best, (s.unsqueeze(3) * s.unsqueeze(2)).amax(dim=1))
    delta = torch.tanh(best / temperature)  # (B, N, N)
    trace = (modularity * delta).sum(dim=(1, 2)) / total.view(-1)  # (B,)
    return -trace.mean()


# --------------------------------------------------------------------------- grid sampling
def grid_subsample(
    feats: Tensor,
    order: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    grid: tuple[int, int] | None = None,
    cell: int = 4,
) -> Tensor:
    """One patch per ``cell x cell`` block of the patch grid: feats (B, N, C) -> (B, N / cell^2, C).

    The grid is ``grid = (h, w)`` (square by default), row-major; blocks are taken in row-major
    order per image, image after image, and ``order`` (B * blocks,) int64 in [0, cell^2) says which
    patch of each block to keep (row-major inside the block). Without ``order`` one is drawn
    uniformly from ``generator``; pass the same ``order`` to subsample several maps alike (features,
    student and teacher projections). h and w must be multiples of ``cell``.
    """
    _check_rank("feats", feats, 3, "(B, N, C)")
    b, n, c = feats.shape
    h, w = _grid_shape(n, grid)
    if h % cell or w % cell:
        raise StegoError(
            f"grid_subsample needs a grid divisible by cell={cell}, got {h} x {w}; crop the "
            f"feature map or pick a cell size that divides both sides"
        )
    gh, gw = h // cell, w // cell
    blocks = feats.reshape(b, gh, cell, gw, cell, c).permute(0, 1, 3, 2, 4, 5)
    blocks = blocks.reshape(b * gh * gw, cell * cell, c)  # (B * blocks, cell^2, C)
    if order is None:
        draw_on = generator.device if generator is not None else feats.device
        order = torch.randint(
            cell * cell, (blocks.shape[0],), generator=generator, device=draw_on
        ).to(feats.device)
    if order.shape != (blocks.shape[0],):
        raise StegoError(
            f"order must have shape ({blocks.shape[0]},) (one entry per {cell}x{cell} block of "
            f"{b} images of {h} x {w} patches), got {tuple(order.shape)}"
        )
    picked = blocks[torch.arange(blocks.shape[0], device=feats.device), order]  # (B*blocks, C)
    return picked.reshape(b, gh * gw, c)


def cell_window(
    h: int, w: int, cell: int, generator: torch.Generator | None = None
) -> tuple[slice, slice]:
    """A window of an h x w patch grid whose sides are the largest multiples of ``cell``, at a
    random offset: (rows, cols) slices, for :func:`grid_subsample` on the cropped grid.

    Raises :class:`StegoError` when the grid is smaller than one cell.
    """
    hc, wc = h - h % cell, w - w % cell
    if hc == 0 or wc == 0:
        raise StegoError(
            f"the feature grid {h} x {w} is smaller than loss.cause_cell={cell}; lower "
            "loss.cause_cell or raise data.resolution"
        )
    oy = int(torch.randint(h - hc + 1, (1,), generator=generator))
    ox = int(torch.randint(w - wc + 1, (1,), generator=generator))
    return slice(oy, oy + hc), slice(ox, ox + wc)


def _grid_shape(n: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is not None:
        if grid[0] * grid[1] != n:
            raise StegoError(
                f"grid {grid} does not hold {n} patches; pass grid=(h, w) with h*w={n}"
            )
        return int(grid[0]), int(grid[1])
    side = int(round(n**0.5))
    if side * side != n:
        raise StegoError(f"{n} patches do not form a square grid; pass grid=(h, w)")
    return side, side


# --------------------------------------------------------------------------- concepts
class NearestConcept(NamedTuple):
    """Output of :func:`nearest_concept`."""

    vectors: Tensor  # (..., C): the nearest concept's (unnormalised) vector
    indices: Tensor  # (...,) int64: its row in ``concepts``


def nearest_concept(feats: Tensor, concepts: Tensor) -> NearestConcept:
    """The concept of highest cosine to each patch: feats (..., C), concepts (K, C).

    Ties go to the lowest index (torch.argmax returns the first maximum). No gradient flows
    through the indices; ``vectors`` is ``concepts[indices]`` and carries the concepts' gradient.
    """
    _check_rank("concepts", concepts, 2, "(K, C)")
    if feats.shape[-1] != concepts.shape[1]:
        raise StegoError(
            f"feats have {feats.shape[-1]} channels but concepts have {concepts.shape[1]}"
        )
    cos = _unit(feats) @ _unit(concepts).T  # (..., K)
    indices = cos.argmax(dim=-1)
    return NearestConcept(concepts[indices], indices)


def concept_contrastive_loss(
    feats: Tensor,
    proj: Tensor,
    proj_teacher: Tensor,
    concepts: Tensor,
    bank_concepts: Tensor | None = None,
    bank_proj: Tensor | None = None,
    temperature: float = 0.07,
    pos_threshold: float = 0.3,
    neg_threshold: float = 0.1,
) -> Tensor:
    """CAUSE's concept-guided InfoNCE between student and teacher projections; a scalar ().

    feats (B, N, C) backbone features (only used to find each patch's nearest concept),
    proj (B, N, E) student projections, proj_teacher (B, N, E) teacher projections (detached
    here), concepts (K, C); bank_concepts (M, C) the concept vector of each bank row and
    bank_proj (M, E) its teacher projection, or both ``None`` for no bank. Bank rows may come in
    any order; a bank with M = 0 counts as no bank.

    Pairs are judged by the cosine of the two patches' nearest-concept vectors: positive above
    ``pos_threshold``, negative below ``neg_threshold``, ignored in between. For each anchor image
    b, rows are its N student projections and columns all B * N teacher projections (the pair of a
    patch with its own teacher projection is removed); logits are the cosines / temperature. Each
    positive entry (p, q) contributes ``logsumexp_{r pos or neg}(logit[p, r]) - logit[p, q]`` and
    the image's term is the mean over all its positive entries. The bank gives a second term per
    image the same way, with the bank rows as columns. The loss is the mean of the B (or 2B)
    terms. As in the original, a term without any positive entry is NaN (the mean of nothing).
    """
    _check_rank("feats", feats, 3, "(B, N, C)")
    _check_rank("proj", proj, 3, "(B, N, E)")
    if proj_teacher.shape != proj.shape or proj.shape[:2] != feats.shape[:2]:
        raise StegoError(
            f"feats {tuple(feats.shape)}, proj {tuple(proj.shape)} and proj_teacher "
            f"{tuple(proj_teacher.shape)} must agree on (B, N), and proj on E"
        )
    if (bank_concepts is None) != (bank_proj is None):
        raise StegoError("pass both bank_concepts and bank_proj, or neither (no bank)")
    b, n, _ = proj.shape
    vq = _unit(nearest_concept(feats.detach(), concepts.detach()).vectors)  # (B, N, C)
    flat_vq = vq.reshape(b * n, -1)  # (B*N, C)
    student = _unit(proj)  # (B, N, E)
    teacher = _unit(proj_teacher.detach()).reshape(b * n, -1)  # (B*N, E)
    bank = None
    if bank_concepts is not None and bank_proj is not None and bank_proj.shape[0] > 0:
        bank = _unit(bank_concepts.detach()), _unit(bank_proj.detach())  # (M, C), (M, E)

    own = torch.arange(n, device=proj.device)
    terms = []
    for i in range(b):
        concept_cos = vq[i] @ flat_vq.T  # (N, B*N)
        pos = concept_cos > pos_threshold
        pos[own, i * n + own] = False  # a patch is not its own positive
        neg = concept_cos < neg_threshold
        terms.append(_info_nce(student[i] @ teacher.T / temperature, pos, neg))
        if bank is not None:
            bank_cos = vq[i] @ bank[0].T  # (N, M)
            logits = student[i] @ bank[1].T / temperature  # (N, M)
            terms.append(_info_nce(logits, bank_cos > pos_threshold, bank_cos < neg_threshold))
    return torch.stack(terms).mean()


def _info_nce(logits: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    """Mean over the positive entries of ``logsumexp_{pos | neg}(row) - logit``: logits, pos, neg
    (R, Q) -> (). Rows without a positive get a full mask so that their (unused) logsumexp stays
    finite and its backward never forms 0 * inf."""
    has_pos = pos.any(dim=1, keepdim=True)  # (R, 1)
    keep = pos | neg | ~has_pos
    lse = torch.logsumexp(logits.masked_fill(~keep, float("-inf")), dim=1, keepdim=True)  # (R, 1)
    weight = pos.to(logits.dtype)
    return ((lse - logits) * weight).sum() / weight.sum()


# --------------------------------------------------------------------------- centroids
class CentroidAssignment(NamedTuple):
    """Output of :func:`centroid_assign`."""

    loss: Tensor  # (): minus the mean cosine to the nearest centroid
    preds: Tensor  # (B, N) int64: nearest centroid
    log_probs: Tensor  # (B, N, n): log_softmax(alpha * cosine) over centroids


def centroid_assign(x: Tensor, centroids: Tensor, alpha: float = 3.0) -> CentroidAssignment:
    """Hard cosine assignment of head outputs x (B, N, D) to centroids (n, D).

    ``x`` is detached, so the loss trains the centroids only (the cluster probe of CAUSE).
    Ties go to the lowest centroid index.
    """
    _check_rank("x", x, 3, "(B, N, D)")
    _check_rank("centroids", centroids, 2, "(n, D)")
    cos = _unit(x.detach()) @ _unit(centroids).T  # (B, N, n)
    best, preds = cos.max(dim=-1)
    return CentroidAssignment(-best.mean(), preds, torch.log_softmax(cos * alpha, dim=-1))


# --------------------------------------------------------------------------- concept bank
class BankRows(NamedTuple):
    """The bank's contents, concept after concept, oldest row first within a concept."""

    ids: Tensor  # (M,) int64: concept of each row
    proj: Tensor  # (M, E): stored teacher projections


class ConceptBank:
    """A FIFO of at most ``capacity`` teacher projections per concept.

    Storage is a ring buffer (n_concepts, capacity, E) allocated on the first :meth:`update` with
    that call's dtype and device: n_concepts * capacity * E numbers (2048 * 100 * 2048 float32 =
    1.7 GB for CAUSE's largest setting; store float16 projections to halve it). Each update keeps
    a random ``keep_fraction`` of each concept's new rows (``floor(n * keep_fraction)`` of n, drawn
    from ``generator``; the original keeps half), appends them in the given order and drops the
    oldest rows beyond capacity.
    """

    def __init__(self, n_concepts: int, capacity: int = 100, keep_fraction: float = 0.5) -> None:
        if n_concepts < 1 or capacity < 1:
            raise StegoError(f"ConceptBank needs n_concepts >= 1 and capacity >= 1, got "
                             f"{n_concepts} and {capacity}")
        if not 0.0 < keep_fraction <= 1.0:
            raise StegoError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
        self.n_concepts, self.capacity, self.keep_fraction = n_concepts, capacity, keep_fraction
        self.store: Tensor | None = None  # (n_concepts, capacity, E)
        self.count = torch.zeros(n_concepts, dtype=torch.long)  # rows held per concept
        self.head = torch.zeros(n_concepts, dtype=torch.long)  # next slot to write per concept

    def __len__(self) -> int:
        return int(self.count.sum())

    @torch.no_grad()
    def update(
        self, ids: Tensor, proj: Tensor, *, generator: torch.Generator | None = None
    ) -> None:
        """Add rows: ids (R,) int64 concept of each row, proj (R, E) (stored detached)."""
        ids, proj = ids.reshape(-1), proj.reshape(-1, proj.shape[-1]).detach()
        if ids.shape[0] != proj.shape[0]:
            raise StegoError(f"ids {tuple(ids.shape)} and proj {tuple(proj.shape)} differ in rows")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n_concepts):
            raise StegoError(f"concept ids must be in [0, {self.n_concepts}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        if self.store is None:
            self.store = proj.new_zeros(self.n_concepts, self.capacity, proj.shape[1])
            self.count, self.head = self.count.to(proj.device), self.head.to(proj.device)
        elif proj.shape[1] != self.store.shape[2]:
            raise StegoError(f"proj has {proj.shape[1]} channels, the bank holds "
                             f"{self.store.shape[2]}")
        ids, proj = ids.to(self.store.device), proj.to(self.store)
        if self.keep_fraction < 1.0:
            ids, proj = self._subsample(ids, proj, generator)
        if ids.numel() == 0:
            return
        # rank of each row among the new rows of its concept, in the given order
        order = torch.sort(ids, stable=True).indices
        ids, proj = ids[order], proj[order]
        new = torch.bincount(ids, minlength=self.n_concepts)  # (n_concepts,)
        first = torch.cumsum(new, 0) - new
        rank = torch.arange(ids.numel(), device=ids.device) - first[ids]
        fits = rank >= new[ids] - self.capacity  # older rows overwritten in this same call: skip
        slot = (self.head[ids] + rank) % self.capacity
        self.store[ids[fits], slot[fits]] = proj[fits]
        self.head = (self.head + new) % self.capacity
        self.count = torch.clamp(self.count + new, max=self.capacity)

    def _subsample(
        self, ids: Tensor, proj: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """Keep floor(n * keep_fraction) random rows of each concept's n, in their given order."""
        draw_on = generator.device if generator is not None else ids.device
        noise = torch.rand(ids.shape[0], generator=generator, device=draw_on).to(ids.device)
        by_noise = torch.argsort(noise)
        grouped = by_noise[torch.sort(ids[by_noise], stable=True).indices]  # concept, then noise
        new = torch.bincount(ids, minlength=self.n_concepts)
        first = torch.cumsum(new, 0) - new
        sorted_ids = ids[grouped]
        rank = torch.arange(ids.numel(), device=ids.device) - first[sorted_ids]
        keep = rank < torch.floor(new[sorted_ids] * self.keep_fraction)
        kept = torch.sort(grouped[keep]).values  # back to the given order
        return ids[kept], proj[kept]

    def as_tensors(self) -> BankRows:
        """All rows: ids (M,), proj (M, E), concept by concept, oldest first."""
        if self.store is None:
            return BankRows(torch.zeros(0, dtype=torch.long), torch.zeros(0, 0))
        ids = torch.repeat_interleave(
            torch.arange(self.n_concepts, device=self.store.device), self.count
        )  # (M,)
        first = torch.cumsum(self.count, 0) - self.count
        age = torch.arange(ids.numel(), device=ids.device) - first[ids]  # 0 = oldest
        slot = (self.head[ids] - self.count[ids] + age) % self.capacity
        return BankRows(ids, self.store[ids, slot])
