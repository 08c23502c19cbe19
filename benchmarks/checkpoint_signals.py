"""Label-free checkpoint selection (issue #14, item 3): do label-free numbers computed on a
folder's codes track its mIoU over training?

For each held-out CamVid train sequence (a folder of its own, as in ``segment_folders.py``) and
seed, the STEGO head of ``stego segment`` is trained with a checkpoint every ``--every`` steps.
Every checkpoint is then scored the way ``stego segment`` labels the folder (clusters fit by
spherical k-means to the flip-averaged codes of 64 seeded images at the prediction size; every
image labelled; cluster mIoU) and described by label-free numbers of those 64 images' codes:

- ``kmeans_cos``: mean cosine of a code to its centroid (k-means' own objective);
- ``restart_ari``: mean adjusted Rand index between 5 single-restart k-means runs (stability);
- ``silhouette``: cosine silhouette of 3000 codes under the fit clusters;
- ``size_entropy``: entropy of the cluster sizes / log K (balance);
- ``random_pair_cos``: mean cosine of random pairs of codes (how much the codes collapse).

Prints the Spearman correlation of each number with mIoU per folder and what choosing each
folder's checkpoint by that number would gain over the last one. The backbone features are
computed once per folder, so each checkpoint costs only the head, k-means and scoring.

    python benchmarks/checkpoint_signals.py --folds 0006R0 0016E5 --seeds 0 1 --steps 400 \
        --every 25 --out signals.jsonl
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from segment_folders import N_CLASSES, emit, fold_parser, link_fold

WORK = "/tmp/stego-bench/checkpoint-signals"  # cluster_variants.py reuses its runs
SIGNALS = ("kmeans_cos", "restart_ari", "silhouette", "size_entropy", "random_pair_cos")


def train_with_checkpoints(
    folder: Path, work: Path, seed: int, steps: int, every: int
) -> tuple[Path, Any]:
    """``stego segment``'s training of ``folder`` (its defaults), saving every ``every`` steps.
    Returns the run folder and the :class:`stego.segment.SegmentSettings` used."""
    import stego.segment as seg
    from stego.config import StegoConfig
    from stego.data import write_five_crops
    from stego.infer.predict import collect_images
    from stego.train.trainer import train

    backbone, layer = seg.default_backbone()
    n_images = len(collect_images([folder]))
    five = n_images < seg.FIVE_CROP_BELOW
    if five:
        write_five_crops("folder", folder, "all", work / "crops", progress=False)
    defaults = StegoConfig().data  # resolution 224 is a multiple of the patch (14) already
    s = seg.SegmentSettings(
        clusters=N_CLASSES,
        backbone=backbone,
        layer=layer,
        resolution=defaults.resolution,
        steps=steps,
        predict_side=seg.PREDICT_SCALE * defaults.resolution,
        five_crop=five,
        crf=False,
        seed=seed,
        batch_size=defaults.batch_size,
    )
    config = seg._config(folder, work, s, n_images * (5 if five else 1), False)
    config.train.checkpoint_every = every
    run = work / "run"
    if not (run / "model" / "config.json").is_file():
        train(config, run, resume=(run / "checkpoints" / "last.ckpt").is_file(), progress=False)
    return run, s


def folder_features(model: Any, folder: Path, max_side: int) -> tuple[list, list, Any]:
    """Backbone features of every image at the prediction size, plain and of the mirrored image
    (list of (1, C, h, w) float16), and the padding of the (equal-sized) frames.

    Features, not codes (`stego.infer.predict.encode_paths`), so that every checkpoint's head
    reuses one backbone pass."""
    from stego.data.transforms import pad_to_multiple
    from stego.infer.images import collect_images, network_input, read_image_rgb
    from stego.models.segmenter import PaddedCode

    plain, mirrored, padded = [], [], None
    with torch.inference_mode():
        for path, _ in collect_images([folder]):
            image = torch.from_numpy(read_image_rgb(path).copy()).permute(2, 0, 1)[None] / 255.0
            image = network_input(image.float(), max_side)
            pad = pad_to_multiple(image, model.patch_size, mode="replicate")
            plain.append(model.backbone(pad.tensor).feat.half())
            mirrored.append(model.backbone(pad.tensor.flip(-1)).feat.half())
            size = (int(pad.tensor.shape[-2]), int(pad.tensor.shape[-1]))
            padded = PaddedCode(None, size, (pad.height, pad.width))
    return plain, mirrored, padded


def adjusted_rand(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings (Hubert & Arabie)."""
    from scipy.special import comb

    table = np.zeros((a.max() + 1, b.max() + 1), dtype=np.int64)
    np.add.at(table, (a, b), 1)
    pairs = comb(table, 2).sum()
    rows, cols = comb(table.sum(1), 2).sum(), comb(table.sum(0), 2).sum()
    expected = rows * cols / comb(len(a), 2)
    return float((pairs - expected) / (0.5 * (rows + cols) - expected))


def signals(codes: torch.Tensor, centroids: torch.Tensor, seed: int) -> dict[str, float]:
    """The label-free numbers of codes (N, D) under unit centroids (K, D)."""
    from stego.models.probes import spherical_kmeans

    x = F.normalize(codes.float(), dim=1)
    k = len(centroids)
    g = torch.Generator().manual_seed(seed)
    sub = x[torch.randperm(len(x), generator=g)[:20000]]
    runs = [
        spherical_kmeans(
            sub, k, n_restarts=1, generator=torch.Generator().manual_seed(100 + r)
        ).labels.numpy()
        for r in range(5)
    ]
    ari = np.mean([adjusted_rand(runs[i], runs[j]) for i in range(5) for j in range(i + 1, 5)])
    assign = (x @ centroids.T).argmax(1)
    sizes = torch.bincount(assign, minlength=k).float() / len(x)
    few = x[torch.randperm(len(x), generator=g)[:3000]]
    few_assign = (few @ centroids.T).argmax(1)
    dist = 1 - few @ few.T  # (3000, 3000) cosine distances
    member = F.one_hot(few_assign, k).float()  # (3000, K)
    counts = member.sum(0)
    mean_to = dist @ member / counts.clamp_min(1)  # (3000, K) mean distance to each cluster
    own = mean_to.gather(1, few_assign[:, None])[:, 0] * counts[few_assign]
    own = own / (counts[few_assign] - 1).clamp_min(1)  # excluding the code itself
    other = mean_to.masked_fill(member.bool() | (counts == 0), float("inf")).min(1).values
    silhouette = ((other - own) / torch.maximum(own, other)).mean()
    half = len(sub) // 2
    return {
        "kmeans_cos": float((x * centroids[assign]).sum(1).mean()),
        "restart_ari": float(ari),
        "silhouette": float(silhouette),
        "size_entropy": float(-(sizes.clamp_min(1e-12).log() * sizes).sum() / np.log(k)),
        "random_pair_cos": float((sub[:half] * sub[half : 2 * half]).sum(1).mean()),
    }


def score_checkpoints(
    run: Path, folder: Path, data_root: Path, seed: int, max_side: int
) -> list[dict]:
    """mIoU and label-free numbers of every ``step-*.ckpt`` of ``run``."""
    from PIL import Image

    import stego
    from stego.eval.metrics import unsupervised_scores
    from stego.infer.predict import collect_images

    model = stego.load(run / "model").eval()
    plain, mirrored, padded = folder_features(model, folder, max_side)
    names = [path.name for path, _ in collect_images([folder])]
    truth = np.concatenate(
        [
            np.asarray(Image.open(data_root / "labels" / "train" / f"{Path(n).stem}.png")).ravel()
            for n in names
        ]
    ).astype(np.int64)
    rng = np.random.default_rng(seed)  # the 64 images `stego segment` fits its clusters on
    pick = sorted(rng.choice(len(names), size=min(64, len(names)), replace=False).tolist())
    records = []
    for ckpt in sorted((run / "checkpoints").glob("step-*.ckpt")):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        model.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        model.head.eval()
        with torch.inference_mode():
            codes = [
                (model.head(a.float()).code + model.head(b.float()).code.flip(-1)) / 2
                for a, b in zip(plain, mirrored, strict=True)
            ]
            rows = torch.cat([codes[i][0].flatten(1).T for i in pick])  # (N, D)
            generator = torch.Generator().manual_seed(seed)
            model.cluster_probe.fit_kmeans(rows, n_restarts=10, generator=generator)
            ids = [model.ids_from_code(padded._replace(code=c))[0].numpy() for c in codes]
        scores = unsupervised_scores(np.concatenate([i.ravel() for i in ids]), truth, N_CLASSES)
        centroids = F.normalize(model.cluster_probe.clusters.detach(), dim=1)
        record = {"step": int(ckpt.stem.split("-")[1]), "miou": round(float(scores.miou), 2)}
        record.update({k: round(v, 4) for k, v in signals(rows, centroids, seed).items()})
        records.append(record)
    return records


def summarise(records: list[dict]) -> None:
    """Spearman of each number with mIoU per folder, and the gain of picking by it."""
    from scipy.stats import spearmanr

    for fold in sorted({r["fold"] for r in records}):
        rows = [r for r in records if r["fold"] == fold]
        rho = {s: spearmanr([r[s] for r in rows], [r["miou"] for r in rows])[0] for s in SIGNALS}
        print(
            fold,
            f"{len(rows)} checkpoints, Spearman with mIoU:",
            " ".join(f"{s} {v:+.2f}" for s, v in rho.items()),
        )
    runs = sorted({(r["fold"], r["seed"]) for r in records})
    for s in SIGNALS:
        for sign, word in ((1, "highest"), (-1, "lowest")):
            gains = []
            for key in runs:
                rows = [r for r in records if (r["fold"], r["seed"]) == key]
                last = max(rows, key=lambda r: r["step"])
                gains.append(max(rows, key=lambda r: sign * r[s])["miou"] - last["miou"])
            print(f"checkpoint with the {word} {s}: {np.mean(gains):+.2f} mIoU vs the last")


def main() -> None:
    parser = fold_parser(__doc__, WORK)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=25)
    args = parser.parse_args()
    data_root, work = Path(args.data_root), Path(args.work)
    records = []
    for prefix in args.folds:
        folder = link_fold(data_root, prefix, work)
        for seed in args.seeds:
            run, s = train_with_checkpoints(
                folder, work / "runs" / f"{prefix}_s{seed}", seed, args.steps, args.every
            )
            for record in score_checkpoints(run, folder, data_root, seed, s.predict_side):
                record = {"fold": prefix, "seed": seed, **record}
                emit(record, args.out)
                records.append(record)
    summarise(records)


if __name__ == "__main__":
    main()
