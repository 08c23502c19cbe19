"""``stego features``: cache frozen backbone features of a training split (one backbone pass).

Writes ``<data-root>/stego-cache/<dataset>/<split>_<crop>_<res>/<backbone>_layer<L>_<digest8>/
features/`` by default (``<split>_<crop>_<res>_nearest/`` with ``--interpolation nearest``),
where ``stego train`` looks for it (see :mod:`stego.features.cache` for the files).
Interrupted runs resume. The same pass stores the global features, so
``stego knn --features DIR`` needs no backbone.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

# (flag dest, config key) of the flags that say which split the artefacts are computed from.
SPLIT_SHORTCUTS = (
    ("dataset", "data.dataset"),
    ("data_root", "data.data_root"),
    ("cache_dir", "data.cache_dir"),
    ("crop_dir", "data.crop_dir"),
    ("split", "data.split"),
    ("resolution", "data.resolution"),
    ("crop_type", "data.crop_type"),
    ("interpolation", "data.interpolation"),
    ("backbone", "model.backbone"),
    ("weights", "model.weights"),
    ("layer", "model.layer"),
)


def add_split_arguments(parser: argparse.ArgumentParser, *, what: str = "caches") -> None:
    """Flags naming the split and backbone (``stego features``, ``knn``, ``calibrate``): each a
    shortcut of a config key, whose default comes from ``--preset`` or the package config."""
    parser.add_argument(
        "--preset",
        default=None,
        help="take the dataset, backbone, layer, resolution, crop type and interpolation of "
        "this `stego train` preset (e.g. cocostuff27), so the artefacts are the ones that "
        "training reads; explicit flags win",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="dataset name (e.g. cocostuff27, cityscapes, potsdam, camvid, or a folder dataset); "
        "required unless --preset gives it",
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
        help=f"where {what} go instead of <data-root>/stego-cache (use it when the data root "
        "is read-only; pass the same value to `stego train --set data.cache_dir=...`)",
    )
    parser.add_argument(
        "--split",
        default=None,
        help="split to process (default: train; neighbours and caches are per split)",
    )
    parser.add_argument(
        "--backbone",
        default=None,
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
        default=None,
        help="training crop size in pixels: resize shorter side, centre crop (default: 224, "
        "the paper's setting; must be a multiple of the patch size)",
    )
    parser.add_argument(
        "--crop-type",
        choices=("none", "five"),
        default=None,
        help="'five' reads the five-crops written by `stego crop` (COCO-Stuff, Cityscapes); "
        "'none' the full images (default: none)",
    )
    parser.add_argument(
        "--interpolation",
        choices=("bilinear", "nearest"),
        default=None,
        help="image resize: use what you train with (data.interpolation; the paper presets "
        "use nearest, as the original). Default: the --preset's, else bilinear",
    )


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``stego features`` and ``stego knn``."""
    add_split_arguments(parser, what="caches and neighbour tables")
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


def split_config(args: argparse.Namespace, extra: tuple[tuple[str, str], ...] = ()) -> Any:
    """The :class:`stego.config.StegoConfig` of the command line: package defaults <- --preset
    <- ``--set`` (when the command has it) <- the shortcut flags (``SPLIT_SHORTCUTS + extra``)."""
    from stego.cli.train import overrides_from_args
    from stego.config import load_config
    from stego.errors import StegoError

    if args.dataset is None and args.preset is None:
        raise StegoError("say which dataset: pass --dataset NAME (or --preset NAME)")
    return load_config(args.preset, None, overrides_from_args(args, SPLIT_SHORTCUTS + extra))


def load_backbone(config: Any) -> Any:
    """The config's backbone, refusing a resolution that is not a multiple of its patch."""
    from stego.errors import StegoError
    from stego.models.backbone import build_backbone

    m, resolution = config.model, config.data.resolution
    backbone = build_backbone(m.backbone, weights=m.weights, layer=m.layer)
    patch = int(backbone.patch_size)
    if resolution % patch:
        fix = resolution - resolution % patch
        raise StegoError(
            f"--resolution {resolution} is not a multiple of the patch size {patch} "
            f"of {m.backbone}; use --resolution {fix} or {fix + patch}"
        )
    return backbone


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
        "<backbone>_layer<L>_<digest8>/features, where `stego train` looks)",
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
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the cache's size, the free disk space and a time estimate (one batch is "
        "timed), then stop",
    )
    add_process_arguments(parser)
    parser.set_defaults(func=run)


def add_process_arguments(parser: argparse.ArgumentParser) -> None:
    """``--devices``, ``--num-nodes``, ``--accelerator``: the processes sharing the items."""
    parser.add_argument(
        "--devices",
        type=int,
        default=1,
        help="processes on this machine, one per device (GPUs; on CPUs, processes), each "
        "taking a share of the items; more than 1 overrides --device (default: 1)",
    )
    parser.add_argument(
        "--num-nodes",
        type=int,
        default=1,
        help="machines sharing the work (run the same command on each, as Lightning's DDP "
        "wants: MASTER_ADDR, NODE_RANK, ...); default: 1",
    )
    parser.add_argument(
        "--accelerator",
        default="auto",
        help="with --devices/--num-nodes above 1: cpu, gpu, cuda or auto (default: auto)",
    )


def launch_processes(args: argparse.Namespace, **options: Any) -> Any:
    """This process's :class:`stego.parallel.ProcessGroup` of the command line's processes
    (``--devices``, ``--num-nodes``, ``--accelerator``; ``--device`` for one process);
    ``options``: more of :func:`stego.parallel.launch`'s."""
    from stego.parallel import launch

    return launch(
        devices=args.devices,
        num_nodes=args.num_nodes,
        accelerator=args.accelerator,
        device=args.device,
        **options,
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from stego.features.split import PreparedSplit

    group = launch_processes(args)
    config = split_config(args)
    split = PreparedSplit.from_config(config, load_backbone(config))
    out = args.out or split.features_dir
    options = {
        "dtype": torch.float32 if args.float32 else torch.float16,
        "shard_size": args.shard_size,
        "with_keys": args.with_keys,
    }
    if args.dry_run or (group.main and not args.quiet):
        _announce(split, out, group, args, options)
    if args.dry_run:
        return 0
    cache = split.build_feature_cache(
        out=out,
        batch_size=args.batch_size,
        device=group.device,
        num_workers=args.num_workers,
        progress=not args.quiet,
        group=group,
        **options,
    )
    if group.main:
        print(
            f"feature cache ready: {cache.root} ({len(cache)} items, features {cache.feat_shape})"
        )
    return 0


def _announce(
    split: Any, out: Path, group: Any, args: argparse.Namespace, options: dict[str, Any]
) -> None:
    """Print the time estimate (and, for ``--dry-run``, the size and free space; a cache that
    cannot fit is refused here)."""
    import shutil

    from stego.atomic import format_bytes
    from stego.features.cache import FeatureCache
    from stego.features.sizing import seconds_per_item, time_estimate

    size = FeatureCache.size(split.backbone, split.dataset, out, device=group.device, **options)
    if args.dry_run:
        probe = next(p for p in [out, *out.parents] if p.exists())
        print(size.describe() + f"; {format_bytes(shutil.disk_usage(probe).free)} free there")
    if size.todo:
        per_item = seconds_per_item(
            split.backbone, split.dataset, device=group.device, batch_size=args.batch_size
        )
        print(time_estimate(size.todo, per_item, group.world, group.device))
    size.check_room()
