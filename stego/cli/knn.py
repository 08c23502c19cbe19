"""``stego knn``: nearest-neighbour table of a training split (STEGO's knn positives).

Writes ``<data-root>/stego-cache/<dataset>/<split>_<crop>_<res>/<backbone>_layer<L>_<digest8>/
neighbors_k<k>.safetensors`` by default (``<split>_<crop>_<res>_nearest/`` with
``--interpolation nearest``), where ``stego train`` looks for it: indices (N, k), rank 0 = the
item itself, plus a fingerprint (backbone, weights, layer, dataset, split, crop, resolution,
interpolation, ordered item list) that training checks. Tables of the original code
(``<data-root>/nns/nns_*.npz``) can be read by ``stego.features.neighbors.NeighborTable.load``;
they carry only their length as a check.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stego.cli.features import add_common_arguments, load_backbone, split_config


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
        default=None,
        help="neighbours kept per item, the item itself included (default: train.knn_k of "
        "the --preset or config, 30 as the paper; training draws from ranks "
        "1..num_neighbors and reads the table of its train.knn_k)",
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
    from stego.device import resolve_device
    from stego.features.build import build_neighbor_table, cached_global_features, sibling_groups
    from stego.features.fingerprint import artifact_dir
    from stego.features.split import PreparedSplit, SplitSpec, open_split, table_path

    config = split_config(args)
    spec = SplitSpec.from_config(config)
    device = resolve_device(args.device)
    k = args.k or config.train.knn_k
    split = None
    if args.features is not None:  # no backbone at all: the cache has the global features
        m = config.model
        feats, fp = cached_global_features(args.features, spec, m.backbone, m.layer)
    else:
        split = PreparedSplit(spec, load_backbone(config))
        feats = split.global_features(
            reuse_cache=True,
            batch_size=args.batch_size,
            device=device,
            num_workers=args.num_workers,
            progress=not args.quiet,
        )
        fp = split.fingerprint
    groups = None
    if args.exclude_siblings:
        groups = sibling_groups(split.dataset if split is not None else open_split(spec))
    out = args.out or table_path(artifact_dir(spec.data_root, fp, spec.cache_dir), k)
    table = build_neighbor_table(
        feats,
        fp,
        k,
        out,
        device=device,
        backend=args.backend,
        max_memory_bytes=args.max_memory_mb * 2**20,
        exclude_groups=groups,
    )
    print(f"neighbour table written: {out} ({len(table)} items x {table.k})")
    return 0
