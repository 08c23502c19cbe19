"""``stego knn``: nearest-neighbour table of a training split (STEGO's knn positives).

Writes ``<data-root>/stego-cache/<dataset>/<split>_<crop>_<res>/<backbone>_layer<L>_<digest8>/
neighbors_k<k>.safetensors`` by default: indices (N, k), rank 0 = the item itself, plus a
fingerprint (backbone, weights, layer, dataset, split, crop, resolution, ordered item list) that
training checks. Tables of the original code (``<data-root>/nns/nns_*.npz``) can be read by
``stego.features.neighbors.NeighborTable.load``; they carry only their length as a check.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from stego.cli.features import (
    add_common_arguments,
    build_dataset_from_args,
    build_inputs,
    resolve_device,
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "knn",
        help="nearest-neighbour table of a training split (positives for the knn loss term)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_arguments(parser)
    parser.add_argument(
        "--k",
        type=int,
        default=30,
        help="neighbours kept per item, the item itself included (default: 30, as the "
        "paper; training draws from ranks 1..num_neighbors)",
    )
    parser.add_argument(
        "--backend",
        choices=("torch", "faiss"),
        default="torch",
        help="torch: exact, chunked matrix products on --device; faiss: exact IndexFlatIP "
        "on the CPU (needs `pip install faiss-cpu`) (default: torch)",
    )
    parser.add_argument(
        "--max-memory-mb",
        type=int,
        default=256,
        help="memory for one chunk of the similarity matrix (torch backend; default: 256)",
    )
    parser.add_argument(
        "--features",
        type=Path,
        default=None,
        help="reuse the global features of a cache written by `stego features` instead of "
        "running the backbone again",
    )
    parser.add_argument(
        "--exclude-siblings",
        action="store_true",
        help="with --crop-type five: never pair a crop with another crop of the same image "
        "(the original does not exclude them)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output file (default: <data-root>/stego-cache/<dataset>/<split>_<crop>_<res>/"
        "<backbone>_layer<L>_<digest8>/neighbors_k<k>.safetensors)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from stego.errors import StegoError
    from stego.features.fingerprint import artifact_dir, backbone_fingerprint, item_paths
    from stego.features.neighbors import NeighborTable, collect_global_features, topk_cosine

    device = resolve_device(args.device)
    dataset = None
    if args.features is not None:
        from stego.features.cache import FeatureCache

        cache = FeatureCache.open(args.features)
        fp = dict(cache.fingerprint)
        asked = {
            "dataset": args.dataset,
            "split": args.split,
            "crop_type": args.crop_type,
            "resolution": args.resolution,
            "backbone": args.backbone,
        }
        if args.layer is not None:
            asked["layer"] = args.layer
        diffs = [
            f"{k}: asked {v!r}, cache has {fp.get(k)!r}" for k, v in asked.items() if fp.get(k) != v
        ]
        if diffs:
            raise StegoError(
                f"feature cache {args.features} does not match the command line: "
                + "; ".join(diffs)
            )
        feats = cache.global_features()
    else:
        backbone, dataset = build_inputs(args)
        fp = backbone_fingerprint(
            backbone,
            dataset=args.dataset,
            split=args.split,
            crop_type=args.crop_type,
            resolution=args.resolution,
            paths=item_paths(dataset),
            data_root=args.data_root,
        )
        feats = _cached_global_features(artifact_dir(args.data_root, fp, args.cache_dir), fp)
        if feats is None:
            feats = collect_global_features(
                backbone,
                dataset,
                batch_size=args.batch_size,
                device=device,
                num_workers=args.num_workers,
                progress=not args.quiet,
            ).feat
    fp["data_root"] = str(args.data_root)
    groups = None
    if args.exclude_siblings:
        dataset = dataset if dataset is not None else build_dataset_from_args(args)
        if getattr(dataset, "groups", None) is None:
            raise StegoError("--exclude-siblings needs five-crop data (--crop-type five)")
        groups = torch.as_tensor(list(dataset.groups), dtype=torch.int64)
        fp["exclude_siblings"] = True
    feats_device = torch.device(device) if args.backend == "torch" else torch.device("cpu")
    indices = topk_cosine(
        feats,
        args.k,
        backend=args.backend,
        device=feats_device,
        max_memory_bytes=args.max_memory_mb * 2**20,
        exclude_groups=groups,
    ).cpu()
    out = args.out or (
        artifact_dir(args.data_root, fp, args.cache_dir) / f"neighbors_k{args.k}.safetensors"
    )
    NeighborTable(indices, fp).save(out)
    print(f"neighbour table written: {out} ({indices.shape[0]} items x {indices.shape[1]})")
    return 0


def _cached_global_features(folder: Path, fp: dict) -> Any:
    """Global features of the feature cache `stego features` wrote for the same fingerprint
    (saves a second backbone pass), or None when there is none or it is stale."""
    from stego.errors import StegoError
    from stego.features.cache import FeatureCache

    if not (folder / "features" / "manifest.json").is_file():
        return None
    try:
        cache = FeatureCache.open(folder / "features", fp)
    except StegoError:
        return None
    print(f"using the global features of the feature cache in {folder / 'features'}")
    return cache.global_features()
