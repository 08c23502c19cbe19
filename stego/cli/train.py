"""``stego train``: train the segmentation head and probes on frozen features (STEGO's loss, or
CAUSE's clusterbook and contrastive loss with ``--method cause``).

Settings merge as: package defaults <- --preset <- --config FILE <- --set k=v <- explicit flags.
The resolved config is written to RUN_DIR/config.yaml and stored in every checkpoint.

Training reads cached backbone features (~20x faster than running the backbone every step, and
the same result: the backbone is frozen and images are prepared deterministically). The first
run builds the feature cache and the neighbour table (a progress bar, then their size and
folder); later runs on the same split, backbone and resolution reuse them.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stego.config import StegoConfig

# (flag dest, config key) for the flags that are shortcuts of `--set`.
_SHORTCUTS = (
    ("dataset", "data.dataset"),
    ("data_root", "data.data_root"),
    ("cache_dir", "data.cache_dir"),
    ("split", "data.split"),
    ("backbone", "model.backbone"),
    ("method", "model.method"),
    ("weights", "model.weights"),
    ("steps", "train.steps"),
    ("devices", "train.devices"),
    ("num_nodes", "train.num_nodes"),
    ("accelerator", "train.accelerator"),
    ("precision", "train.precision"),
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="train the STEGO segmentation head and cluster/linear probes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--preset",
        default=None,
        help="paper settings to start from: cocostuff27, cocostuff27-vits8, "
        "cityscapes27, potsdam3, camvid, camvid-labelfree (loss weights/shifts matter a lot; "
        "start from the closest dataset)",
    )
    parser.add_argument(
        "--data-root",
        default=None,
        help="folder holding the dataset; neighbour tables and feature caches are "
        "kept under <data-root>/stego-cache/ (~/.cache/stego/data/ when the folder is "
        "read-only) and reused",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="keep neighbour tables and feature caches here instead of "
        "<data-root>/stego-cache",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="run folder: config.yaml, checkpoints/, logs/ (TensorBoard, CSV) and "
        "the final model/ for `stego eval` / `stego predict`",
    )
    parser.add_argument(
        "--backbone",
        default=None,
        help="frozen backbone registry name (e.g. dino-vitb8, dinov2-vits14); the "
        "loss shifts depend on it, so retune them when changing it",
    )
    parser.add_argument(
        "--method",
        choices=("stego", "cause"),
        default=None,
        help="training method (= --set model.method=...): stego (default, the paper's) or "
        "cause (CAUSE: a concept clusterbook fitted by modularity, then a head trained "
        "against its EMA teacher; settings loss.cause_* and train.cause_*)",
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="local backbone weights file, for machines without internet access",
    )
    parser.add_argument(
        "--dataset", default=None, help="dataset name (overrides the preset's), e.g. camvid"
    )
    parser.add_argument(
        "--split",
        default=None,
        help="training split (default: train); labels of this split are used only "
        "by the linear probe, never by the head",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set loss.neg_inter_shift=0.5 "
        "--set train.steps=500 (repeatable; YAML values)",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="YAML file with config sections (data, model, loss, train); applied "
        "after the preset, before --set",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue RUN_DIR from checkpoints/last.ckpt; reaches the same weights "
        "as an uninterrupted run (train.steps may be raised)",
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=None,
        help="devices per node; >1 trains with DDP. data.batch_size stays the "
        "GLOBAL batch, so results do not depend on the device count",
    )
    parser.add_argument(
        "--num-nodes",
        type=int,
        default=None,
        help="machines for multi-node DDP (launch one process per node)",
    )
    parser.add_argument(
        "--accelerator",
        choices=("cpu", "gpu", "cuda", "mps", "auto"),
        default=None,
        help="where to train (default: auto = a GPU when there is one)",
    )
    parser.add_argument(
        "--precision",
        default=None,
        help="Lightning precision: 32-true (default, exact), bf16-mixed (faster on "
        "recent GPUs), 16-mixed (may overflow: training stops with an error)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimisation steps (presets: 5000-7000; a few hundred to check a setup)",
    )
    parser.add_argument(
        "--live",
        action="store_true",
        help="run the frozen backbone on every step instead of reading the feature cache "
        "(= --set train.use_feature_cache=false): ~20x slower, and only needed when the "
        "images change from step to step (random augmentation added in your own dataset "
        "code) or when the disk cannot hold the cache (its size is printed when it is built)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show everything the libraries print (Lightning's banners, notices, its own "
        "progress bar and model summary)",
    )
    parser.set_defaults(func=run)


def overrides_from_args(
    args: argparse.Namespace, shortcuts: tuple[tuple[str, str], ...] = _SHORTCUTS
) -> list[str]:
    """``--set`` values followed by the explicit flags of ``shortcuts`` (which win)."""
    import os

    import yaml

    out = list(getattr(args, "overrides", None) or [])
    if getattr(args, "live", False):
        out.append("train.use_feature_cache=false")
    for dest, key in shortcuts:
        value = getattr(args, dest, None)
        if value is not None:
            value = os.fspath(value) if isinstance(value, os.PathLike) else value
            text = yaml.safe_dump(value, default_flow_style=True).strip()
            out.append(f"{key}={text.removesuffix('...').strip()}")
    return out


def run(args: argparse.Namespace) -> int:
    from stego.config import load_config
    from stego.train.trainer import train

    config = load_config(args.preset, args.config, overrides_from_args(args))
    start = time.perf_counter()
    out = train(config, args.out, resume=args.resume, progress=not args.quiet, verbose=args.verbose)
    if not args.quiet and _env_rank() == 0:
        print(summary(config, out, time.perf_counter() - start))
    return 0


def _env_rank() -> int:
    from stego.train.trainer import env_rank

    return env_rank()


def summary(config: StegoConfig, out: Path, seconds: float) -> str:
    """What was written and the commands that use it."""
    d = config.data
    data_root = shlex.quote(str(d.data_root))
    run = shlex.quote(str(out))
    lines = [
        f"training done in {seconds:.0f} s ({config.train.steps} steps). Results in {out}/:",
        "  model/        the trained model (stego eval, stego predict, stego.load)",
        "  checkpoints/  last.ckpt (rerun with --resume and a larger --steps to continue)",
        f"  logs/         losses as CSV and TensorBoard: tensorboard --logdir {run}/logs",
        "Next:",
    ]
    if d.dataset != "folder":  # a labelled benchmark: score it on its validation split
        lines.append(
            f"  stego eval --checkpoint {run} --data-root {data_root} --split val "
            f"--out {run}/eval --report   (add --crf for the paper's numbers)"
        )
    lines.append(f"  stego predict --checkpoint {run} IMAGES_OR_DIRS --out {run}/predictions")
    return "\n".join(lines)
