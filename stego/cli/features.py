"""``stego features``: cache frozen backbone features of a training split (one backbone pass).

Writes ``<data-root>/stego-cache/<dataset>/<split>_<crop>_<res>/<backbone>_layer<L>_<digest8>/
features/`` by default (see :mod:`stego.features.cache` for the files). Interrupted runs resume.
The same pass stores the global features, so ``stego knn --features DIR`` needs no backbone.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``stego features`` and ``stego knn``."""
    parser.add_argument(
        "--dataset",
        required=True,
        help="dataset name (e.g. cocostuff27, cityscapes, potsdam, camvid, or a folder dataset)",
    )
    parser.add_argument(
        "--data-root",
        required=True,
        type=Path,
        help="folder holding the datasets; outputs go under <data-root>/stego-cache/ by default",
    )
    parser.add_argument(
        "--crop-dir",
        type=Path,
        default=None,
        help="where `stego crop --out` wrote the five-crops (default: <data-root>/cropped)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where caches and neighbour tables go instead of <data-root>/stego-cache (use it "
        "when the data root is read-only; pass the same value to `stego train --set "
        "data.cache_dir=...`)",
    )
    parser.add_argument(
        "--split",
        default="train",
        help="split to process (default: train; neighbours and caches are per split)",
    )
    parser.add_argument(
        "--backbone",
        default="dino-vits8",
        help="backbone registry name, e.g. dino-vits8, dinov2-vitb14 (default: dino-vits8)",
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="local weights file for the backbone instead of the registry's pretrained weights",
    )
    parser.add_argument(
        "--layer",
        type=int,
        default=None,
        help="backbone block to read features from, counted from 1 (default: the last block)",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=224,
        help="training crop size in pixels: resize shorter side, centre crop (default: 224, "
        "the paper's setting; must be a multiple of the patch size)",
    )
    parser.add_argument(
        "--crop-type",
        choices=("none", "five"),
        default="none",
        help="'five' reads the five-crops written by `stego crop` (COCO-Stuff, Cityscapes); "
        "'none' the full images (default: none)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="images per backbone forward pass; lower it if the device runs out of memory "
        "(default: 32)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)",
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="data loading worker processes (default: the CPU count, at most 4; 0 loads in the "
        "main process)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def resolve_device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def build_dataset_from_args(args: argparse.Namespace) -> Any:
    """The dataset of the command line, with the training transform (centre crop)."""
    from stego.data import PairTransform, build_dataset

    return build_dataset(
        args.dataset,
        args.data_root,
        args.split,
        transform=PairTransform(args.resolution, crop="center"),
        crop_type=None if args.crop_type == "none" else args.crop_type,
        crop_dir=args.crop_dir,
    )


def build_inputs(args: argparse.Namespace) -> tuple[Any, Any]:
    """Backbone and dataset of the command line (imported lazily: heavy modules)."""
    from stego.models.backbone import build_backbone

    backbone = build_backbone(args.backbone, weights=args.weights, layer=args.layer)
    patch = int(getattr(backbone, "patch_size", 1))
    if args.resolution % patch:
        from stego.errors import StegoError

        fix = args.resolution - args.resolution % patch
        raise StegoError(
            f"--resolution {args.resolution} is not a multiple of the patch size {patch} "
            f"of {args.backbone}; use --resolution {fix} or {fix + patch}"
        )
    dataset = build_dataset_from_args(args)
    return backbone, dataset


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "features",
        help="cache frozen backbone features of a split (makes training much faster)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="cache folder (default: <data-root>/stego-cache/<dataset>/<split>_<crop>_<res>/"
        "<backbone>_layer<L>_<digest8>/features)",
    )
    parser.add_argument(
        "--shard-size",
        type=int,
        default=1024,
        help="items per shard file; a killed run loses at most one shard (default: 1024)",
    )
    parser.add_argument(
        "--float32",
        action="store_true",
        help="store float32 instead of float16 (twice the disk space; float16 is plenty)",
    )
    parser.add_argument(
        "--with-keys", action="store_true", help="also cache the attention keys of the chosen block"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from stego.features.cache import FeatureCache
    from stego.features.fingerprint import artifact_dir

    backbone, dataset = build_inputs(args)
    out = args.out
    if out is None:
        probe = {
            "dataset": args.dataset,
            "split": args.split,
            "crop_type": args.crop_type,
            "resolution": args.resolution,
            "backbone": getattr(backbone, "name", args.backbone),
            "layer": getattr(backbone, "layer", args.layer),
            "weights_digest": getattr(backbone, "weights_digest", "unknown"),
        }
        out = artifact_dir(args.data_root, probe, args.cache_dir) / "features"
    cache = FeatureCache.build(
        backbone,
        dataset,
        out,
        dataset_name=args.dataset,
        split=args.split,
        crop_type=args.crop_type,
        resolution=args.resolution,
        data_root=args.data_root,
        dtype=torch.float32 if args.float32 else torch.float16,
        batch_size=args.batch_size,
        device=resolve_device(args.device),
        shard_size=args.shard_size,
        num_workers=args.num_workers,
        progress=not args.quiet,
        with_keys=args.with_keys,
    )
    print(f"feature cache ready: {out} ({len(cache)} items, features {cache.feat_shape})")
    return 0
