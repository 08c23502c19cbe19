"""`stego segment` on every development domain, with raw k-means beside each: one table.

A change of a default must hold on all of them, not on one dataset. Domains (each a folder of
symlinks segmented as a user would, ``stego segment FOLDER --clusters K``, then scored against
its labels: one confusion matrix over the folder, Hungarian matching, strict rule):

- ``camvid-0006R0``, ``camvid-0016E5``: CamVid train sequences (street scenes, K = 11);
- ``coco``: the 100 COCO-2017 photos of ``shared/data/coco-sample`` (indoor and outdoor, the
  paper's 27 coarse classes, K = 27);
- ``figground``: the COCO photos whose things cover 15-60 % of the labelled pixels, scored as
  thing vs stuff (K = 2): the figure/ground task a saliency-tuned backbone is good at.

Labels are read only to score. The data lives under ``--shared`` (default: ``$STEGO_SHARED`` or
``../shared`` beside the repository, benchmarks/shared_data.py). Variants: ``default`` (the
command's defaults), ``raw`` (head ``none``: cosine k-means on the backbone's block-8 features
through the same command), any ``segment_folder`` keyword with ``--set key=value`` and any
training-config key with ``--config-set section.key=value``.

    python benchmarks/domains.py --variants default raw --out domains.jsonl
    python benchmarks/domains.py --domains coco --variants default --set layer=8 --tag l8
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from segment_folders import emit, run_one  # noqa: E402
from shared_data import SHARED  # noqa: E402

THING_SHARE = (0.15, 0.60)  # figure/ground images: things cover this share of labelled pixels


@dataclass(frozen=True)
class Domain:
    """A folder of images to segment into ``clusters`` kinds and how to read its truth."""

    name: str
    clusters: int
    images: list[Path]
    truth: Callable[[str], np.ndarray]  # image stem -> (H, W) int64 class ids, -1 unlabelled


def shared_root(option: str | None) -> Path:
    return Path(option) if option else SHARED


def camvid_domain(shared: Path, prefix: str) -> Domain:
    root = shared / "data" / "camvid"
    images = sorted((root / "images" / "train").glob(f"{prefix}_*"))

    def truth(stem: str) -> np.ndarray:
        raw = np.asarray(Image.open(root / "labels" / "train" / f"{stem}.png"), np.int64)
        return np.where(raw == 255, -1, raw)

    return Domain(f"camvid-{prefix}", 11, images, truth)


def _coco_truth(shared: Path) -> Callable[[str], np.ndarray]:
    from stego.data.label_maps import coco27_map

    root = shared / "data" / "coco-sample" / "cocostuff" / "annotations" / "train2017"
    table = coco27_map()
    return lambda stem: table(np.asarray(Image.open(root / f"{stem}.png")), root / stem)


def coco_domains(shared: Path) -> list[Domain]:
    root = shared / "data" / "coco-sample" / "cocostuff" / "images" / "train2017"
    images = sorted(root.glob("*.jpg"))
    coarse = _coco_truth(shared)

    def figure(stem: str) -> np.ndarray:  # coarse 0-11 are things, 12-26 stuff
        ids = coarse(stem)
        return np.where(ids < 0, -1, (ids < 12).astype(np.int64))

    def is_figure(path: Path) -> bool:
        ids = figure(path.stem)
        share = float((ids == 1).sum()) / max(int((ids >= 0).sum()), 1)
        return THING_SHARE[0] <= share <= THING_SHARE[1]

    return [
        Domain("coco", 27, images, coarse),
        Domain("figground", 2, [p for p in images if is_figure(p)], figure),
    ]


def all_domains(shared: Path) -> dict[str, Domain]:
    found = [camvid_domain(shared, p) for p in ("0006R0", "0016E5")] + coco_domains(shared)
    return {d.name: d for d in found}


def link(domain: Domain, work: Path) -> Path:
    """A folder of symlinks to the domain's images (the images are never copied)."""
    folder = work / "folds" / domain.name
    folder.mkdir(parents=True, exist_ok=True)
    for image in domain.images:
        target = folder / image.name
        if not target.exists():
            target.symlink_to(image)
    return folder


def score(domain: Domain, labels_dir: Path) -> dict[str, Any]:
    """Cluster mIoU / pixel accuracy of the written label PNGs against the domain's truth."""
    from stego.eval.metrics import unsupervised_scores

    preds, targets = [], []
    for path in sorted(labels_dir.rglob("*.png")):
        preds.append(np.asarray(Image.open(path), np.int64).ravel())
        targets.append(domain.truth(path.stem).ravel())
    scores = unsupervised_scores(np.concatenate(preds), np.concatenate(targets), domain.clusters)
    return {"miou": round(float(scores.miou), 2), "accuracy": round(float(scores.accuracy), 2)}


def print_table(records: list[dict[str, Any]]) -> None:
    """One row per (domain, tag, seed): mIoU, accuracy, seconds, and raw k-means beside it."""
    raw = {(r["domain"], r["seed"]): r for r in records if r["variant"] == "raw"}
    print(f"\n{'domain':15s} {'run':22s} {'mIoU':>6s} {'acc':>6s} {'s':>6s} {'raw mIoU':>9s}")
    for r in records:
        if r["variant"] == "raw":
            continue
        base = raw.get((r["domain"], r["seed"]))
        beside = f"{base['miou']:9.1f}" if base else f"{'-':>9s}"
        run = f"{r['tag']} s{r['seed']}"
        print(
            f"{r['domain']:15s} {run:22s} {r['miou']:6.1f} {r['accuracy']:6.1f} "
            f"{r['wall']:6.0f} {beside}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", default=None, help="the shared/ folder (data/camvid, ...)")
    parser.add_argument("--work", default="/tmp/stego-bench/domains")
    parser.add_argument("--domains", nargs="+", default=None, help="default: all")
    parser.add_argument("--variants", nargs="+", default=["default", "raw"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", nargs="*", default=[], help="segment_folder keyword=value")
    parser.add_argument(
        "--config-set", nargs="*", default=[], help="training config key=value (loss.x=1)"
    )
    parser.add_argument("--tag", default=None, help="name of the runs (default: the variant)")
    parser.add_argument("--out", default=None, help="append one JSON line per run here")
    parser.add_argument("--table", default=None, help="only print the table of a --out file")
    args = parser.parse_args()
    if args.table:
        print_table([json.loads(line) for line in open(args.table) if line.strip()])
        return
    domains = all_domains(shared_root(args.shared))
    work = Path(args.work)
    kwargs = {k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in args.set)}
    config_set = {
        k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in args.config_set)
    }
    records = []
    for name in args.domains or list(domains):
        domain = domains[name]
        folder = link(domain, work)
        for variant in args.variants:
            raw = variant == "raw"
            extra = {"steps": 1, "layer": 8, **kwargs} if raw else kwargs
            for seed in args.seeds:
                tag = args.tag or variant
                out = work / "runs" / f"{name}_{tag}_s{seed}"
                record = {"domain": name, "variant": variant, "tag": tag, "seed": seed, **kwargs}
                record.update(config_set)
                record.update(run_one(folder, out, raw, seed, extra, domain.clusters, config_set))
                record.update(score(domain, out / "labels"))
                record["n_images"] = len(domain.images)
                records.append(record)
                emit({k: v for k, v in record.items() if k != "settings"}, args.out)
    print_table(records)


if __name__ == "__main__":
    main()
