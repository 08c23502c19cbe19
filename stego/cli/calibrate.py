"""``stego calibrate``: propose the three loss shifts from your own features, without labels.

The rule (see :mod:`stego.features.calibration`): cluster a sample of patch features with cosine k-means
into P pseudo-classes (by default P = K // 2 for K = --clusters, the number of segments
you want: k-means makes equal-sized clusters, real classes are unequal); sample location pairs
exactly as training does for each loss term (self: two places of one image; knn: an image and one
of its nearest neighbours; random: an image and another random one) and measure the fraction p
of pairs whose ends fall in the same pseudo-class; set the term's shift to the (1 - p) quantile
of its centred feature correlation, so that the share of pairs the loss attracts
(correlation > shift) equals the share of same-pseudo-class pairs.

Reads the feature cache and neighbour table of the split from the same default locations as
`stego train` (building them when missing). Prints the shifts, writes OUT/shifts.yaml (a
`loss:` section for `stego train --config OUT/shifts.yaml`) and OUT/shift_histograms.png.
Alternatively set `loss.*_shift: auto` in a training config to calibrate at the start of training.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "calibrate",
        help="propose the loss shifts from the training features, label-free",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", required=True, help="dataset name, e.g. camvid")
    parser.add_argument("--data-root", required=True, type=Path, help="folder holding the dataset")
    parser.add_argument(
        "--split",
        default="train",
        help="split to calibrate on: the one you train on (default: train)",
    )
    parser.add_argument(
        "--backbone",
        default="dino-vits8",
        help="backbone registry name; shifts depend on it (default: dino-vits8)",
    )
    parser.add_argument("--weights", default=None, help="local backbone weights file")
    parser.add_argument(
        "--layer",
        type=int,
        default=None,
        help="backbone block, counted from 1 (default: the last block)",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=224,
        help="training resolution (default: 224; a multiple of the patch size)",
    )
    parser.add_argument(
        "--crop-type",
        choices=("none", "five"),
        default="none",
        help="'five' for five-cropped training splits (default: none)",
    )
    parser.add_argument(
        "--clusters",
        type=int,
        required=True,
        help="K: the number of segments you will ask for (e.g. the class count of the dataset)",
    )
    parser.add_argument(
        "--pseudo-classes",
        type=int,
        default=None,
        help="k-means pseudo-classes of the calibration (default: "
        "max(2, K // 2), as loss.auto_pseudo_classes)",
    )
    parser.add_argument(
        "--num-neighbors",
        type=int,
        default=7,
        help="knn positives are drawn from ranks 1..N, as train.num_neighbors (default: 7)",
    )
    parser.add_argument(
        "--feature-samples",
        type=int,
        default=11,
        help="S x S points per image, as loss.feature_samples (default: 11)",
    )
    parser.add_argument(
        "--no-pointwise",
        action="store_true",
        help="do not centre correlations per anchor (loss.pointwise: false, "
        "e.g. the camvid and cityscapes presets)",
    )
    parser.add_argument(
        "--batches",
        type=int,
        default=20,
        help="sampled training batches of 16 images (default: 20)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling and k-means seed")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where caches and neighbour tables live instead of "
        "<data-root>/stego-cache (use the value you train with)",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="folder for shifts.yaml and shift_histograms.png"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import yaml

    from stego.atomic import atomic_write
    from stego.cli.features import resolve_device
    from stego.data import dataset_info
    from stego.errors import StegoError
    from stego.features.calibration import (
        SHIFT_KEYS,
        TERMS,
        calibrate_shifts,
        histogram_figure,
        pseudo_class_count,
        shifts_config,
    )
    from stego.models.backbone import build_backbone
    from stego.train.pairs import feature_cache, neighbor_table, open_split

    backbone = build_backbone(args.backbone, weights=args.weights, layer=args.layer)
    backbone.check_size(args.resolution, args.resolution)
    if args.clusters < 2:
        raise StegoError(f"--clusters must be >= 2, got {args.clusters}")
    info = dataset_info(args.dataset)
    dataset = open_split(
        info.name,
        args.data_root,
        args.split,
        resolution=args.resolution,
        interpolation="bilinear",
        crop_type=args.crop_type,
    )
    where = dict(
        name=info.name,
        split=args.split,
        crop_type=args.crop_type,
        resolution=args.resolution,
        data_root=args.data_root,
        cache_dir=args.cache_dir,
        device=resolve_device(args.device),
        batch_size=16,
        num_workers=0,
        progress=not args.quiet,
    )
    cache = feature_cache(backbone, dataset, True, **where)
    nbrs = neighbor_table(backbone, dataset, 30, cache=cache, **where)
    pseudo = args.pseudo_classes or pseudo_class_count(args.clusters)
    if pseudo < 2:
        raise StegoError(f"--pseudo-classes must be >= 2, got {pseudo}")
    cal = calibrate_shifts(
        cache,
        nbrs,
        pseudo,
        num_neighbors=args.num_neighbors,
        n_samples=args.feature_samples,
        pointwise=not args.no_pointwise,
        n_batches=args.batches,
        seed=args.seed,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    fragment = shifts_config(cal)
    if args.no_pointwise:
        fragment["loss"]["pointwise"] = False
    header = (
        f"# stego calibrate: {info.name}/{args.split}, {args.backbone} layer "
        f"{args.layer or 'last'}, res {args.resolution}, K={args.clusters}, "
        f"{pseudo} pseudo-classes, "
        f"seed {args.seed}\n"
        "# same-pseudo-class fractions: "
        + ", ".join(f"{t} {cal.same_fraction[t]:.3f}" for t in TERMS)
        + "\n"
    )
    with atomic_write(args.out / "shifts.yaml", "w") as handle:
        handle.write(header + yaml.safe_dump(fragment, sort_keys=False))
    figure = histogram_figure(
        cal,
        args.out / "shift_histograms.png",
        title=f"{info.name}/{args.split} {args.backbone} "
        f"layer {args.layer or 'last'}, K={args.clusters}, "
        f"{pseudo} pseudo-classes",
    )
    print(f"{'term':<8}{'config key':<18}{'shift':>8}{'same fraction':>15}")
    for term in TERMS:
        print(
            f"{term:<8}{SHIFT_KEYS[term]:<18}{cal.shifts[term]:>8.3f}"
            f"{cal.same_fraction[term]:>15.3f}"
        )
    print(
        f"wrote {args.out / 'shifts.yaml'} (use: stego train --config {args.out / 'shifts.yaml'})"
        f" and {figure}"
    )
    return 0
