"""``stego calibrate``: propose the three loss shifts from your own features, without labels.

The rule (see :mod:`stego.features.calibration`): cluster a sample of patch features with cosine
k-means into P pseudo-classes (by default P = K // 2, at most 5, for K = --clusters, the segments
you want: k-means makes equal-sized clusters, real classes are unequal); sample location pairs
exactly as training does for each loss term (self: two places of one image; knn: an image and one
of its nearest neighbours; random: an image and another random one) and measure the fraction p
of pairs whose ends fall in the same pseudo-class; set the term's shift to the (1 - p) quantile
of its centred feature correlation, so that the share of pairs the loss attracts
(correlation > shift) equals the share of same-pseudo-class pairs.

Reads the feature cache and neighbour table (train.knn_k columns) of the split from the same
default locations as `stego train` (building them when missing, data.batch_size images per
backbone pass). With --preset, the split, backbone, loss sampling and batch come from the
preset, so the shifts are the ones that training would use; explicit flags win. Prints the
shifts, writes OUT/shifts.yaml (a `loss:` section for `stego train --config OUT/shifts.yaml`)
and OUT/shift_histograms.png.
Alternatively set `loss.*_shift: auto` in a training config to calibrate at the start of training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# (flag dest, config key) of the flags that set the calibration's sampling.
_SAMPLING = (
    ("num_neighbors", "train.num_neighbors"),
    ("feature_samples", "loss.feature_samples"),
    ("seed", "train.seed"),
)


def register(sub: argparse._SubParsersAction) -> None:
    from stego.cli.features import add_split_arguments

    parser = sub.add_parser(
        "calibrate",
        help="propose the loss shifts from the training features, label-free",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_split_arguments(parser, what="caches and neighbour tables")
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
        "max(2, K // 2), at most 5, as loss.auto_pseudo_classes)",
    )
    parser.add_argument(
        "--num-neighbors",
        type=int,
        default=None,
        help="knn positives are drawn from ranks 1..N, as train.num_neighbors (default: 7)",
    )
    parser.add_argument(
        "--feature-samples",
        type=int,
        default=None,
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
        help="sampled training batches of data.batch_size images (default: 20)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="sampling and k-means seed (default: train.seed, 0)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set data.batch_size=32 (repeatable; YAML values)",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="folder for shifts.yaml and shift_histograms.png"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stego.cli.features import split_config
    from stego.features.calibration import (
        SHIFT_KEYS,
        TERMS,
        calibrate_split,
        write_calibration,
    )

    if args.no_pointwise:
        args.overrides = [*args.overrides, "loss.pointwise=false"]
    config = split_config(args, _SAMPLING)
    cal, pseudo = calibrate_split(
        config,
        args.clusters,
        pseudo_classes=args.pseudo_classes,
        n_batches=args.batches,
        device=args.device,
        progress=not args.quiet,
    )
    shifts, figure = write_calibration(cal, args.out, config, args.clusters, pseudo)
    print(f"{'term':<8}{'config key':<18}{'shift':>8}{'same fraction':>15}")
    for term in TERMS:
        print(
            f"{term:<8}{SHIFT_KEYS[term]:<18}{cal.shifts[term]:>8.3f}"
            f"{cal.same_fraction[term]:>15.3f}"
        )
    print(f"wrote {shifts} (use: stego train --config {shifts}) and {figure}")
    return 0
