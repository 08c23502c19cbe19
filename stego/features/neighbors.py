"""Nearest-neighbour table of training images: STEGO's source of "knn" positives.

Every training image (or five-crop) is described by the mean of its backbone patch features,
L2-normalised (``BackboneOutput.global_feat``). Its neighbours are the ``k`` items of highest
cosine similarity; at training time the positive of item ``i`` is one of ranks
``1..num_neighbors`` of row ``i``.

Conventions of :func:`topk_cosine` (both backends):

* rank 0 is always the item itself, ranks 1.. are the other items by decreasing cosine;
* ties are broken deterministically, lower index first;
* ``exclude_groups`` removes items of the query's group (sibling five-crops of one image).

Unlike the original, features are extracted in eval mode (the original left dropout on) and the
similarity matrix is computed in query chunks whose size follows a memory budget.
One module (~500 lines): both backends and the original's ``nns_*.npz`` share these rules.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from stego.atomic import atomic_write, file_lock
from stego.errors import StegoError
from stego.features.extract import (
    BackboneBatch,
    GlobalFeatures,
    backbone_batches,
    collect_global_features,
)
from stego.features.fingerprint import check_fingerprint, rebuild_command

__all__ = [
    "DEFAULT_MAX_MEMORY_BYTES",
    "topk_cosine",
    "chunk_rows",
    "BackboneBatch",
    "backbone_batches",
    "GlobalFeatures",
    "collect_global_features",
    "global_features",
    "NeighborTable",
    "sample_positive",
    "positive_index",
    "original_table_path",
    "original_table_order_problem",
]

DEFAULT_MAX_MEMORY_BYTES = 256 * 2**20
# Extra bytes per (query, item) pair in one chunk: float32 similarity + bool group mask.
_BYTES_PER_PAIR = 5
_FAISS_PIP_HINT = "pip install 'stego-seg[faiss]' (or pip install faiss-cpu / faiss-gpu)"


def chunk_rows(n: int, k: int, max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES) -> int:
    """Query rows per chunk so that one chunk's similarity block fits ``max_memory_bytes``.

    A chunk of ``r`` rows allocates ``r * n * 5`` bytes (float32 similarities + a bool mask when
    groups are excluded) plus ``r * k * 32`` bytes of top-k buffers.
    """
    per_row = n * _BYTES_PER_PAIR + k * 32
    return int(max(1, min(n, max_memory_bytes // per_row)))


def _prepare(feats: Tensor, device: torch.device) -> Tensor:
    if feats.ndim != 2:
        raise StegoError(f"features must have shape (N, C), got {tuple(feats.shape)}")
    x = feats.detach().to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise StegoError("features contain NaN or inf; check the backbone output")
    return F.normalize(x, dim=1)  # (N, C)


def _order_candidates(vals: Tensor, idx: Tensor) -> Tensor:
    """Sort candidate indices (R, m) by value descending, then index ascending."""
    idx_sorted, perm = idx.sort(dim=1)
    v = vals.gather(1, perm)
    order = v.sort(dim=1, descending=True, stable=True).indices
    return idx_sorted.gather(1, order)


def _fix_boundary_ties(row: Tensor, want: int) -> tuple[Tensor, Tensor]:
    """Exact top-``want`` of one similarity row (n,), lower index first among equal values."""
    t = row.topk(want).values[-1]
    above = torch.nonzero(row > t).flatten()
    equal = torch.nonzero(row == t).flatten()[: want - above.numel()]
    idx = torch.cat([above, equal])
    return row[idx], idx


def _topk_torch(
    x: Tensor,
    k: int,
    rows_per_chunk: int,
    groups: Tensor | None,
    out: Tensor,
    query_range: tuple[int, int],
) -> None:
    """Fill ``out`` (stop - first, k) with the rows ``first..stop`` of the table."""
    first, last = query_range
    want = k - 1  # neighbours other than the item itself
    for start in range(first, last, rows_per_chunk):
        stop = min(last, start + rows_per_chunk)
        r = stop - start
        rows = torch.arange(r, device=x.device)
        sims = x[start:stop] @ x.T  # (r, n)
        if groups is not None:
            sims.masked_fill_(groups[start:stop, None] == groups[None, :], float("-inf"))
        sims[rows, rows + start] = float("-inf")  # the item itself goes to rank 0 below
        vals, idx = sims.topk(k, dim=1)  # (r, k): want + 1 to detect a tie at the boundary
        block = out[start - first : stop - first]
        block[:, 0] = torch.arange(start, stop, device=x.device)
        if want == 0:
            continue
        if bool(torch.isinf(vals[:, want - 1]).any()):
            bad = start + int(torch.nonzero(torch.isinf(vals[:, want - 1]))[0])
            raise StegoError(
                f"item {bad} has fewer than k-1={want} eligible neighbours (too many siblings "
                "excluded or too few items); lower --k"
            )
        # the (want+1)-th candidate equal to the want-th: a lower index may have been left out
        boundary = torch.nonzero(vals[:, want] == vals[:, want - 1]).flatten().tolist()
        vals, idx = vals[:, :want].clone(), idx[:, :want].clone()
        for j in boundary:
            vals[j], idx[j] = _fix_boundary_ties(sims[j], want)
        block[:, 1:] = _order_candidates(vals, idx)
        del sims


def _import_faiss() -> Any:
    try:
        import faiss  # type: ignore[import-not-found]
    except ImportError as exc:
        raise StegoError(f"the faiss backend needs faiss: {_FAISS_PIP_HINT}") from exc
    return faiss


def _topk_faiss(
    x: np.ndarray,
    k: int,
    groups: np.ndarray | None,
    approximate: bool,
    chunk: int,
    query_range: tuple[int, int],
) -> np.ndarray:
    """Rows ``first..stop`` (stop - first, k) of the table through a faiss index of all items."""
    faiss = _import_faiss()
    n, c = x.shape
    if approximate:
        nlist = int(max(1, min(4 * np.sqrt(n), n // 39)))
        quantizer = faiss.IndexFlatIP(c)
        index = faiss.IndexIVFFlat(quantizer, c, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        train = x[rng.choice(n, size=min(n, 256 * nlist), replace=False)]
        index.train(train)
        index.nprobe = int(min(nlist, max(16, nlist // 8)))  # recall over speed
    else:
        index = faiss.IndexFlatIP(c)
    index.add(x)
    want = k - 1
    group_size = int(np.bincount(groups - groups.min()).max()) if groups is not None else 1
    first, last = query_range
    out = np.empty((last - first, k), dtype=np.int64)
    out[:, 0] = np.arange(first, last)
    if want == 0:
        return out
    for start in range(first, last, chunk):
        pending = np.arange(start, min(last, start + chunk))
        kk = min(n, want + group_size + 2)
        while pending.size:
            dist, ind = index.search(x[pending], kk)  # (p, kk), descending
            valid = (ind >= 0) & (ind != pending[:, None])
            if groups is not None:
                valid &= groups[np.maximum(ind, 0)] != groups[pending][:, None]
            dist = np.where(valid, dist, -np.inf)
            order = np.lexsort((ind, -dist), axis=1)
            dist_s = np.take_along_axis(dist, order, axis=1)
            ind_s = np.take_along_axis(ind, order, axis=1)
            enough = np.isfinite(dist_s[:, want - 1])
            # a candidate outside the returned set might tie with the last one kept
            ok = enough & ((dist_s[:, want - 1] > dist[:, -1]) | (kk >= n))
            if kk >= n and not enough.all():
                bad = int(pending[~enough][0])
                raise StegoError(
                    f"item {bad} has fewer than k-1={want} eligible neighbours (too many "
                    "siblings excluded, too few items, or nprobe too small); lower --k"
                )
            out[pending[ok] - first, 1:] = ind_s[ok, :want]
            pending = pending[~ok]
            kk = min(n, kk * 2)
    return out


def topk_cosine(
    feats: Tensor,
    k: int = 30,
    *,
    chunk_size: int | None = None,
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES,
    device: str | torch.device | None = None,
    backend: str = "torch",
    exclude_groups: Tensor | None = None,
    approximate: bool = False,
    rows: tuple[int, int] | None = None,
) -> Tensor:
    """Indices of the ``k`` most cosine-similar items of each item.

    Args:
        feats: (N, C) features; normalised inside.
        k: columns of the result, the item itself included (rank 0).
        chunk_size: query rows per chunk (torch backend); default from ``max_memory_bytes``.
        max_memory_bytes: budget for one chunk's similarity block (see :func:`chunk_rows`).
            Peak extra memory is about this + N*C*4 (normalised copy) + N*k*8 (result).
        device: where to compute (torch backend); default ``feats.device``.
        backend: ``"torch"`` (exact, chunked) or ``"faiss"`` (exact ``IndexFlatIP``).
        exclude_groups: (N,) int64 group ids; items sharing the query's group (sibling crops of
            one image) are never its neighbours, except itself at rank 0.
        approximate: faiss only: an IVF index (for millions of items; results may differ).
        rows: ``(start, stop)``: compute only these rows of the table (each still searched
            against all N items), e.g. to split the work across processes or devices.

    Returns:
        (N, k) int64 on ``feats.device`` (``(stop - start, k)`` with ``rows``): row i =
        [i, nearest other, second nearest, ...], ties broken by lower index first.
    """
    n = feats.shape[0] if feats.ndim else 0
    if not 1 <= k <= n:
        raise StegoError(f"k must be between 1 and the number of items ({n}), got {k}")
    if backend not in ("torch", "faiss"):
        raise StegoError(f"unknown neighbour backend {backend!r}; choose 'torch' or 'faiss'")
    if approximate and backend != "faiss":
        raise StegoError("approximate=True needs backend='faiss'")
    query_range = (0, n) if rows is None else (int(rows[0]), int(rows[1]))
    if not 0 <= query_range[0] < query_range[1] <= n:
        raise StegoError(f"rows must satisfy 0 <= start < stop <= {n}, got {rows}")
    groups = None
    if exclude_groups is not None:
        groups = torch.as_tensor(exclude_groups).to(torch.int64).flatten()
        if groups.numel() != n:
            raise StegoError(f"exclude_groups has {groups.numel()} entries for {n} items")
    if backend == "faiss":
        xn = np.ascontiguousarray(_prepare(feats, torch.device("cpu")).numpy())
        g = groups.cpu().numpy() if groups is not None else None
        res = _topk_faiss(xn, k, g, approximate, chunk_size or 16384, query_range)
        return torch.from_numpy(res).to(feats.device)
    dev = torch.device(device) if device is not None else feats.device
    x = _prepare(feats, dev)
    per_chunk = chunk_size or chunk_rows(n, k, max_memory_bytes)
    out = torch.empty((query_range[1] - query_range[0], k), dtype=torch.int64, device=dev)
    groups_dev = groups.to(dev) if groups is not None else None
    _topk_torch(x, k, max(1, int(per_chunk)), groups_dev, out, query_range)
    return out.to(feats.device)


def global_features(
    backbone: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> Tensor:
    """(N, C) float32 global features of every item, computed in eval mode."""
    return collect_global_features(
        backbone,
        dataset,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        progress=progress,
    ).feat


@dataclass
class NeighborTable:
    """Neighbour indices (N, k) int64 and the fingerprint of what they were computed from.

    Saved as one safetensors file (tensor ``indices``; the fingerprint as JSON in the metadata).
    :meth:`load` also reads the original code's ``nns_*.npz`` (key ``nns``, (N, 30)), whose only
    fingerprint is its length; its full-image Cityscapes tables are refused (see
    :func:`original_table_order_problem`). ``stego train`` never reads ``nns/`` (own tables).
    """

    indices: Tensor
    fingerprint: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (under a lock) to ``path`` (``.safetensors``)."""
        from safetensors.torch import save

        path = Path(path)
        idx = self.indices.detach().to("cpu", torch.int64).contiguous()
        meta = {
            "format": "stego-neighbors",
            "version": "1",
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
        }
        data = save({"indices": idx}, metadata=meta)
        with file_lock(path.with_name(path.name + ".lock")), atomic_write(path) as handle:
            handle.write(data)
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        expected_fingerprint: Mapping[str, Any] | None = None,
    ) -> NeighborTable:
        """Read a table; :class:`StegoError` when it does not match ``expected_fingerprint``."""
        path = Path(path)
        if not path.is_file():
            hint = (
                f" Build it with `{rebuild_command(expected_fingerprint)}`."
                if expected_fingerprint
                else ""
            )
            raise StegoError(f"neighbour table {path} does not exist.{hint}")
        if path.suffix == ".npz":
            return cls._load_original(path, expected_fingerprint)
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                indices = f.get_tensor("indices")
        except Exception as exc:  # noqa: BLE001 - corrupt or foreign file
            raise StegoError(f"cannot read neighbour table {path}: {exc}") from exc
        if meta.get("format") != "stego-neighbors":
            raise StegoError(
                f"{path} is not a stego neighbour table (no 'stego-neighbors' metadata)"
            )
        fp = json.loads(meta.get("fingerprint", "{}"))
        table = cls(indices.to(torch.int64), fp)
        table._check_indices(path)
        check_fingerprint(expected_fingerprint, fp, what="neighbour table", path=path)
        return table

    @classmethod
    def _load_original(cls, path: Path, expected: Mapping[str, Any] | None) -> NeighborTable:
        problem = original_table_order_problem(path, expected)
        if problem:
            raise StegoError(problem)
        try:
            with np.load(path, allow_pickle=False) as data:
                if "nns" not in data.files:
                    raise StegoError(f"{path} has no 'nns' array (keys: {data.files})")
                nns = np.asarray(data["nns"])
        except (OSError, ValueError) as exc:
            raise StegoError(f"cannot read original neighbour table {path}: {exc}") from exc
        if nns.ndim != 2 or not np.issubdtype(nns.dtype, np.integer):
            raise StegoError(
                f"{path}: 'nns' must be an (N, k) integer array, got {nns.dtype} {nns.shape}"
            )
        table = cls(
            torch.from_numpy(nns.astype(np.int64)),
            {"source": "original-npz", "num_items": int(nns.shape[0])},
        )
        table._check_indices(path)
        if expected is not None and "num_items" in expected and expected["num_items"] != len(table):
            raise StegoError(
                f"original neighbour table {path} has {len(table)} rows but the dataset has "
                f"{expected['num_items']} items (its length is the only check this format "
                f"allows). Rebuild it with `{rebuild_command(expected)}`."
            )
        return table

    def _check_indices(self, path: Path) -> None:
        n = len(self)
        if self.indices.ndim != 2 or (n and (self.indices.min() < 0 or self.indices.max() >= n)):
            raise StegoError(f"neighbour table {path} is corrupt: indices outside [0, {n})")


def sample_positive(
    indices: Tensor, num_neighbors: int, generator: torch.Generator | None = None
) -> Tensor:
    """Draw one neighbour per row uniformly from ranks 1..num_neighbors.

    Args:
        indices: (B, k) neighbour rows (rank 0 = the item itself).
    Returns:
        (B,) int64 neighbour indices.
    """
    if not 1 <= num_neighbors <= indices.shape[1] - 1:
        raise StegoError(f"num_neighbors must be in 1..{indices.shape[1] - 1}, got {num_neighbors}")
    ranks = torch.randint(
        1,
        num_neighbors + 1,
        (indices.shape[0], 1),
        generator=generator,
        device=generator.device if generator is not None else indices.device,
    )
    return indices.gather(1, ranks.to(indices.device)).squeeze(1)


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def positive_index(
    neighbors_row: Tensor | np.ndarray | list[int],
    num_neighbors: int,
    seed: int,
    epoch: int,
    index: int,
) -> int:
    """The positive of item ``index`` in ``epoch``: a rank in 1..num_neighbors of its row.

    A pure function of (seed, epoch, index) (SplitMix64 hash), so the cached-feature dataset and
    a live-backbone path that both call it draw the same positives, in any worker and order.
    """
    k = len(neighbors_row)
    if not 1 <= num_neighbors <= k - 1:
        raise StegoError(f"num_neighbors must be in 1..{k - 1}, got {num_neighbors}")
    h = _splitmix64(
        _splitmix64(_splitmix64(seed & _MASK64) ^ (epoch & _MASK64)) ^ (index & _MASK64)
    )
    return int(neighbors_row[1 + h % num_neighbors])


# the original's `dataset_name` where stego's registry name differs (folder prefix of nns/ files)
_ORIGINAL_DATASET = {"cityscapes27": "cityscapes", "potsdam3": "potsdam"}

_ORIGINAL_MODEL_TYPE = {
    f"dino-vit{size[0]}{patch}": f"vit_{size}" for size in ("small", "base") for patch in (8, 16)
}


def original_table_path(
    data_root: str | os.PathLike[str],
    backbone: str,
    dataset: str,
    split: str,
    crop_type: str,
    resolution: int,
) -> Path:
    """Where the original code keeps its table for stego's ``backbone`` / ``dataset`` names.

    ``<root>/nns/nns_<model>_<dataset>_<split>_<crop>_<res>.npz`` with the original's names:
    model ``vit_small`` / ``vit_base`` (the patch size is not in the name, so ViT-S/8 and
    ViT-S/16 tables share one), dataset ``cityscapes`` / ``potsdam`` for ``cityscapes27`` /
    ``potsdam3``, crop ``five`` or ``None``.
    """
    model = _ORIGINAL_MODEL_TYPE.get(backbone, backbone)
    name = _ORIGINAL_DATASET.get(dataset, dataset)
    crop = "None" if crop_type in ("none", None, "None") else crop_type
    return Path(data_root) / "nns" / f"nns_{model}_{name}_{split}_{crop}_{resolution}.npz"


_CITYSCAPES_FULL = re.compile(r"nns_.+_cityscapes_(?P<split>.+)_None_(?P<resolution>\d+)\.npz")


def original_table_order_problem(
    path: str | os.PathLike[str], expected: Mapping[str, Any] | None = None
) -> str | None:
    """Why an original ``nns_*.npz`` cannot be applied to stego's item order, or None.

    Full-image Cityscapes (told by the file name or by ``expected``): the original listed it in
    ``os.listdir`` order (file-system dependent), stego sorts, so rows would describe other
    images. Five-crop tables are fine: crops are numbered files, read in that order.
    """
    path, want = Path(path), dict(expected or {})
    told = want.get("dataset") in ("cityscapes27", "cityscapes") and want.get("crop_type", "none")
    named = _CITYSCAPES_FULL.fullmatch(path.name)
    if not (named or told == "none"):
        return None
    fp = {**(named.groupdict() if named else {}), **want, "dataset": "cityscapes27"}
    fp = {**fp, "crop_type": "none", "resolution": int(fp.get("resolution", 224))}
    return (
        f"{path} is the original code's neighbour table for full-image Cityscapes, whose rows "
        "follow os.listdir order (file-system dependent) while stego lists images sorted, so "
        "its rows would be applied to other images; it is refused. Build stego's own table with "
        f"`{rebuild_command(fp)}` (five-crop tables of the original are read as they are)."
    )
