"""Other ways to cluster a folder's codes than spherical k-means (issue #14, eighth session).

``stego segment`` labels a folder by spherical k-means (K clusters) on the flip-averaged codes of
64 seeded images. This script trains that head on each held-out CamVid train sequence (as
``checkpoint_signals.py`` does, whose run folders it reuses), computes the folder's codes once,
and labels the folder with each variant, all fit on the same 64 images' codes:

- ``kmeans``: the command's own clustering (the reference row);
- ``gmm``: a full-covariance Gaussian mixture started from the k-means partition (20 EM steps);
- ``merge_avg``: over-cluster to 44 by k-means, merge the centroids to K by average linkage;
- ``merge_adjacency``: over-cluster to 22, merge by spectral clustering of how often two
  over-clusters touch on the patch grid (neighbouring patches of one image);
- ``knn_spectral``: spectral clustering of a 10-nearest-neighbour graph of 20k codes, each code
  then labelled by the mean code of its spectral cluster;
- ``raw8_kmeans`` / ``raw8_merge_avg``: the same two on raw block-8 backbone features (no head);
- ``oracle_<K'>``: a ceiling that USES THE LABELS (diagnostic only): k-means with K' clusters,
  each cluster given its majority class.

    python benchmarks/cluster_variants.py --folds 0006R0 0016E5 --seeds 0 1 --out variants.jsonl

The Gaussian mixture and the spectral steps are written here (numpy / scipy) rather than taken
from scikit-learn, which the project does not otherwise depend on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from checkpoint_signals import WORK, folder_features, train_with_checkpoints
from segment_folders import N_CLASSES, emit, fold_parser, link_fold

Scorer = Callable[[torch.Tensor], torch.Tensor]  # unit codes (N, D) -> scores (N, K)


def kmeans(rows: torch.Tensor, k: int, seed: int, restarts: int = 10) -> torch.Tensor:
    """Unit centroids (k, D) of spherical k-means on rows (N, D)."""
    from stego.models.probes import spherical_kmeans

    g = torch.Generator().manual_seed(seed)
    return F.normalize(spherical_kmeans(rows, k, n_restarts=restarts, generator=g).centroids, dim=1)


def nearest(centroids: torch.Tensor, groups: np.ndarray | None = None) -> Scorer:
    """Scores by cosine to centroids; with ``groups`` (K',) the over-clusters' merged ids."""
    if groups is None:
        return lambda z: z @ centroids.T
    onehot = F.one_hot(torch.as_tensor(groups, dtype=torch.long), N_CLASSES).float()
    return lambda z: onehot[(z @ centroids.T).argmax(1)]


def gmm(rows: torch.Tensor, start: torch.Tensor, steps: int = 20, ridge: float = 1e-3) -> Scorer:
    """Full-covariance Gaussian mixture on rows (N, D), EM started from the partition of rows
    by the centroids ``start`` (K, D). Returns the log-density scorer of the last step."""
    x = rows.double()
    resp = F.one_hot((rows @ start.T).argmax(1), len(start)).double()  # (N, K)
    eye = ridge * torch.eye(x.shape[1], dtype=x.dtype)
    for _ in range(steps):
        mass = resp.sum(0) + 1e-9
        means = resp.T @ x / mass[:, None]
        covs = [
            (resp[:, k : k + 1] * (x - means[k])).T @ (x - means[k]) / mass[k] + eye
            for k in range(len(start))
        ]
        chol, log_prior = torch.linalg.cholesky(torch.stack(covs)), (mass / len(x)).log()

        def log_density(z: torch.Tensor, means=means, chol=chol, log_prior=log_prior):
            z = z.double()
            out = []
            for k in range(len(means)):
                y = torch.linalg.solve_triangular(chol[k], (z - means[k]).T, upper=False)
                logdet = chol[k].diagonal().log().sum()
                out.append(-0.5 * (y**2).sum(0) - logdet + log_prior[k])
            return torch.stack(out, 1).float()

        resp = torch.softmax(log_density(x).double(), dim=1)
    return log_density


def spectral_labels(affinity, k: int, seed: int) -> np.ndarray:
    """Normalised spectral clustering of a symmetric affinity (n, n) (dense or scipy sparse):
    top-k eigenvectors of D^-1/2 W D^-1/2, rows normalised, then spherical k-means."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import eigsh

    from stego.models.probes import spherical_kmeans

    w = sp.csr_matrix(affinity)
    inv = sp.diags(1 / np.sqrt(np.asarray(w.sum(1)).ravel() + 1e-12))
    _, vectors = eigsh(inv @ w @ inv, k=k, which="LA")
    vectors = torch.tensor(vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).float()
    g = torch.Generator().manual_seed(seed)
    return spherical_kmeans(vectors, k, n_restarts=10, generator=g).labels.numpy()


def merge_average(centroids: torch.Tensor) -> np.ndarray:
    """Merged id (K',) of each over-cluster: average linkage on centroid cosine, cut at K."""
    from scipy.cluster.hierarchy import fcluster, linkage

    tree = linkage(centroids.numpy(), method="average", metric="cosine")
    return fcluster(tree, N_CLASSES, criterion="maxclust") - 1


def merge_adjacency(centroids: torch.Tensor, grids: list[torch.Tensor], seed: int) -> np.ndarray:
    """Merged id (K',) of each over-cluster by spectral clustering of their contact counts on the
    patch grids (each (D, h, w)), normalised by sqrt(size_a * size_b)."""
    k = len(centroids)
    contacts, sizes = np.zeros((k, k)), np.zeros(k)
    for grid in grids:
        ids = torch.einsum("dhw,kd->khw", F.normalize(grid, dim=0), centroids).argmax(0).numpy()
        sizes += np.bincount(ids.ravel(), minlength=k)
        for a, b in ((ids[:, 1:], ids[:, :-1]), (ids[1:], ids[:-1])):
            np.add.at(contacts, (a.ravel(), b.ravel()), 1)
    contacts = contacts + contacts.T
    np.fill_diagonal(contacts, 0)
    affinity = contacts / np.sqrt(np.outer(sizes, sizes) + 1e-9) + 1e-6
    return spectral_labels(affinity, N_CLASSES, seed)


def knn_spectral(rows: torch.Tensor, seed: int, n: int = 20000, k: int = 10) -> Scorer:
    """Spectral clustering of a k-NN cosine graph of n sampled rows; scores by the clusters'
    mean codes."""
    import scipy.sparse as sp

    sample = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n]]
    sims, idx = (sample @ sample.T).topk(k + 1, dim=1)
    rows_idx = np.repeat(np.arange(len(sample)), k)
    values = sims[:, 1:].clamp_min(0).flatten().numpy()
    graph = sp.csr_matrix((values, (rows_idx, idx[:, 1:].flatten().numpy())), (len(sample),) * 2)
    labels = torch.as_tensor(spectral_labels(graph.maximum(graph.T), N_CLASSES, seed))
    means = F.normalize(F.one_hot(labels, N_CLASSES).float().T @ sample, dim=1)
    return nearest(means)


def label_folder(codes: list[torch.Tensor], padded, scorer: Scorer) -> np.ndarray:
    """Flattened ids of every image: scores at the patch grid, upsampled as the segmenter does."""
    from stego.models.segmenter import _to_output_size

    out = []
    for code in codes:  # (1, D, h, w)
        _, _, h, w = code.shape
        unit = F.normalize(code[0].flatten(1).T, dim=1)
        scores = scorer(unit).T.reshape(1, -1, h, w)
        out.append(_to_output_size(scores, padded.padded_size, padded.own_size, None))
    return np.concatenate([o.max(1).indices.numpy().ravel() for o in out])


def variants(codes: list, raw: list, pick: list[int], truth: np.ndarray, padded, seed: int) -> dict:
    """mIoU of every variant on one folder."""
    from stego.eval.metrics import unsupervised_scores

    def miou(scorer: Scorer, source: list = codes) -> float:
        ids = label_folder(source, padded, scorer)
        return round(float(unsupervised_scores(ids, truth, N_CLASSES).miou), 2)

    def fit_rows(source: list) -> torch.Tensor:
        return F.normalize(torch.cat([source[i][0].flatten(1).T for i in pick]).float(), dim=1)

    rows, raw_rows = fit_rows(codes), fit_rows(raw)
    centroids, over44, over22 = (kmeans(rows, n, seed) for n in (N_CLASSES, 44, 22))
    grids = [codes[i][0].float() for i in pick]
    raw44 = kmeans(raw_rows, 44, seed)
    out = {
        "kmeans": miou(nearest(centroids)),
        "gmm": miou(gmm(rows, centroids)),
        "merge_avg": miou(nearest(over44, merge_average(over44))),
        "merge_adjacency": miou(nearest(over22, merge_adjacency(over22, grids, seed))),
        "knn_spectral": miou(knn_spectral(rows, seed)),
        "raw8_kmeans": miou(nearest(kmeans(raw_rows, N_CLASSES, seed)), raw),
        "raw8_merge_avg": miou(nearest(raw44, merge_average(raw44)), raw),
    }
    valid = truth < N_CLASSES
    for name, source, fit in (("", codes, rows), ("raw8_", raw, raw_rows)):
        for k in (11, 44, 88):
            ids = label_folder(source, padded, nearest(kmeans(fit, k, seed, restarts=3)))
            counts = np.zeros((k, N_CLASSES), np.int64)
            np.add.at(counts, (ids[valid], truth[valid]), 1)
            majority = counts.argmax(1)[ids]
            scores = unsupervised_scores(majority, truth, N_CLASSES)
            out[f"{name}oracle_{k}"] = round(float(scores.miou), 2)
    return out


def main() -> None:
    from PIL import Image

    import stego
    from stego.infer.predict import collect_images
    from stego.models.backbone import build_backbone

    args = fold_parser(__doc__, WORK).parse_args()
    data_root, work = Path(args.data_root), Path(args.work)
    for prefix in args.folds:
        folder = link_fold(data_root, prefix, work)
        names = [path.stem for path, _ in collect_images([folder])]
        labels = data_root / "labels" / "train"
        truth = np.concatenate([np.asarray(Image.open(labels / f"{n}.png")).ravel() for n in names])
        raw_feats = None
        for seed in args.seeds:
            run_dir = work / "runs" / f"{prefix}_s{seed}"  # checkpoint_signals.py's runs
            run, s = train_with_checkpoints(folder, run_dir, seed, 400, 400)
            model = stego.load(run / "model").eval()
            plain, mirrored, padded = folder_features(model, folder, s.predict_side)
            if raw_feats is None:  # raw block-8 features: no head, so one pass per folder
                block8 = SimpleNamespace(
                    backbone=build_backbone(s.backbone, layer=8).eval(), patch_size=model.patch_size
                )
                a8, b8, _ = folder_features(block8, folder, s.predict_side)
                pairs = zip(a8, b8, strict=True)
                raw_feats = [(a.float() + b.float().flip(-1)) / 2 for a, b in pairs]
            with torch.inference_mode():
                codes = [
                    (model.head(a.float()).code + model.head(b.float()).code.flip(-1)) / 2
                    for a, b in zip(plain, mirrored, strict=True)
                ]
            rng = np.random.default_rng(seed)  # the 64 images `stego segment` fits on
            pick = sorted(rng.choice(len(names), 64, replace=False).tolist())
            record = {"fold": prefix, "seed": seed}
            record.update(variants(codes, raw_feats, pick, truth.astype(np.int64), padded, seed))
            emit(record, args.out)


if __name__ == "__main__":
    main()
