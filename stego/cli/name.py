"""``stego name RESULTS (--labels LABELS | --names "0=sky,1=road")``: clusters become classes."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "name",
        help="name the clusters of a `stego segment` output, from a few labels or by hand",
        description="Turn the cluster ids of RESULTS (written by `stego segment`) into classes "
        "and rewrite it: RESULTS/labels/ get class ids, the cluster ids move to "
        "RESULTS/clusters/, the overlays and the contact sheet get a legend, summary.json the "
        "pixel share of each class, and RESULTS/model/classes.json the mapping (so `stego "
        "predict` and `stego.load(...).predict` give class ids). Run it again to rename; "
        "RESULTS stays as it was when naming fails.",
    )
    parser.add_argument("results", help="output folder of `stego segment`")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--labels",
        help="folder of label PNGs for some of the images (same relative path and stem, class "
        "id per pixel, 255 = void) and classes.txt (one class name a line, line i = id i); "
        "each cluster is named after the majority class of its labelled pixels",
    )
    how.add_argument(
        "--names",
        help='cluster names by hand, e.g. "0=sky,1=road,2=road" (clusters sharing a name '
        'merge; unnamed ones stay "cluster N"), or a YAML file {0: sky, 1: road}',
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stego.naming import name_results, parse_names

    names = parse_names(args.names) if args.names else None
    class_map = name_results(args.results, labels=args.labels, names=names, progress=not args.quiet)
    fit = class_map.fit
    how = (
        f"from {fit['labelled_pixels']} labelled pixels of {fit['labelled_images']} images"
        if fit["method"] == "majority"
        else "by hand"
    )
    print(f"named {class_map.n_clusters} clusters as {class_map.n_classes} classes {how}")
    for k, name in enumerate(class_map.names):
        clusters = [c for c, m in enumerate(class_map.mapping) if m == k]
        print(f"  {k:3d} {name}: clusters {clusters if clusters else 'none'}")
    print(f"  labels (class ids): {args.results}/labels, cluster ids: {args.results}/clusters")
    return 0
