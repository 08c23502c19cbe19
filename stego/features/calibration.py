"""Label-free choice of the three STEGO shifts from the user's own features.

The paper's presets were tuned by hand for DINO v1 features; other backbones (DINOv2's
correlations sit much higher) need other shifts. The authors' advice is to look at the three
centred feature-correlation distributions and set each shift so that most random pairs read as
"different" and the right share of self/kNN pairs read as "same". We make that rule explicit and
label-free:

1. Cluster a sample of patch features with cosine k-means into P clusters, the pseudo-classes.
   By default P = max(2, K // 2) for K segments, at most 5 (:func:`pseudo_class_count`): k-means
   makes clusters of similar size, so K of them are same-class far less often than K real
   classes, whose sizes are very unequal (road, sky and buildings cover most of a street
   scene). On CamVid the same-class rates of the 11 labelled classes (train split) match those
   of k-means with 5 clusters, and K clusters gave shifts ~0.15 too high (docs/benchmarks.md).
2. Sample location pairs exactly as training does for each term (self, knn, random) and measure
   the fraction ``p`` of pairs whose two ends fall in the same pseudo-class.
3. Set the term's shift to the ``1 - p`` quantile of its centred feature correlation, so the
   fraction of attracted pairs (``fd > shift``) equals the fraction of same-pseudo-class pairs.

With true labels instead of pseudo-classes this is the rule our CamVid preset's shifts came from.

Used three ways: :func:`calibrate_shifts` (library), ``stego calibrate`` (:func:`calibrate_split`
on the split's feature cache and neighbour table, then :func:`write_calibration`: ``shifts.yaml``
and a histogram figure) and ``loss.*_shift: auto`` in a training config
(:func:`resolve_auto_shifts`, called by :func:`stego.train.trainer.train` before the module is
built; the chosen values are logged and saved in the run's ``config.yaml``).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from stego.errors import StegoError
from stego.losses import (
    SHIFT_KEYS,
    TERMS,
    derangement,
    feature_correlation,
    sample_at,
    sample_coords,
)
from stego.models.probes import spherical_kmeans

__all__ = [
    "Calibration",
    "calibrate_shifts",
    "pseudo_class_count",
    "TERMS",
    "SHIFT_KEYS",
    "auto_shift_keys",
    "resolve_auto_shifts",
    "calibrate_split",
    "write_calibration",
    "shifts_config",
    "histogram_figure",
    "LiveFeatures",
]


@dataclass
class Calibration:
    """Proposed shifts and what they were derived from (feed ``fd`` to a histogram)."""

    shifts: dict[str, float]  # term -> shift b
    same_fraction: dict[str, float]  # term -> fraction of same-pseudo-class pairs
    fd: dict[str, Tensor] = field(repr=False)  # term -> sampled centred feature correlations (M,)

    def as_tuple(self) -> tuple[float, float, float]:
        """Shifts ordered (self, knn, random), as StegoLoss takes them."""
        return (self.shifts["self"], self.shifts["knn"], self.shifts["random"])


# Most pseudo-classes the default calibration uses, whatever the number of segments. More of
# them make same-pseudo-class pairs rarer and the shifts higher (0.31 at K = 2, 0.56 at K = 11,
# 0.74 / 0.61 / 0.52 at K = 27 on COCO photos): the head then pushes most pairs apart and
# cuts the images into fragments. On the 100-photo COCO-Stuff sample, K = 27, `stego segment`
# scored 7.5 mIoU with 13 pseudo-classes and 8.7 with 5 (docs/benchmarks.md); folders with
# K <= 11, where the rule was chosen (CamVid), keep their count.
MAX_PSEUDO_CLASSES = 5


def pseudo_class_count(n_segments: int) -> int:
    """Default number of k-means pseudo-classes for ``n_segments`` segments:
    max(2, K // 2), at most :data:`MAX_PSEUDO_CLASSES`.

    See step 1 of the module docstring for why fewer pseudo-classes than segments.
    """
    return min(MAX_PSEUDO_CLASSES, max(2, n_segments // 2))


def _stack(feats: Sequence[Tensor], indices: Tensor) -> Tensor:
    return torch.stack([torch.as_tensor(feats[int(i)]).float() for i in indices])  # (B, C, h, w)


def _pseudo_labels(sampled: Tensor, centroids: Tensor) -> Tensor:
    """Nearest centroid of every sampled vector: (B, C, S, S) -> (B, S, S)."""
    x = F.normalize(sampled, dim=1)
    return torch.einsum("bcij,kc->bkij", x, centroids).argmax(1)


def calibrate_shifts(
    feats: Sequence[Tensor],
    neighbors: Tensor,
    n_clusters: int,
    *,
    num_neighbors: int = 7,
    n_samples: int = 11,
    pointwise: bool = True,
    batch_size: int = 16,
    n_batches: int = 20,
    kmeans_images: int = 200,
    seed: int = 0,
) -> Calibration:
    """Propose (self, knn, random) shifts for ``feats`` without labels.

    feats: indexable collection of N feature maps (C, h, w) (a feature cache works);
    neighbors: (N, k) nearest-neighbour table (rank 0 = the item itself).
    """
    n_items = len(feats)
    if n_items < 2:
        raise StegoError("calibration needs at least 2 images")
    if n_clusters < 2:
        raise StegoError(f"calibration needs at least 2 clusters, got {n_clusters}")
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_items, generator=generator)[:kmeans_images]
    sample = _stack(feats, pick)  # (M, C, h, w)
    kmeans = spherical_kmeans(sample, n_clusters, n_restarts=3, generator=generator)
    fd_parts: dict[str, list[Tensor]] = {t: [] for t in TERMS}
    same_parts: dict[str, list[Tensor]] = {t: [] for t in TERMS}
    ranks = min(num_neighbors, neighbors.shape[1] - 1)
    batch = min(batch_size, n_items)
    for _ in range(n_batches):
        idx = torch.randperm(n_items, generator=generator)[:batch]
        rank = torch.randint(1, ranks + 1, (batch,), generator=generator) if ranks >= 1 else None
        pos_idx = neighbors[idx, rank] if rank is not None else idx
        f, f_pos = _stack(feats, idx), _stack(feats, pos_idx)
        c1 = sample_coords(batch, n_samples, generator=generator)
        c2 = sample_coords(batch, n_samples, generator=generator)
        perm = derangement(batch, generator=generator)
        anchor = sample_at(f, c1)
        others = {"self": anchor, "knn": sample_at(f_pos, c2), "random": sample_at(f[perm], c2)}
        lab1 = _pseudo_labels(anchor, kmeans.centroids)  # (B, S, S)
        for term, other in others.items():
            fd_parts[term].append(feature_correlation(anchor, other, pointwise=pointwise).flatten())
            lab2 = _pseudo_labels(other, kmeans.centroids)
            same = lab1[:, :, :, None, None] == lab2[:, None, None, :, :]  # (B, S, S, S, S)
            same_parts[term].append(same.flatten().float())
    shifts, fractions, fds = {}, {}, {}
    for term in TERMS:
        fd = torch.cat(fd_parts[term])
        p = float(torch.cat(same_parts[term]).mean())
        q = min(max(1.0 - p, 0.0), 1.0)
        shifts[term] = float(torch.quantile(fd[:: max(1, fd.numel() // 1_000_000)], q))
        fractions[term] = p
        fds[term] = fd
    return Calibration(shifts=shifts, same_fraction=fractions, fd=fds)


# --------------------------------------------------------------------------- config and outputs


def shifts_config(calibration: Calibration, *, ndigits: int = 3) -> dict[str, dict[str, float]]:
    """``{"loss": {"pos_intra_shift": .., "pos_inter_shift": .., "neg_inter_shift": ..}}``:
    a config fragment for ``stego train --config``."""
    return {"loss": {SHIFT_KEYS[t]: round(calibration.shifts[t], ndigits) for t in TERMS}}


def auto_shift_keys(config: Any) -> list[str]:
    """Loss keys of ``config`` (a :class:`stego.config.StegoConfig`) set to ``"auto"``."""
    return [key for key in SHIFT_KEYS.values() if getattr(config.loss, key) == "auto"]


class LiveFeatures(Sequence):
    """Backbone features (C, h, w) of ``dataset[i]["image"]``, computed on first use and kept.

    Lets :func:`calibrate_shifts` run without a feature cache (it reads each image at most once).
    """

    def __init__(self, backbone: Any, dataset: Any, device: str | torch.device = "cpu") -> None:
        self.backbone, self.dataset, self.device = backbone, dataset, device
        self._memo: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Tensor:  # type: ignore[override]
        i = int(i)
        if i not in self._memo:
            image = torch.as_tensor(self.dataset[i]["image"])[None].to(self.device)  # (1, 3, H, W)
            with torch.no_grad():
                self._memo[i] = self.backbone(image).feat[0].to("cpu", torch.float16)
        return self._memo[i].float()


def resolve_auto_shifts(
    config: Any,
    feats: Sequence[Tensor],
    neighbors: Tensor,
    n_clusters: int,
    *,
    saved: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = print,
) -> Calibration | None:
    """Replace every ``"auto"`` loss shift of ``config`` (in place) by its calibrated value.

    Calibrates on ``feats`` / ``neighbors`` (the training split) with the run's own settings:
    ``train.num_neighbors``, ``loss.feature_samples``, ``loss.pointwise``, ``data.batch_size``
    and ``train.seed``. ``saved``: the resolved config dict of the run being resumed; its
    values are reused (no recomputation, exact replay). Returns the calibration (None when
    nothing was ``"auto"`` or all came from ``saved``).
    """
    keys = auto_shift_keys(config)
    if not keys:
        return None
    old = (saved or {}).get("loss", {})
    if all(isinstance(old.get(k), (int, float)) for k in keys):
        for key in keys:
            setattr(config.loss, key, float(old[key]))
        if log is not None:
            log(
                "auto shifts taken from the resumed run: "
                + ", ".join(f"{k}={old[k]}" for k in keys)
            )
        return None
    pseudo = config.loss.auto_pseudo_classes or pseudo_class_count(n_clusters)
    cal = calibrate_shifts(
        feats,
        neighbors,
        pseudo,
        num_neighbors=config.train.num_neighbors,
        n_samples=config.loss.feature_samples,
        pointwise=config.loss.pointwise,
        batch_size=config.data.batch_size,
        seed=config.train.seed,
    )
    chosen = shifts_config(cal, ndigits=4)["loss"]
    for key in keys:
        setattr(config.loss, key, chosen[key])
    if log is not None:
        chosen_text = ", ".join(
            f"{SHIFT_KEYS[t]}={chosen[SHIFT_KEYS[t]]} (same-pseudo-class fraction "
            f"{cal.same_fraction[t]:.3f})"
            for t in TERMS
            if SHIFT_KEYS[t] in keys
        )
        log(
            f"auto shifts (label-free calibration, {pseudo} pseudo-classes for "
            f"{n_clusters} clusters): {chosen_text}"
        )
    return cal


def calibrate_split(
    config: Any,
    n_segments: int,
    *,
    pseudo_classes: int | None = None,
    n_batches: int = 20,
    device: str | None = None,
    progress: bool = True,
) -> tuple[Calibration, int]:
    """Label-free shifts for the training split of ``config`` (``stego calibrate``).

    Opens (or builds) the split's feature cache and its ``train.knn_k`` neighbour table where
    training reads them, then runs :func:`calibrate_shifts` with the run's own sampling:
    ``train.num_neighbors``, ``loss.feature_samples``, ``loss.pointwise``, ``data.batch_size``
    and ``train.seed``. ``pseudo_classes``: default ``loss.auto_pseudo_classes``, else
    :func:`pseudo_class_count` of ``n_segments``. Returns the calibration and the pseudo-class
    count used.
    """
    from stego.device import resolve_device
    from stego.features.split import PreparedSplit
    from stego.models.backbone import build_backbone

    if n_segments < 2:
        raise StegoError(f"--clusters must be >= 2, got {n_segments}")
    pseudo = pseudo_classes or config.loss.auto_pseudo_classes or pseudo_class_count(n_segments)
    if pseudo < 2:
        raise StegoError(f"--pseudo-classes must be >= 2, got {pseudo}")
    m, d = config.model, config.data
    backbone = build_backbone(m.backbone, weights=m.weights, layer=m.layer)
    backbone.check_size(d.resolution, d.resolution)
    split = PreparedSplit.from_config(config, backbone)
    run = dict(
        device=resolve_device(device),
        batch_size=d.batch_size,
        num_workers=0,
        progress=progress,
    )
    cache = split.feature_cache(True, **run)
    nbrs = split.neighbor_table(config.train.knn_k, cache=cache, **run)
    cal = calibrate_shifts(
        cache,
        nbrs,
        pseudo,
        num_neighbors=config.train.num_neighbors,
        n_samples=config.loss.feature_samples,
        pointwise=config.loss.pointwise,
        batch_size=d.batch_size,
        n_batches=n_batches,
        seed=config.train.seed,
    )
    return cal, pseudo


def write_calibration(
    calibration: Calibration, out: str | Path, config: Any, n_segments: int, pseudo: int
) -> tuple[Path, Path]:
    """Write ``out/shifts.yaml`` (a ``loss:`` section for ``stego train --config``, headed by
    what it was computed from) and ``out/shift_histograms.png``; returns both paths."""
    import yaml

    from stego.atomic import atomic_write
    from stego.data import dataset_info

    d, m = config.data, config.model
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fragment: dict[str, dict[str, Any]] = shifts_config(calibration)
    if not config.loss.pointwise:  # the shifts hold for uncentred correlations only
        fragment["loss"]["pointwise"] = False
    where = f"{dataset_info(d.dataset).name}/{d.split}"
    layer = m.layer or "last"
    header = (
        f"# stego calibrate: {where}, {m.backbone} layer {layer}, res {d.resolution}, "
        f"K={n_segments}, {pseudo} pseudo-classes, seed {config.train.seed}\n"
        "# same-pseudo-class fractions: "
        + ", ".join(f"{t} {calibration.same_fraction[t]:.3f}" for t in TERMS)
        + "\n"
    )
    shifts = out / "shifts.yaml"
    with atomic_write(shifts, "w") as handle:
        handle.write(header + yaml.safe_dump(fragment, sort_keys=False))
    figure = histogram_figure(
        calibration,
        out / "shift_histograms.png",
        title=f"{where} {m.backbone} layer {layer}, K={n_segments}, {pseudo} pseudo-classes",
    )
    return shifts, figure


def histogram_figure(
    calibration: Calibration, path: str | Path, *, title: str = "", bins: int = 100
) -> Path:
    """Histograms of the three centred feature correlations with each shift marked (PNG).

    Rendered off-screen (Agg) into memory and written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from stego.atomic import atomic_write

    fig = Figure(figsize=(7, 3.2 * len(TERMS)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(TERMS), 1, sharex=True)
    for ax, term in zip(axes, TERMS, strict=True):
        fd = calibration.fd[term].float().numpy()
        shift = calibration.shifts[term]
        ax.hist(fd, bins=bins, color="0.6", density=True)
        ax.axvline(shift, color="tab:red", lw=2, label=f"shift {shift:.3f} ({SHIFT_KEYS[term]})")
        ax.set_title(
            f"{term}: {100 * calibration.same_fraction[term]:.1f}% same pseudo-class "
            f"pairs = share attracted (right of the line)",
            fontsize=9,
        )
        ax.legend(loc="upper left", fontsize=8)
    axes[-1].set_xlabel("centred feature correlation")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())
    return path
