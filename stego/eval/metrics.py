"""Unsupervised segmentation metrics: confusion matrix, Hungarian matching, IoU and accuracy.

One confusion matrix is accumulated over the WHOLE evaluation set (rows = predicted cluster,
columns = true class), then clusters are matched to classes once (Hungarian, maximising the
matched pixels) and IoU / accuracy are read off the matched matrix. All scores are x100.

Two counting rules:

* ``"strict"`` (default): pixels predicted as a cluster that is not matched to any class (an
  "extra" cluster when ``extra_clusters > 0``) stay in the counts and are errors: they add to
  the false negatives of their true class and to no true positive. Predictions outside
  ``[0, n_clusters)`` are a bug and raise :class:`~stego.errors.StegoError`.
* ``"original"``: the original STEGO code's behaviour, kept only to reproduce its numbers.
  Pixels whose prediction is outside ``[0, n_classes)`` (every extra cluster included) are
  silently dropped, which inflates the scores of over-clustered models.

In both rules pixels whose target is outside ``[0, n_classes)`` (e.g. ``-1`` or ``255``) are
ignored. Use :class:`UnsupervisedMetrics` (a ``torchmetrics.Metric``, state summed across
processes) to accumulate over batches, or :func:`unsupervised_scores` for one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, overload

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchmetrics import Metric

from stego.errors import StegoError

__all__ = [
    "Rule",
    "Scores",
    "UnsupervisedMetrics",
    "confusion_matrix",
    "map_clusters",
    "original_scores",
    "scores_from_confusion",
    "supervised_scores",
    "unsupervised_scores",
]

Rule = Literal["strict", "original"]
_RULES = ("strict", "original")
ArrayLike = Tensor | np.ndarray


@dataclass(frozen=True)
class Scores:
    """Scores of one evaluation (percentages are x100).

    Attributes:
        accuracy: matched-correct pixels / all counted pixels, x100.
        miou: mean of the non-NaN entries of ``iou``.
        iou: (n_classes,) float64 per-class IoU x100, NaN where a class is absent from both
            targets and matched predictions. (Rule "original" with extra clusters: (n+1,)
            float32 with a trailing NaN, exactly as the original computed it.)
        assignment: (n_clusters,) int64, the class each cluster is matched to, -1 if unmatched.
        confusion: (n_clusters, n_classes) int64, rows = predicted cluster, cols = true class.
        histogram: (n_classes, n_classes) matched confusion, row k = pixels predicted as the
            cluster(s) matched to class k. (Rule "original" with extra clusters: the original's
            (n+1, n+1) float32 matrix.)
        n_pixels: number of pixels counted in ``confusion``.
        rule: the counting rule that produced these scores.
    """

    accuracy: float
    miou: float
    iou: np.ndarray
    assignment: np.ndarray
    confusion: np.ndarray
    histogram: np.ndarray
    n_pixels: int
    rule: str = "strict"


def _check_rule(rule: str) -> None:
    if rule not in _RULES:
        raise StegoError(f"unknown metrics rule {rule!r}; use one of {', '.join(_RULES)}")


def _as_int_tensor(x: ArrayLike, what: str) -> Tensor:
    t = torch.from_numpy(np.asarray(x)) if not isinstance(x, Tensor) else x
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise StegoError(
            f"{what} must hold integer ids, got dtype {t.dtype}; take the argmax over the "
            "class/cluster axis first (e.g. probs.argmax(1))"
        )
    return t.to(torch.int64)


def _confusion_torch(
    preds: ArrayLike, targets: ArrayLike, n_classes: int, n_clusters: int, rule: str
) -> Tensor:
    """(n_clusters, n_classes) int64 confusion on the preds' device (see confusion_matrix)."""
    _check_rule(rule)
    if n_classes < 1 or n_clusters < 1:
        raise StegoError(f"n_classes and n_clusters must be >= 1, got {n_classes}, {n_clusters}")
    p = _as_int_tensor(preds, "preds")
    t = _as_int_tensor(targets, "targets").to(p.device)
    if p.shape != t.shape:
        raise StegoError(
            f"preds shape {tuple(p.shape)} != targets shape {tuple(t.shape)}; upsample the "
            "predictions to the label resolution before scoring"
        )
    p, t = p.reshape(-1), t.reshape(-1)  # (N,)
    keep = (t >= 0) & (t < n_classes)
    if rule == "strict":
        bad = (p < 0) | (p >= n_clusters)
        if bool(bad.any()):
            lo, hi = int(p.min()), int(p.max())
            raise StegoError(
                f"predictions must lie in [0, {n_clusters}) (n_classes + extra_clusters), got "
                f"values in [{lo}, {hi}]; raise extra_clusters or fix the predictions"
            )
    else:
        keep &= (p >= 0) & (p < n_classes)
    flat = p[keep] * n_classes + t[keep]  # (M,) cell index row-major
    counts = torch.bincount(flat, minlength=n_clusters * n_classes)
    return counts.reshape(n_clusters, n_classes)


@overload
def confusion_matrix(
    preds: Tensor, targets: ArrayLike, n_classes: int, n_clusters: int, *, rule: Rule = ...
) -> Tensor: ...
@overload
def confusion_matrix(
    preds: np.ndarray, targets: ArrayLike, n_classes: int, n_clusters: int, *, rule: Rule = ...
) -> np.ndarray: ...
def confusion_matrix(
    preds: ArrayLike, targets: ArrayLike, n_classes: int, n_clusters: int, *, rule: Rule = "strict"
) -> ArrayLike:
    """Count (predicted cluster, true class) pairs.

    Args:
        preds: integer cluster ids, any shape (e.g. (B, H, W)).
        targets: integer class ids, same shape; values outside [0, n_classes) are ignored.
        n_classes: number of classes n.
        n_clusters: number of clusters (n + extra clusters).
        rule: "strict" keeps every cluster row and raises on ids outside [0, n_clusters);
            "original" drops pixels whose prediction is outside [0, n_classes).

    Returns:
        (n_clusters, n_classes) int64, a tensor on preds' device if preds is a tensor, else a
        numpy array.
    """
    out = _confusion_torch(preds, targets, n_classes, n_clusters, rule)
    return out if isinstance(preds, Tensor) else out.cpu().numpy()


def _hungarian(confusion: np.ndarray) -> np.ndarray:
    """(n_clusters,) int64 cluster -> class (-1 unmatched), maximising matched pixels."""
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    assignment = np.full(confusion.shape[0], -1, dtype=np.int64)
    assignment[rows] = cols
    return assignment


def _identity(n_clusters: int, n_classes: int) -> np.ndarray:
    ids = np.arange(n_clusters, dtype=np.int64)
    return np.where(ids < n_classes, ids, -1)


def _check_confusion(confusion: ArrayLike) -> np.ndarray:
    conf = confusion.detach().cpu().numpy() if isinstance(confusion, Tensor) else confusion
    conf = np.asarray(conf)
    if conf.ndim != 2 or not np.issubdtype(conf.dtype, np.integer):
        raise StegoError(
            f"confusion must be a 2-D integer matrix (n_clusters, n_classes), got shape "
            f"{conf.shape} dtype {conf.dtype}; build it with stego.eval.metrics.confusion_matrix"
        )
    if conf.sum() == 0:
        raise StegoError(
            "no pixel was counted: every target is outside [0, n_classes) (or, rule "
            "'original', every prediction is); check n_classes and the label ignore value"
        )
    return conf.astype(np.int64)


def scores_from_confusion(
    confusion: ArrayLike, *, rule: Rule = "strict", assignment: np.ndarray | None = None
) -> Scores:
    """Scores from an accumulated confusion matrix.

    Args:
        confusion: (n_clusters, n_classes) integer counts, rows = cluster, cols = class.
        rule: "strict" (unmatched clusters' pixels are errors) or "original" (parity only,
            see :func:`original_scores`; the confusion must then come from rule "original").
        assignment: (n_clusters,) cluster -> class, -1 for unmatched; None = Hungarian.
            Several clusters may map to the same class (their rows are summed).

    Returns:
        :class:`Scores`.
    """
    _check_rule(rule)
    conf = _check_confusion(confusion)
    n_clusters, n_classes = conf.shape
    if rule == "original":
        return original_scores(conf, assignment=assignment)
    if assignment is None:
        assign = _hungarian(conf)
    else:
        assign = np.asarray(assignment, dtype=np.int64)
        if assign.shape != (n_clusters,) or assign.min() < -1 or assign.max() >= n_classes:
            raise StegoError(
                f"assignment must be ({n_clusters},) with values in [-1, {n_classes}), got "
                f"shape {assign.shape}; use -1 for clusters matched to no class"
            )
    histogram = np.zeros((n_classes, n_classes), dtype=np.int64)  # (matched class, class)
    matched = assign >= 0
    np.add.at(histogram, assign[matched], conf[matched])
    tp = np.diag(histogram).astype(np.float64)  # (n,)
    per_class = conf.sum(0)  # all counted pixels of each class, unmatched clusters included
    predicted = histogram.sum(1)  # pixels predicted as (a cluster matched to) class k
    union = (per_class + predicted - tp).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan) * 100.0
    n_pixels = int(conf.sum())
    return Scores(
        accuracy=float(tp.sum() / n_pixels * 100.0),
        miou=float(np.nanmean(iou)),
        iou=iou,
        assignment=assign,
        confusion=conf,
        histogram=histogram,
        n_pixels=n_pixels,
        rule="strict",
    )


def original_scores(confusion: ArrayLike, *, assignment: np.ndarray | None = None) -> Scores:
    """The original STEGO ``UnsupervisedMetrics.compute`` (only for parity with its numbers).

    Reproduces its float32 arithmetic and, with extra clusters, its odd histogram: rows of the
    confusion picked by a second Hungarian matching on the transpose, plus one row summing the
    unmatched clusters, plus one zero column -> (n+1, n+1) float32, whose last IoU is NaN.
    Unmatched clusters' pixels never count as errors here. ``assignment`` given = the
    original's ``compute_hungarian=False`` (it then scores the confusion's first n rows).

    Args:
        confusion: (n_clusters, n_classes) counts built with rule "original".
        assignment: None for Hungarian, else the identity is assumed (linear probe).
    """
    conf = _check_confusion(confusion)
    n_clusters, n_classes = conf.shape
    if assignment is not None:
        assign = _identity(n_clusters, n_classes)
        histogram = conf
    else:
        rows, cols = linear_sum_assignment(conf, maximize=True)
        assign = np.full(n_clusters, -1, dtype=np.int64)
        assign[rows] = cols
        if n_clusters == n_classes:
            histogram = conf[np.argsort(cols)]
        else:
            _, t_cols = linear_sum_assignment(conf.T, maximize=True)
            missing = np.setdiff1d(np.arange(n_clusters), rows)
            rest = conf[missing].sum(0, keepdims=True)  # (1, n)
            histogram = np.concatenate([conf[t_cols], rest], axis=0)  # (n+1, n)
            zeros = np.zeros((n_classes + 1, 1), dtype=np.float32)
            histogram = np.concatenate([histogram.astype(np.float32), zeros], axis=1)
    h = torch.from_numpy(np.ascontiguousarray(histogram))
    tp = torch.diag(h)
    fp = h.sum(0) - tp
    fn = h.sum(1)[: tp.numel()] - tp
    iou = tp / (tp + fp + fn)  # float32 (int64 / int64 promotes to the default float)
    miou = iou[~torch.isnan(iou)].mean().item()
    accuracy = (tp.sum() / h.sum()).item()
    return Scores(
        accuracy=100 * accuracy,
        miou=100 * miou,
        iou=iou.numpy() * np.float32(100),
        assignment=assign,
        confusion=conf,
        histogram=np.asarray(histogram),
        n_pixels=int(conf.sum()),
        rule="original",
    )


def unsupervised_scores(
    preds: ArrayLike,
    targets: ArrayLike,
    n_classes: int,
    *,
    extra_clusters: int = 0,
    rule: Rule = "strict",
) -> Scores:
    """Cluster-probe scores: confusion over all pixels, Hungarian matching, IoU, accuracy.

    Args:
        preds: integer cluster ids in [0, n_classes + extra_clusters), any shape.
        targets: integer class ids, same shape; outside [0, n_classes) = ignored.
        n_classes: number of classes.
        extra_clusters: clusters beyond n_classes (they stay unmatched).
        rule: "strict" or "original" (see the module docstring).
    """
    if extra_clusters < 0:
        raise StegoError(f"extra_clusters must be >= 0, got {extra_clusters}")
    n_clusters = n_classes + extra_clusters
    conf = _confusion_torch(preds, targets, n_classes, n_clusters, rule).cpu().numpy()
    return scores_from_confusion(conf, rule=rule)


def supervised_scores(
    preds: ArrayLike, targets: ArrayLike, n_classes: int, *, rule: Rule = "strict"
) -> Scores:
    """Linear-probe scores: like :func:`unsupervised_scores` with the identity assignment.

    Args:
        preds: integer class ids in [0, n_classes), any shape.
        targets: integer class ids, same shape; outside [0, n_classes) = ignored.
    """
    conf = _confusion_torch(preds, targets, n_classes, n_classes, rule).cpu().numpy()
    return scores_from_confusion(conf, rule=rule, assignment=_identity(n_classes, n_classes))


@overload
def map_clusters(preds: Tensor, assignment: ArrayLike) -> Tensor: ...
@overload
def map_clusters(preds: np.ndarray, assignment: ArrayLike) -> np.ndarray: ...
def map_clusters(preds: ArrayLike, assignment: ArrayLike) -> ArrayLike:
    """Replace each cluster id by its matched class id (-1 for unmatched clusters).

    Args:
        preds: integer cluster ids in [0, len(assignment)), any shape.
        assignment: (n_clusters,) cluster -> class, e.g. ``Scores.assignment``.

    Returns:
        class ids, same shape and type (tensor on the same device, or numpy) as preds.
    """
    p = _as_int_tensor(preds, "preds")
    a = torch.as_tensor(np.asarray(assignment), dtype=torch.int64, device=p.device)
    if p.numel() and (int(p.min()) < 0 or int(p.max()) >= a.numel()):
        raise StegoError(
            f"cluster ids must lie in [0, {a.numel()}) to be mapped, got values in "
            f"[{int(p.min())}, {int(p.max())}]"
        )
    out = a[p]
    return out if isinstance(preds, Tensor) else out.cpu().numpy()


class UnsupervisedMetrics(Metric):
    """Accumulate a confusion matrix over batches; Hungarian matching at ``compute``.

    The state ``confusion`` ((n_classes + extra_clusters, n_classes) int64) is summed across
    processes (``dist_reduce_fx="sum"``), so distributed evaluation scores the whole set.
    Call ``update`` per batch (``forward`` would run a matching per batch), then ``compute()``
    for a dict of tensors (for loggers) or ``scores()`` for a :class:`Scores`.

    Args:
        n_classes: number of classes.
        extra_clusters: clusters beyond n_classes.
        rule: "strict" (default) or "original" (parity with the original code).
        hungarian: False = identity assignment (linear probe; then extra_clusters must be 0).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    confusion: Tensor

    def __init__(
        self,
        n_classes: int,
        *,
        extra_clusters: int = 0,
        rule: Rule = "strict",
        hungarian: bool = True,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        _check_rule(rule)
        if n_classes < 1 or extra_clusters < 0:
            raise StegoError(
                f"need n_classes >= 1 and extra_clusters >= 0, got {n_classes}, {extra_clusters}"
            )
        if not hungarian and extra_clusters:
            raise StegoError("hungarian=False (linear probe) needs extra_clusters=0")
        self.n_classes = n_classes
        self.extra_clusters = extra_clusters
        self.rule: Rule = rule
        self.hungarian = hungarian
        n_clusters = n_classes + extra_clusters
        self.add_state(
            "confusion",
            default=torch.zeros(n_clusters, n_classes, dtype=torch.int64),
            dist_reduce_fx="sum",
        )
        self._scores: Scores | None = None

    def update(self, preds: Tensor, targets: Tensor) -> None:  # type: ignore[override]
        """Add a batch: preds (B, H, W) cluster ids, targets (B, H, W) class ids."""
        p = _as_int_tensor(preds, "preds").to(self.confusion.device)
        n_clusters = self.n_classes + self.extra_clusters
        self.confusion += _confusion_torch(p, targets, self.n_classes, n_clusters, self.rule)

    def compute(self) -> dict[str, Tensor]:
        """{"accuracy": (), "miou": (), "iou": (n,), "assignment": (n_clusters,)} tensors."""
        assignment = None if self.hungarian else _identity(self.n_classes, self.n_classes)
        self._scores = scores_from_confusion(self.confusion, rule=self.rule, assignment=assignment)
        s = self._scores
        return {
            "accuracy": torch.tensor(s.accuracy, dtype=torch.float64),
            "miou": torch.tensor(s.miou, dtype=torch.float64),
            "iou": torch.from_numpy(np.asarray(s.iou, dtype=np.float64)),
            "assignment": torch.from_numpy(s.assignment),
        }

    def scores(self) -> Scores:
        """The full :class:`Scores` of everything accumulated (synchronised across processes)."""
        self.compute()  # sets self._scores (torchmetrics caches it until the next update)
        assert self._scores is not None
        return self._scores
