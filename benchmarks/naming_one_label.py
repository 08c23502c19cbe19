"""Naming from ONE labelled image: ways to lift it or narrow its spread (issue 24, N = 1 target).

Reads the codes and features that ``benchmarks/naming.py`` cached for each held-out CamVid
sequence (run that first, same --work) and scores, for the same 3 random draws of N labelled
images, on the folder's other images (mIoU over the classes present there, void ignored):

- ``base``: the classifier of ``stego segment --labels`` (codes + features, L-BFGS);
- ``decay``: the same with a 100x stronger L2 penalty (1e-2), against over-fitting one image;
- ``vote11`` / ``vote44``: the classifier's class ids over the whole folder, then each of K
  label-free clusters takes its majority class (the clusters smooth the classifier);
- ``self``: self-training: the classifier's confident pixels (p > 0.9) of 32 other images of the
  folder added to the labelled ones, and the classifier fit again;
- ``left11`` / ``left44``: pixels of the label-free clusters that the labelled image hardly shows
  (< 0.5 % of its pixels) stay unnamed, counted wrong;
- ``left11-hand`` / ``left44-hand``: the same, the unnamed clusters then matched one-to-one to the
  classes no labelled pixel shows (Hungarian, on the scored images): what a person naming the
  leftover clusters by looking at them (``stego name --names``) would reach at best.

and, outside the random draws, ``pick``: the one image to label chosen without labels, the one
whose K label-free clusters are most evenly present (largest sum over clusters of the square
root of their pixel share), for K in 11, 22, 44; scored the same way (``base``'s classifier).

    python benchmarks/naming_one_label.py --folds 0006R0 0016E5 --out one_label.jsonl
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from naming import (
    N_CLASSES,
    cluster_maps,
    fit_clusters,
    inputs_of,
    probe_maps,
    sample_rows,
    truth,
)
from segment_folders import emit, fold_parser

VARIANTS = [
    "base", "decay", "vote11", "vote44", "self",
    "left11", "left11-hand", "left44", "left44-hand",
]  # fmt: skip
UNSEEN_SHARE = 0.005  # a cluster under this share of the labelled pixels is "not shown"
NONE = N_CLASSES  # prediction id of an unnamed pixel


def miou(preds: list[np.ndarray], targets: list[np.ndarray]) -> float:
    """Mean IoU (x100) over the classes present in ``targets`` (void -1 ignored); predictions
    may be ``NONE`` (unnamed: a miss for the true class, a false positive for none)."""
    pred = np.concatenate([p.ravel() for p in preds])
    target = np.concatenate([t.ravel() for t in targets])
    keep = target >= 0
    width = N_CLASSES + 1
    conf = np.bincount(target[keep] * width + pred[keep], minlength=N_CLASSES * width)
    conf = conf.reshape(N_CLASSES, width)[:, :N_CLASSES]  # rows truth, cols named prediction
    rows = np.bincount(target[keep], minlength=N_CLASSES)
    tp = np.diag(conf)
    iou = tp / np.maximum(rows + conf.sum(0) - tp, 1)
    return round(100 * float(iou[rows > 0].mean()), 2)


def fit(x: torch.Tensor, y: torch.Tensor, decay: float = 1e-4) -> torch.nn.Linear:
    from stego.models.pixel_classifier import fit_pixel_classifier

    return fit_pixel_classifier(x, y, code_dim=x.shape[1], n_classes=N_CLASSES, decay=decay).linear


@torch.no_grad()
def low_res_ids(layer: torch.nn.Linear, entry: dict) -> torch.Tensor:
    """(h, w) class ids at feature resolution, and the (C, h, w) probabilities."""
    maps = inputs_of(entry, "feat")
    logits = torch.einsum("dhw,cd->chw", maps, layer.weight) + layer.bias[:, None, None]
    return logits.softmax(0)


def vote(layer, codes, centroids, rest) -> list[np.ndarray]:
    """Each cluster takes the majority of the classifier's ids over the folder's pixels."""
    unit = F.normalize(centroids, dim=1)
    counts = np.zeros((len(centroids), N_CLASSES))
    for entry in codes:
        clusters = torch.einsum("dhw,kd->khw", entry["code"], unit).argmax(0).numpy().ravel()
        ids = low_res_ids(layer, entry).argmax(0).numpy().ravel()
        np.add.at(counts, (clusters, ids), 1)
    mapping = counts.argmax(1)
    return [mapping[c] for c in cluster_maps([codes[i] for i in rest], centroids)]


def self_train(layer, x, y, codes) -> torch.nn.Linear:
    """Refit on the labelled pixels plus up to 500 confident pixels of 32 other images."""
    rng = np.random.default_rng(0)
    xs, ys = [x], [y]
    for i in rng.choice(len(codes), size=min(32, len(codes)), replace=False):
        maps = inputs_of(codes[i], "feat").flatten(1).T  # (h*w, D)
        conf, ids = low_res_ids(layer, codes[i]).flatten(1).max(0)
        keep = (conf > 0.9).nonzero()[:, 0]
        if len(keep) > 500:
            keep = keep[torch.from_numpy(rng.choice(len(keep), size=500, replace=False))]
        xs.append(maps[keep])
        ys.append(ids[keep])
    return fit(torch.cat(xs), torch.cat(ys))


def leftovers(preds, codes, labels, centroids, chosen, rest, hand: bool) -> list[np.ndarray]:
    """``preds`` with the pixels of clusters the labelled images hardly show unnamed (or, with
    ``hand``, named after the unshown class they best match one-to-one)."""
    from scipy.optimize import linear_sum_assignment

    k = len(centroids)
    labelled = cluster_maps([codes[i] for i in chosen], centroids)
    shown_clusters = np.concatenate([c.ravel() for c in labelled])
    share = np.bincount(shown_clusters, minlength=k) / shown_clusters.size
    unseen = np.flatnonzero(share < UNSEEN_SHARE)
    rest_clusters = cluster_maps([codes[i] for i in rest], centroids)
    shown = set(np.concatenate([labels[i].ravel() for i in chosen]).tolist()) - {-1}
    unshown = [c for c in range(N_CLASSES) if c not in shown]
    mapping: dict[int, int] = {}
    if hand and len(unseen) and unshown:
        overlap = np.zeros((len(unseen), len(unshown)))
        for clusters, target in zip(rest_clusters, (labels[i] for i in rest), strict=True):
            for row, cluster in enumerate(unseen):
                found = target[clusters == cluster]
                found = found[found >= 0]
                overlap[row] += np.bincount(found, minlength=N_CLASSES)[unshown]
        rows, cols = linear_sum_assignment(-overlap)
        mapping = {int(unseen[r]): unshown[c] for r, c in zip(rows, cols, strict=True)}
    out = []
    for pred, clusters in zip(preds, rest_clusters, strict=True):
        named = pred.copy()
        for cluster in unseen:
            named[clusters == cluster] = mapping.get(int(cluster), NONE)
        out.append(named)
    return out


def score(variant: str, codes, labels, centroids, chosen, rng) -> float:
    rest = [i for i in range(len(codes)) if i not in chosen]
    x, y = sample_rows([codes[i] for i in chosen], [labels[i] for i in chosen], "feat", rng)
    layer = fit(x, y, decay=1e-2 if variant == "decay" else 1e-4)
    if variant.startswith("vote"):
        preds = vote(layer, codes, centroids[int(variant[4:])], rest)
    else:
        if variant == "self":
            layer = self_train(layer, x, y, codes)
        preds = probe_maps(layer, [codes[i] for i in rest], "feat")
        if variant.startswith("left"):
            k = int(variant[4:6])
            preds = leftovers(preds, codes, labels, centroids[k], chosen, rest, "hand" in variant)
    return miou(preds, [labels[i] for i in rest])


def cluster_shares(codes: list[dict], centroids: torch.Tensor) -> np.ndarray:
    """(images, K) share of each image's feature-resolution pixels in each cluster."""
    unit = F.normalize(centroids, dim=1)
    rows = []
    for entry in codes:
        ids = torch.einsum("dhw,kd->khw", entry["code"], unit).argmax(0).numpy().ravel()
        rows.append(np.bincount(ids, minlength=len(centroids)) / ids.size)
    return np.stack(rows)


def picked(args: Any, prefix: str, seed: int, codes, labels, paths, centroids) -> None:
    """``pick``: the image whose clusters are most evenly present, labelled alone."""
    for k, cents in centroids.items():
        best = int(np.sqrt(cluster_shares(codes, cents)).sum(1).argmax())
        rest = [i for i in range(len(codes)) if i != best]
        rng = np.random.default_rng(0)
        x, y = sample_rows([codes[best]], [labels[best]], "feat", rng)
        preds = probe_maps(fit(x, y), [codes[i] for i in rest], "feat")
        record = {
            "fold": prefix, "seed": seed, "labelled": 1, "variant": f"pick{k}",
            "image": paths[best].name, "miou": miou(preds, [labels[i] for i in rest]),
        }  # fmt: skip
        emit(record, args.out)


def fold(args: Any, prefix: str, seed: int) -> None:
    work, data_root = Path(args.work), Path(args.data_root)
    cache = work / "runs" / f"{prefix}_s{seed}" / "codes.pt"
    if not cache.is_file():
        raise SystemExit(f"{cache} is missing: run benchmarks/naming.py --work {work} first")
    codes = torch.load(cache)
    paths = sorted((work / "folds" / prefix).iterdir())
    labels = [truth(p, data_root) for p in paths]
    centroids = {k: fit_clusters(codes, k, seed) for k in (11, 22, 44)}
    if args.pick:
        picked(args, prefix, seed, codes, labels, paths, centroids)
    for n in args.labelled:
        for variant in args.variants:
            draws = []
            for draw in range(args.draws):  # the draws of benchmarks/naming.py
                rng = np.random.default_rng(1000 * draw + n)
                chosen = sorted(rng.choice(len(paths), size=n, replace=False).tolist())
                draws.append(score(variant, codes, labels, centroids, chosen, rng))
            record = {
                "fold": prefix, "seed": seed, "labelled": n, "variant": variant,
                "miou": round(float(np.mean(draws)), 2), "draws": draws,
                "spread": round(max(draws) - min(draws), 2),
            }  # fmt: skip
            emit(record, args.out)


def main() -> None:
    parser = fold_parser(__doc__, "/tmp/stego-bench/naming")
    parser.add_argument("--labelled", type=int, nargs="+", default=[1])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--variants", nargs="*", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--pick", action="store_true", help="also score the `pick` rule")
    args = parser.parse_args()
    for prefix in args.folds:
        for seed in args.seeds:
            fold(args, prefix, seed)


if __name__ == "__main__":
    main()
