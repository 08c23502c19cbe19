"""`stego segment` on folders it has never seen: CamVid train sequences, one folder each.

Each sequence of CamVid ``train`` (file-name prefix: 0001TP, 0006R0, 0016E5) is linked into a
folder of its own and segmented with :func:`stego.segment.segment_folder`, exactly as a user runs
``stego segment FOLDER --clusters 11``; the written labels are then scored against the folder's
ground truth (one confusion matrix over the folder, Hungarian matching, strict rule). Labels are
never read before scoring, and val is not touched: this is where settings are chosen.

Variants: ``default`` (the command's defaults), any ``segment_folder`` keyword as ``key=value``
(``--set steps=300 layer=10 method='"cause"'``), and ``--raw`` (the same pipeline with head
``none``: codes are the backbone features, so the k-means probe is raw cosine k-means).

    python benchmarks/segment_folders.py --folds 0006R0 0016E5 --seeds 0 1 --tag default \
        --out results.jsonl
    python benchmarks/segment_folders.py --folds 0006R0 0016E5 --raw --set steps=1 layer=8 \
        --tag raw8 --out results.jsonl
"""

from __future__ import annotations

import argparse
import ast
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from shared_data import CAMVID

DATA_ROOT = str(CAMVID)  # --data-root overrides it
N_CLASSES = 11


def link_fold(data_root: Path, prefix: str, work: Path) -> Path:
    """A folder of symlinks to the train images whose name starts with ``prefix`` (any image
    format: a copy of CamVid re-encoded as JPEG to fit a device transfer works too)."""
    from stego.data.folder import IMAGE_EXTENSIONS

    folder = work / "folds" / prefix
    folder.mkdir(parents=True, exist_ok=True)
    images = (data_root / "images" / "train").glob(f"{prefix}_*")
    for image in sorted(p for p in images if p.suffix.lower() in IMAGE_EXTENSIONS):
        link = folder / image.name
        if not link.exists():
            link.symlink_to(image)
    return folder


def score_folder(labels_dir: Path, data_root: Path) -> dict[str, Any]:
    """Cluster mIoU / accuracy / per-class IoU of the label PNGs against CamVid train labels."""
    from PIL import Image

    from stego.eval.metrics import unsupervised_scores

    preds, targets = [], []
    for path in sorted(labels_dir.rglob("*.png")):
        preds.append(np.asarray(Image.open(path)).astype(np.int64).ravel())
        truth = data_root / "labels" / "train" / f"{path.stem}.png"
        targets.append(np.asarray(Image.open(truth)).astype(np.int64).ravel())
    scores = unsupervised_scores(np.concatenate(preds), np.concatenate(targets), N_CLASSES)
    return {
        "miou": round(float(scores.miou), 2),
        "accuracy": round(float(scores.accuracy), 2),
        "iou": [round(float(v), 1) for v in scores.iou],
        "n_images": len(preds),
    }


def run_one(
    folder: Path,
    out: Path,
    raw: bool,
    seed: int,
    kwargs: dict[str, Any],
    clusters: int = N_CLASSES,
    config_set: dict[str, Any] | None = None,
) -> dict:
    """``stego segment`` on ``folder`` into ``out``; ``raw``: head "none" (the k-means probe
    clusters the backbone features themselves); ``config_set``: training-config keys
    (``"loss.auto_pseudo_classes": 5``) set on top of what the command chooses."""
    import stego.segment as segment

    original = segment._config
    changes = {**(config_set or {}), **({"model.head": "none"} if raw else {})}

    def changed_config(*args: Any, **kw: Any) -> Any:
        config = original(*args, **kw)
        for key, value in changes.items():
            section, name = key.split(".")
            setattr(getattr(config, section), name, value)
        return config

    segment._config = changed_config
    try:
        start = time.perf_counter()
        summary = segment.segment_folder(
            folder, out, clusters=clusters, seed=seed, progress=False, **kwargs
        )
        wall = time.perf_counter() - start
    finally:
        segment._config = original
    return {"seconds": summary["seconds"], "wall": round(wall, 1), "settings": summary["settings"]}


def emit(record: dict[str, Any], out: str | None) -> None:
    """Print ``record`` as one JSON line, and append it to the file ``out`` when given."""
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as handle:
            handle.write(line + "\n")


def fold_parser(doc: str, work: str) -> argparse.ArgumentParser:
    """The options every held-out-sequence benchmark shares: data root, work folder, folds
    (train sequence prefixes), seeds and the JSON-lines output file."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--data-root", default=DATA_ROOT)
    parser.add_argument("--work", default=work)
    parser.add_argument("--folds", nargs="+", default=["0006R0", "0016E5"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default=None, help="append one JSON line per record here")
    return parser


def main() -> None:
    parser = fold_parser(__doc__, "/tmp/stego-bench/segment-folders")
    parser.add_argument("--set", nargs="*", default=[], help="segment_folder keyword=value")
    parser.add_argument("--raw", action="store_true", help="head none: raw cosine k-means")
    parser.add_argument("--tag", default="default", help="name of the runs")
    args = parser.parse_args()
    data_root, work = Path(args.data_root), Path(args.work)
    kwargs = {k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in args.set)}
    for prefix in args.folds:
        folder = link_fold(data_root, prefix, work)
        for seed in args.seeds:
            out = work / "runs" / f"{prefix}_{args.tag}_s{seed}"
            record = {"tag": args.tag, "fold": prefix, "seed": seed, "raw": args.raw, **kwargs}
            record.update(run_one(folder, out, args.raw, seed, kwargs))
            record.update(score_folder(out / "labels", data_root))
            emit(record, args.out)


if __name__ == "__main__":
    main()
