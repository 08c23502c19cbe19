"""``stego train``: train the segmentation head and probes (STEGO's loss on frozen features).

Settings merge as: package defaults <- --preset <- --config FILE <- --set k=v <- explicit flags.
The resolved config is written to RUN_DIR/config.yaml and stored in every checkpoint. Builds the
neighbour table (and the feature cache with --set train.use_feature_cache=true) when missing.
"""

from __future__ import annotations

import argparse

# (flag dest, config key) for the flags that are shortcuts of `--set`.
_SHORTCUTS = (
    ("dataset", "data.dataset"),
    ("data_root", "data.data_root"),
    ("cache_dir", "data.cache_dir"),
    ("split", "data.split"),
    ("backbone", "model.backbone"),
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
        "cityscapes27, potsdam3, camvid (loss weights/shifts matter a lot; "
        "start from the closest dataset)",
    )
    parser.add_argument(
        "--data-root",
        default=None,
        help="folder holding the dataset; neighbour tables and feature caches are "
        "kept under <data-root>/stego-cache/ and reused",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="keep neighbour tables and feature caches here instead of "
        "<data-root>/stego-cache (for read-only data folders)",
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
        "--set train.use_feature_cache=true (repeatable; YAML values)",
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
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """``--set`` values followed by the explicit flags (which win)."""
    import yaml

    out = list(args.overrides)
    for dest, key in _SHORTCUTS:
        value = getattr(args, dest, None)
        if value is not None:
            text = yaml.safe_dump(value, default_flow_style=True).strip()
            out.append(f"{key}={text.removesuffix('...').strip()}")
    return out


def run(args: argparse.Namespace) -> int:
    from stego.config import load_config
    from stego.training import train

    config = load_config(args.preset, args.config, overrides_from_args(args))
    out = train(config, args.out, resume=args.resume, progress=not args.quiet)
    print(f"training done: {out} (model in {out / 'model'})")
    return 0
