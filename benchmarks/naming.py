"""Naming clusters from a few labels, on CamVid train sequences `stego segment` has never seen.

Protocol (issue 24): each held-out sequence (0006R0, 0016E5) is a folder of its own; one STEGO
head is trained on it exactly as ``stego segment`` trains it (label-free defaults), and the codes
of every image are computed once as prediction computes them (own size, flip-averaged). Then,
for K in --clusters, the clusters are fit as ``stego segment`` fits them (spherical k-means, 10
restarts, on 64 images of the folder), and for N in --labelled, --draws random draws of N
labelled images of the folder name the clusters; the names are scored on the folder's other
images (mIoU over the classes present there, void ignored). Methods:

- ``majority``: each cluster takes its labelled pixels' majority class (`stego name`);
  clusters without labelled pixels take the class of the nearest labelled centroid;
- ``probe``: a linear classifier (multinomial logistic regression) fit on the labelled pixels'
  codes (the linear probe's machinery with few labels);
- ``probe-feat``: the same on the codes and the backbone features together;
- ``stego``: what ``stego segment --labels`` does, through the library: the classifier fit by
  :func:`stego.naming.classifier.fit_classifier_map` on the labelled images' files (their codes
  and features computed again, as prediction computes them), the other images' class ids by
  ``Segmenter.ids_from_code`` from the cached codes and features (``probe-feat``'s method, with
  the library's own pixel sampling: a check that what is built scores what was measured).

Beside them: ``hungarian`` (label-free: K=11 clusters matched to classes over the folder) and
``all-labels probe`` (the same linear classifier trained on the labelled images of the other
train sequences, every ``--other-every``-th, through this folder's model, scored on all of the
folder's images).

    python benchmarks/naming.py --folds 0006R0 0016E5 --out naming.jsonl
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from segment_folders import emit, fold_parser, link_fold

N_CLASSES = 11
VOID = 255
PIXELS_PER_IMAGE = 4000  # labelled pixels sampled per image to fit a classifier


# ----------------------------------------------------------------------------- codes


def train_head(folder: Path, out: Path, seed: int) -> Any:
    """The folder's model, trained as `stego segment` trains it; prediction is left to this
    script (the head and the fit clusters are all it needs from the run)."""
    import stego.folder_model as folder_model
    import stego.segment as segment
    from stego.infer import predict
    from stego.models.pretrained import load

    if not (out / "model" / "config.json").is_file():
        original = predict.predict_paths, folder_model.FOLDER_FIT_MIN_IMAGES
        predict.predict_paths = lambda *a, **k: predict.PredictSummary(out_dir=out)
        folder_model.FOLDER_FIT_MIN_IMAGES = 10**9  # the clusters are fit below, for each K
        try:
            segment.segment_folder(folder, out, clusters=N_CLASSES, seed=seed, progress=False)
        finally:
            predict.predict_paths, folder_model.FOLDER_FIT_MIN_IMAGES = original
    return load(out / "model")


@torch.no_grad()
def encode(model: Any, path: Path, with_feat: bool) -> dict[str, Any]:
    """Codes (D, h, w) (and backbone features (C, h, w), float16) of one image, flip-averaged,
    as prediction computes them (padded to the patch; CamVid's 480x360 is under the max side)."""
    from stego.data.transforms import pad_to_multiple
    from stego.infer.predict import read_image_rgb

    image = torch.from_numpy(read_image_rgb(path)).permute(2, 0, 1)[None].float() / 255.0
    padded = pad_to_multiple(image, model.patch_size, mode="replicate")
    x = padded.tensor
    feat, feat_flip = model.backbone(x).feat, model.backbone(x.flip(-1)).feat
    code = (model.head(feat).code + model.head(feat_flip).code.flip(-1)) / 2
    entry = {"code": code[0], "padded": tuple(x.shape[-2:]), "own": tuple(image.shape[-2:])}
    if with_feat:
        entry["feat"] = ((feat + feat_flip.flip(-1)) / 2)[0].half()
    return entry


def codes_of(model: Any, paths: list[Path], cache: Path, with_feat: bool) -> list[dict]:
    """:func:`encode` of every path, cached in ``cache``."""
    if cache.is_file():
        return torch.load(cache)
    model.eval()
    found = [encode(model, p, with_feat) for p in paths]
    torch.save(found, cache)
    return found


def truth(path: Path, data_root: Path) -> np.ndarray:
    """CamVid label (H, W) int64 of an image, void 255 -> -1."""
    label = np.asarray(Image.open(data_root / "labels" / "train" / f"{path.stem}.png"))
    return np.where(label == VOID, -1, label.astype(np.int64))


# ----------------------------------------------------------------------------- maps


def full_size(maps: torch.Tensor, entry: dict) -> torch.Tensor:
    """Maps (C, h, w) at feature resolution -> (C, H, W) at the image's size (bilinear)."""
    up = F.interpolate(maps[None].float(), size=entry["padded"], mode="bilinear")[0]
    return up[:, : entry["own"][0], : entry["own"][1]]


def cluster_maps(codes: list[dict], centroids: torch.Tensor) -> list[np.ndarray]:
    """Cluster ids (H, W) of every image: argmax of the cosine to unit ``centroids`` (K, D)."""
    unit = F.normalize(centroids, dim=1)
    return [
        full_size(torch.einsum("dhw,kd->khw", e["code"], unit), e).argmax(0).numpy() for e in codes
    ]


def fit_clusters(codes: list[dict], k: int, seed: int) -> torch.Tensor:
    """Centroids (K, D) as `stego segment` fits them: k-means on 64 images of the folder."""
    from stego.models.probes import ClusterProbe

    rng = np.random.default_rng(seed)
    pick = rng.choice(len(codes), size=min(64, len(codes)), replace=False)
    rows = torch.cat([codes[i]["code"].flatten(1).T for i in pick])
    probe = ClusterProbe(rows.shape[1], k)
    probe.fit_kmeans(rows, n_restarts=10, generator=torch.Generator().manual_seed(seed))
    return probe.clusters.detach().clone()


def miou_present(preds: list[np.ndarray], targets: list[np.ndarray]) -> float:
    """Mean IoU (x100) over the classes that occur in ``targets`` (void -1 ignored)."""
    pred = np.concatenate([p.ravel() for p in preds])
    target = np.concatenate([t.ravel() for t in targets])
    keep = target >= 0
    conf = np.bincount(
        target[keep] * N_CLASSES + pred[keep], minlength=N_CLASSES * N_CLASSES
    ).reshape(N_CLASSES, N_CLASSES)  # rows truth, cols prediction
    tp = np.diag(conf)
    present = conf.sum(1) > 0
    iou = tp / np.maximum(conf.sum(1) + conf.sum(0) - tp, 1)
    return round(100 * float(iou[present].mean()), 2)


# ----------------------------------------------------------------------------- naming methods


def majority(clusters: list[np.ndarray], labels: list[np.ndarray], centroids: torch.Tensor):
    """cluster -> class by `stego name`'s rule (:func:`stego.naming.majority_class_map`)."""
    import warnings

    from stego.naming import majority_class_map
    from stego.naming.labels import count_pairs

    k = len(centroids)
    counts = sum(count_pairs(c, t, k, N_CLASSES) for c, t in zip(clusters, labels, strict=True))
    names = [str(i) for i in range(N_CLASSES)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cmap = majority_class_map(counts, names, centroids.numpy(), labelled_images=1, source="")
    return np.asarray(cmap.mapping)


def sample_rows(
    codes: list[dict], labels: list[np.ndarray], key: str, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to PIXELS_PER_IMAGE labelled pixels per image: inputs (P, D) and classes (P,)."""
    xs, ys = [], []
    for entry, label in zip(codes, labels, strict=True):
        where = np.flatnonzero(label.ravel() >= 0)
        take = rng.choice(where, size=min(PIXELS_PER_IMAGE, where.size), replace=False)
        xs.append(
            at_pixels(inputs_of(entry, key), entry, take // label.shape[1], take % label.shape[1])
        )
        ys.append(torch.from_numpy(label.ravel()[take]))
    return torch.cat(xs), torch.cat(ys)


def at_pixels(maps: torch.Tensor, entry: dict, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
    """(P, D) values of maps (D, h, w) upsampled as :func:`full_size` does, at P pixels only
    (grid_sample with align_corners=False and border padding is the same bilinear rule)."""
    height, width = entry["padded"]
    gx = torch.from_numpy((2 * cols + 1) / width - 1).float()
    gy = torch.from_numpy((2 * rows + 1) / height - 1).float()
    grid = torch.stack([gx, gy], dim=-1)[None, None]  # (1, 1, P, 2)
    out = F.grid_sample(
        maps[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return out[0, :, 0].T


def inputs_of(entry: dict, key: str) -> torch.Tensor:
    """The classifier's input maps (D', h, w): unit codes, or unit codes and unit features."""
    code = F.normalize(entry["code"].float(), dim=0)
    if key == "code":
        return code
    return torch.cat([code, F.normalize(entry["feat"].float(), dim=0)])


def fit_probe(x: torch.Tensor, y: torch.Tensor) -> torch.nn.Linear:
    """Multinomial logistic regression on (P, D) -> classes, by L-BFGS (the library's
    :func:`stego.models.pixel_classifier.fit_pixel_classifier`); classes without samples get a
    bias of -1e4 so they are never predicted."""
    from stego.models.pixel_classifier import fit_pixel_classifier

    return fit_pixel_classifier(x, y, code_dim=x.shape[1], n_classes=N_CLASSES).linear


@torch.no_grad()
def probe_maps(layer: torch.nn.Linear, codes: list[dict], key: str) -> list[np.ndarray]:
    """Class ids (H, W) of images: the classifier at feature resolution, upsampled (a linear
    map commutes with bilinear interpolation)."""
    out = []
    for entry in codes:
        maps = inputs_of(entry, key)
        logits = torch.einsum("dhw,cd->chw", maps, layer.weight) + layer.bias[:, None, None]
        out.append(full_size(logits, entry).argmax(0).numpy())
    return out


# ----------------------------------------------------------------------------- protocol


def fold_records(args: Any, prefix: str, seed: int) -> list[dict]:
    data_root, work = Path(args.data_root), Path(args.work)
    folder = link_fold(data_root, prefix, work)
    run = work / "runs" / f"{prefix}_s{seed}"
    start = time.perf_counter()
    model = train_head(folder, run, seed)
    paths = sorted(folder.iterdir())
    codes = codes_of(model, paths, run / "codes.pt", with_feat=True)
    labels = [truth(p, data_root) for p in paths]
    base = {"fold": prefix, "seed": seed, "n_images": len(paths)}
    records = [{**base, "method": "encode", "seconds": round(time.perf_counter() - start, 1)}]
    emit(records[0], args.out)
    if args.baselines:
        records += hungarian(codes, labels, base, args.out)
    for k in args.clusters:
        centroids = fit_clusters(codes, k, seed)
        clusters = cluster_maps(codes, centroids)
        for n in args.labelled:
            for draw in range(args.draws):
                rng = np.random.default_rng(1000 * draw + n)
                chosen = set(rng.choice(len(paths), size=n, replace=False).tolist())
                records += score_draw(codes, labels, clusters, centroids, chosen, rng, args.methods)
                if "stego" in args.methods:
                    records.append(library_draw(model, paths, data_root, codes, labels, chosen))
                for r in records[-len(args.methods) :]:  # "stego" last, as appended
                    r.update({**base, "clusters": k, "labelled": n, "draw": draw})
                    emit(r, args.out)
    if args.baselines:
        records += all_labels_probe(args, model, run, codes, labels, base, prefix)
    return records


def hungarian(codes: list[dict], labels: list[np.ndarray], base: dict, out: str | None):
    """The label-free score: K=11 clusters matched to the classes over the whole folder."""
    from stego.eval.metrics import unsupervised_scores

    centroids = fit_clusters(codes, N_CLASSES, base["seed"])
    clusters = cluster_maps(codes, centroids)
    flat = np.concatenate([c.ravel() for c in clusters])
    target = np.concatenate([t.ravel() for t in labels])
    scores = unsupervised_scores(flat, np.where(target < 0, VOID, target), N_CLASSES)
    record = {**base, "method": "hungarian", "clusters": 11, "miou": round(float(scores.miou), 2)}
    emit(record, out)
    return [record]


def all_labels_probe(args, model, run, codes, labels, base, prefix) -> list[dict]:
    """The linear classifier trained on the labelled images of the other sequences."""
    others = sorted(
        p
        for p in (Path(args.data_root) / "images" / "train").iterdir()
        if not p.name.startswith(prefix)
    )[:: args.other_every]
    other_codes = codes_of(model, others, run / "other_codes.pt", with_feat=False)
    other_labels = [truth(p, Path(args.data_root)) for p in others]
    x, y = sample_rows(other_codes, other_labels, "code", np.random.default_rng(0))
    layer = fit_probe(x, y)
    preds = probe_maps(layer, codes, "code")
    record = {
        **base,
        "method": "all-labels probe",
        "train_images": len(others),
        "miou": miou_present(preds, labels),
    }
    emit(record, args.out)
    return [record]


def score_draw(codes, labels, clusters, centroids, chosen, rng, methods) -> list[dict]:
    """One draw of labelled images: every method's mIoU on the other images of the folder."""
    rest = [i for i in range(len(codes)) if i not in chosen]
    picked = sorted(chosen)
    targets = [labels[i] for i in rest]
    records = []
    for method in (m for m in methods if m != "stego"):
        if method == "majority":
            mapping = majority(
                [clusters[i] for i in picked], [labels[i] for i in picked], centroids
            )
            preds = [mapping[clusters[i]] for i in rest]
        else:
            key = "code" if method == "probe" else "feat"
            x, y = sample_rows([codes[i] for i in picked], [labels[i] for i in picked], key, rng)
            preds = probe_maps(fit_probe(x, y), [codes[i] for i in rest], key)
        shown = sorted(set(np.concatenate([labels[i].ravel() for i in picked]).tolist()) - {-1})
        records.append(
            {"method": method, "miou": miou_present(preds, targets), "classes_shown": len(shown)}
        )
    return records


def library_draw(model, paths, data_root, codes, labels, chosen) -> dict:
    """``stego segment --labels``'s classifier, fit by the library on the chosen images' files,
    scored on the others from their cached codes and features."""
    from stego.models.segmenter import PaddedCode
    from stego.naming.classifier import fit_classifier_map
    from stego.naming.labels import LabelSet
    from stego.naming.names import read_classes_txt
    from stego.segment import PREDICT_SCALE

    picked = sorted(chosen)
    label_set = LabelSet(
        root=data_root / "labels" / "train",
        names=read_classes_txt(data_root / "classes.txt"),
        files={Path(f"{paths[i].stem}.png"): data_root / "labels" / "train" / f"{paths[i].stem}.png"
               for i in picked},
    )  # fmt: skip
    sources = {Path(f"{paths[i].stem}.png"): paths[i] for i in picked}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes the draw does not show
        side = PREDICT_SCALE * model.meta.resolution  # as `stego segment` predicts
        class_map = fit_classifier_map(model, label_set, sources, max_side=side)
    model.set_classes(class_map)
    rest = [i for i in range(len(codes)) if i not in chosen]
    preds = []
    for i in rest:
        e = codes[i]
        found = PaddedCode(e["code"][None], e["padded"], e["own"], e["feat"][None].float())
        preds.append(model.ids_from_code(found, probe="class")[0].numpy())
    model.set_classes(None)
    shown = len(class_map.names) - len(class_map.fit["unnamed_classes"])
    return {"method": "stego", "miou": miou_present(preds, [labels[i] for i in rest]),
            "classes_shown": shown}  # fmt: skip


def time_naming(data_root: Path, work: Path, k: int = 44, n: int = 10) -> dict:
    """Wall time of `stego name` (majority, N labelled images) on a RESULTS folder of all 367
    CamVid train images: random cluster maps and a tiny model stand in for a `stego segment`
    run, since naming reads only those (it never runs the backbone)."""
    import json
    import shutil

    from stego.models.segmenter import SegmenterMeta, build_segmenter
    from stego.naming import name_results

    images = sorted((data_root / "images" / "train").iterdir())
    results, labels = work / "speed" / "results", work / "speed" / "labels"
    shutil.rmtree(work / "speed", ignore_errors=True)
    rng = np.random.default_rng(0)
    for path in images:
        target = results / "labels" / f"{path.stem}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        height, width = np.asarray(Image.open(path)).shape[:2]
        Image.fromarray(rng.integers(0, k, (height, width), dtype=np.uint8)).save(target)
    meta = SegmenterMeta("tiny-vit", None, "nonlinear", 32, k)
    build_segmenter(meta, backbone_pretrained=False).save_pretrained(results / "model")
    summary = {"input": str(data_root / "images" / "train"), "n_images": len(images)}
    (results / "summary.json").write_text(json.dumps(summary))
    labels.mkdir(parents=True)
    shutil.copy(data_root / "classes.txt", labels / "classes.txt")
    for path in images[:: len(images) // n][:n]:
        shutil.copy(data_root / "labels" / "train" / f"{path.stem}.png", labels)
    start = time.perf_counter()
    name_results(results, labels=labels, progress=False)
    return {"method": "name speed", "n_images": len(images), "clusters": k, "labelled": n,
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def table(path: str) -> str:
    """Markdown table of a results file: mean mIoU (min-max over draws) per fold, method, K, N;
    with several folds also their mean (the mean of the folds' means) per method, K, N, and
    the label-free and all-labels baselines averaged the same way."""
    import json
    from collections import defaultdict

    cells: dict[tuple, list[float]] = defaultdict(list)
    baselines: dict[str, dict[str, float]] = defaultdict(dict)
    for record in map(json.loads, open(path)):
        if "labelled" in record:
            key = (record["fold"], record["method"], record["clusters"], record["labelled"])
            cells[key].append(record["miou"])
        elif "miou" in record:
            baselines[record["method"]][record["fold"]] = record["miou"]
    ns = sorted({k[3] for k in cells})
    folds = sorted({k[0] for k in cells})
    rows = [f"| fold | method | K | {' | '.join(f'N = {n}' for n in ns)} |"]
    rows.append("|---" * (3 + len(ns)) + "|")
    for fold, method, k in sorted({k[:3] for k in cells}):
        values = []
        for n in ns:
            v = cells.get((fold, method, k, n), [])
            values.append(f"{np.mean(v):.1f} ({min(v):.1f}-{max(v):.1f})" if v else "-")
        rows.append(f"| {fold} | {method} | {k} | {' | '.join(values)} |")
    if len(folds) > 1:
        for method, k in sorted({k[1:3] for k in cells}):
            values = []
            for n in ns:
                means = [
                    np.mean(cells[(f, method, k, n)]) for f in folds if (f, method, k, n) in cells
                ]
                values.append(f"{np.mean(means):.1f}" if len(means) == len(folds) else "-")
            rows.append(f"| mean of {len(folds)} | {method} | {k} | {' | '.join(values)} |")
    lines = []
    for method, by_fold in sorted(baselines.items()):
        text = ", ".join(f"{f} {v}" for f, v in sorted(by_fold.items()))
        mean = f"; mean {np.mean(list(by_fold.values())):.2f}" if len(by_fold) > 1 else ""
        lines.append(f"- {method}: {text}{mean}")
    return "\n".join(rows + [""] + lines)


def main() -> None:
    parser = fold_parser(__doc__, "/tmp/stego-bench/naming")
    parser.add_argument("--clusters", type=int, nargs="+", default=[11, 22, 44])
    parser.add_argument("--labelled", type=int, nargs="+", default=[1, 5, 10, 20])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument(
        "--other-every",
        type=int,
        default=1,
        help="train the all-labels probe on every n-th image of the other sequences (video "
        "frames: neighbours are near copies; saves backbone time on a CPU)",
    )
    parser.add_argument(
        "--methods", nargs="+", default=["majority", "probe", "probe-feat"],
        choices=["majority", "probe", "probe-feat", "stego"],
    )  # fmt: skip
    parser.add_argument(
        "--no-baselines",
        dest="baselines",
        action="store_false",
        help="leave out the Hungarian and all-labels probe rows (e.g. a second process that "
        "covers other --clusters from the same cached codes)",
    )
    parser.add_argument("--speed", action="store_true", help="only time `stego name`")
    parser.add_argument("--table", default=None, help="print the table of this results file")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    if args.speed:
        emit(time_naming(Path(args.data_root), Path(args.work)), args.out)
        return
    for prefix in args.folds:
        for seed in args.seeds:
            fold_records(args, prefix, seed)


if __name__ == "__main__":
    main()
